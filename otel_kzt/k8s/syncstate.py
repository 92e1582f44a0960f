"""Which sources feed an index, whether each listed once, and which fail now: the answer to "is metadata
synced?" that readiness, `kzt_*_metadata_synced` and their alerts share (DESIGN §5.8).

A source covers resources (`pods`, `nodes`, or both for a file). A required one must have listed once and
must not be refused (401/403) now; a transient error (a timeout, a 503 while the API server restarts)
keeps the last good answers and the component ready, and is still reported. Services and EndpointSlices
have their own switch (`index.services.available()`): without them only the savings are off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from otel_kzt.k8s.model import SourceFailure, SyncState

CORE_RESOURCES = ("nodes", "pods")


@dataclass(frozen=True, slots=True)
class _Source:
    resources: tuple[str, ...]
    required: bool
    synced: bool = False
    failure: SourceFailure | None = None


class SourceStates:
    """Thread-safe; every answer is built from one consistent copy."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sources: dict[str, _Source] = {}

    def register(self, name: str, resources: tuple[str, ...], required: bool) -> None:
        with self._lock:
            if name not in self._sources:
                self._sources[name] = _Source(resources, required)

    def synced(self, name: str) -> bool:
        """Mark `name` listed (and not failing); True when every required source has now listed once."""
        with self._lock:
            self._sources[name] = replace(self._sources[name], synced=True, failure=None)
            return self._listed()

    def failed(self, name: str, verb: str, status: int | None, reason: str, message: str) -> SourceFailure:
        """Record one failed attempt; the streak keeps its first time and counts attempts."""
        with self._lock:
            source = self._sources[name]
            old = source.failure
            failure = SourceFailure(
                resource=source.resources[0] if len(source.resources) == 1 else name,
                verb=verb,
                status=status,
                reason=reason,
                message=message,
                since_unix_s=old.since_unix_s if old is not None else self._clock(),
                attempts=old.attempts + 1 if old is not None else 1,
                required=source.required,
            )
            self._sources[name] = replace(source, failure=failure)
            return failure

    def recovered(self, name: str) -> None:
        """A request of `name` was answered: its failure streak (if any) is over."""
        with self._lock:
            source = self._sources[name]
            if source.failure is not None:
                self._sources[name] = replace(source, failure=None)

    def listed(self) -> bool:
        """Every required source listed once (lookups answer from then on, even when a watch fails)."""
        with self._lock:
            return self._listed()

    def names(self) -> dict[str, bool]:
        with self._lock:
            return {name: s.synced for name, s in self._sources.items()}

    def state(self, services: bool) -> SyncState:
        """The state now; `services`: whether the Service catalog answers (it keeps its own sources)."""
        with self._lock:
            required = [s for s in self._sources.values() if s.required]
            pending = sorted({r for s in required if not s.synced for r in s.resources})
            denied = any(s.failure is not None and s.failure.denied for s in required)
            failures = sorted(
                (s.failure for s in self._sources.values() if s.failure is not None),
                key=lambda f: (not f.required, f.resource),
            )
            return SyncState(
                synced=bool(required) and not pending and not denied,
                services=services,
                pending=tuple(pending),
                failures=tuple(failures),
            )

    def _listed(self) -> bool:
        return all(s.synced for s in self._sources.values() if s.required)

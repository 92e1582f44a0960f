"""Typed values the metadata package hands to the agent and the enricher, and the seam they query.

Only the fields otel-kzt uses are kept from Kubernetes objects (decoded from raw JSON, never through the
client's generated models, which are far too slow and heavy at 150,000 pods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from otel_kzt.schema import WorkloadKind

_DENIED = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    zone: str | None  # topology.kubernetes.io/zone (or legacy label); None = unknown, never guessed
    region: str | None
    provider: str | None  # "aws", "gcp", "azure", ... from spec.providerID; None when absent
    addresses: tuple[str, ...]  # InternalIP / ExternalIP, IPv4 and IPv6, as text


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What an IP address belongs to. A pod, or a node (host-network pod or node address)."""

    node_name: str | None
    workload_kind: WorkloadKind
    workload_name: str
    pod_name: str | None = None  # None for a node endpoint
    namespace: str | None = None
    pod_uid: str | None = None

    @property
    def is_node(self) -> bool:
        return self.workload_kind is WorkloadKind.NODE


@dataclass(frozen=True, slots=True)
class SourceFailure:
    """Why one metadata source is failing now (the current streak of failed attempts)."""

    resource: str  # "pods", "nodes", "services", "endpointslices", "version", or "file"
    verb: str  # "list", "watch", "get", "read"
    status: int | None  # the HTTP status; None when no HTTP answer came (refused, timeout, bad file)
    reason: str  # the Status reason ("Forbidden", "Unauthorized"), else the error's type
    message: str  # the server's Status message, else the error text
    since_unix_s: float  # first failure of this streak
    attempts: int  # failed attempts in this streak
    required: bool  # False for Services/EndpointSlices/version: their loss turns Service features off only

    @property
    def denied(self) -> bool:
        """401/403: the identity or its RBAC is wrong; retrying will not help until someone fixes it."""
        return self.status in _DENIED

    def describe(self) -> str:
        """`list nodes: HTTP 403 Forbidden: nodes is forbidden: User "..." cannot list ...`."""
        status = f"HTTP {self.status} {self.reason}" if self.status is not None else self.reason
        return f"{self.verb} {self.resource}: {status}: {self.message}"


@dataclass(frozen=True, slots=True)
class SyncState:
    """Is metadata synced, and if not, which resource failed with which status (readiness, alerts)."""

    synced: bool  # every required source listed once and none of them denied (401/403) now
    services: bool  # Services and EndpointSlices available: Service attribution and savings on
    pending: tuple[str, ...]  # required resources not listed yet
    failures: tuple[SourceFailure, ...]  # every source failing now, required or not, by resource

    def describe(self) -> str:
        """One line for a readiness body or a log: `synced` or what is missing and why."""
        if self.synced and not self.failures:
            return "metadata synced"
        head = "metadata synced" if self.synced else "metadata not synced"
        parts = [f"{name}: not listed yet" for name in self.pending if not self._failing(name)]
        parts += [failure.describe() for failure in self.failures]
        return f"{head}: " + "; ".join(parts) if parts else head

    def _failing(self, resource: str) -> bool:
        return any(failure.resource == resource for failure in self.failures)


class MetadataIndex(Protocol):
    """IP -> endpoint and node -> zone, answered from caches; what agent and enricher depend on."""

    def ready(self) -> bool:
        """True once every source behind the index finished its first full sync."""
        ...

    @property
    def generation(self) -> int:
        """Changes whenever an answer of `lookup` or `node` may have changed (callers cache per value)."""
        ...

    def lookup(self, address: str, at_unix_s: float | None = None) -> Endpoint | None:
        """The endpoint owning `address` (at `at_unix_s` when given: IP reuse history), else None.

        Before `ready()`, always None: unknown, never wrong.
        """
        ...

    def node(self, name: str) -> NodeInfo | None: ...


def sync_summary(index: MetadataIndex | None) -> tuple[bool, str]:
    """(synced, one line saying why not) for readiness and `kzt_*_metadata_synced`: the index's
    `sync_state()` (a 401/403 on a required resource is unsynced, naming it), else plain `ready()`."""
    if index is None:
        return False, "metadata not configured (--kube-metadata, --kubeconfig, or run in a cluster)"
    sync_state = getattr(index, "sync_state", None)  # indexes of tests and benches may have none
    if sync_state is None:
        return index.ready(), "metadata synced" if index.ready() else "metadata not synced yet"
    state: SyncState = sync_state()
    return state.synced, state.describe()

"""Typed values the metadata package hands to the agent and the enricher, and the seam they query.

Only the fields otel-kzt uses are kept from Kubernetes objects (decoded from raw JSON, never through the
client's generated models, which are far too slow and heavy at 150,000 pods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from otel_kzt.schema import WorkloadKind


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

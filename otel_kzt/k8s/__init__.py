"""Kubernetes metadata: sources (a file, the API server), the IP/node index, and the `open_metadata` factory.

Agent and enricher call `open_metadata(...)` and query `handle.index` (a `MetadataIndex`, see `model.py`).
"""

from otel_kzt.k8s.handle import MetadataHandle, open_metadata
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.model import Endpoint, MetadataIndex, NodeInfo

__all__ = ["ClusterIndex", "Endpoint", "MetadataHandle", "MetadataIndex", "NodeInfo", "open_metadata"]

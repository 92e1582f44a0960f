"""`open_metadata`: the one factory the agent and the enricher call for Kubernetes metadata.

    handle = open_metadata(args.kube_metadata, node_name=args.node_name)
    handle.start()                      # returns quickly; answers arrive once the first sync is done
    endpoint = handle.index.lookup("10.0.12.77")
    handle.shutdown()                   # safe twice, and before start()

A file (`--kube-metadata`) wins; otherwise the API server: an explicit `kubeconfig` argument, else the
in-cluster service account, else `$KUBECONFIG` / `~/.kube/config`. With `node_name` (the agent) only that
node's pods are watched (`spec.nodeName=<node>`), and only that node (`metadata.name=<node>`), plus with
`service_vips` every Service (the agent's `cgroup` mode); a file is loaded whole either way (it holds what
its writer chose).

`handle.start()` on a file reads it at once and raises MetadataError if it cannot; on the API server it
returns at once and the sources retry with backoff until the server answers (`index.ready()` stays false).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from otel_kzt.k8s.filesource import DEFAULT_POLL_INTERVAL_S, FileSource
from otel_kzt.k8s.index import DEFAULT_GRACE_S, ClusterIndex

log = logging.getLogger(__name__)


class Source(Protocol):
    """What a handle starts and stops: a file poller or an API list+watch loop."""

    name: str

    def start(self) -> None: ...

    def shutdown(self) -> None: ...


class MetadataHandle:
    """Owns an index and the sources feeding it."""

    def __init__(
        self,
        index: ClusterIndex,
        sources: list[Source],
        description: str,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.index = index
        self.sources = sources
        self.description = description
        self._on_shutdown = on_shutdown  # e.g. close the API client's connection pool
        self._started: list[Source] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start every source; on failure the ones already started are stopped again, then it raises."""
        with self._lock:
            if self._started:
                return
            try:
                for source in self.sources:
                    source.start()
                    self._started.append(source)
            except BaseException:
                self._stop_started()
                raise
        log.info("metadata started source=%s", self.description)

    def shutdown(self) -> None:
        with self._lock:
            self._stop_started()
            if self._on_shutdown is not None:
                self._on_shutdown()

    def status(self) -> dict[str, object]:
        """For health endpoints and logs: where metadata comes from and how far each source got."""
        return {
            "source": self.description,
            "ready": self.index.ready(),
            "state": self.index.sync_state().describe(),
            "sources": self.index.sources(),
            "pods": self.index.pod_count,
            "nodes": self.index.node_count,
            "generation": self.index.generation,
        }

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the index is ready (every source synced once) or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while not self.index.ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.02, remaining))
        return True

    def _stop_started(self) -> None:
        while self._started:
            self._started.pop().shutdown()

    def __enter__(self) -> MetadataHandle:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def open_metadata(
    kube_metadata_file: str | None,
    *,
    node_name: str | None = None,
    kubeconfig: str | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    service_vips: bool = False,
) -> MetadataHandle:
    """Build (not start) the metadata sources and their index. Raises MetadataError on bad configuration.
    `service_vips`: a node-scoped handle (the agent) also lists Services, for their cluster IPs."""
    index = ClusterIndex(grace_s=grace_s)
    if kube_metadata_file:
        source = FileSource(kube_metadata_file, index, poll_interval_s=poll_interval_s)
        return MetadataHandle(index, [source], f"file:{kube_metadata_file}")
    # Imported here: the file source must not pay for importing the kubernetes client.
    from otel_kzt.k8s.apisource import api_sources
    from otel_kzt.k8s.kubeclient import load_api_client

    api_client, where = load_api_client(kubeconfig)  # MetadataError when no configuration is usable
    sources: list[Source] = list(
        api_sources(api_client, index, node_name=node_name, service_vips=service_vips)
    )
    scope = f" node={node_name}" if node_name else ""
    return MetadataHandle(index, sources, f"api:{where}{scope}", on_shutdown=api_client.close)

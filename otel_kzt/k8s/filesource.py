"""Metadata from a file: a Kubernetes `List` of Nodes and Pods, as `kubectl get nodes,pods -A -o yaml` prints.

Services and EndpointSlices in the same List (`kubectl get nodes,pods,services,endpointslices -A -o yaml`)
feed the Service catalog (`index.services`); a file without any Service leaves it off, and says so.

JSON is accepted too (`-o json`). The file is re-read when its (inode, size, mtime) changes, by `poll()` or
by a background thread; a file that is unreadable or half-written at re-read time keeps the last good
answers (logged), while at start it is an error, because a typo in `--kube-metadata` must not run blind.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Final

from otel_kzt.errors import MetadataError
from otel_kzt.k8s.decode import PodRecord, decode_node, decode_pod, gc_paused
from otel_kzt.k8s.index import ClusterIndex
from otel_kzt.k8s.listparse import iter_objects
from otel_kzt.k8s.model import NodeInfo
from otel_kzt.k8s.servicedecode import ServiceRecord, SliceRecord, decode_service, decode_slice

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 2.0


NO_SERVICES: Final = ("the metadata file holds no Services (write it with kubectl get "
                      "nodes,pods,services,endpointslices -A -o yaml)")


@dataclass(slots=True)
class Objects:
    """What one document holds, decoded."""

    nodes: list[NodeInfo] = field(default_factory=list)
    pods: list[PodRecord] = field(default_factory=list)
    services: list[ServiceRecord] = field(default_factory=list)
    slices: list[SliceRecord] = field(default_factory=list)


_DECODERS: Final = {"Pod": ("pods", decode_pod), "Node": ("nodes", decode_node),
                    "Service": ("services", decode_service), "EndpointSlice": ("slices", decode_slice)}


def parse_all(text: str, origin: str = "<text>") -> Objects:
    """Nodes, pods, Services and EndpointSlices from a YAML or JSON document (a List, or single objects)."""
    out = Objects()
    skipped = 0
    for kind, obj in iter_objects(text, origin):
        target = _DECODERS.get(kind)
        if target is None:
            continue
        try:
            getattr(out, target[0]).append(target[1](obj))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            skipped += 1
            log.warning("skipping malformed object origin=%s kind=%s error=%r", origin, kind, exc)
    if not (out.nodes or out.pods or out.services or out.slices or skipped) and text.strip():
        log.warning("no Node or Pod objects found origin=%s", origin)
    return out


def parse_objects(text: str, origin: str = "<text>") -> tuple[list[NodeInfo], list[PodRecord]]:
    """Nodes and pods from a YAML or JSON document (a List, a PodList/NodeList, or single objects)."""
    objects = parse_all(text, origin)
    return objects.nodes, objects.pods


class FileSource:
    """Feeds a `ClusterIndex` from a file; re-reads it when it changes."""

    def __init__(
        self,
        path: str,
        index: ClusterIndex,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        name: str = "file",
    ) -> None:
        self.path = path
        self.name = name
        self._index = index
        self._interval = poll_interval_s
        self._signature: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        self.failures = 0
        index.register_source(name)
        index.services.register_source(name)

    def poll(self) -> bool:
        """Re-read the file if it changed. True when the index was refreshed.

        Before the first successful read a failure raises MetadataError; afterwards it is logged and the
        last good content keeps answering.
        """
        try:
            stat = os.stat(self.path)
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if signature == self._signature:
                return False
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
            with gc_paused():  # see decode.gc_paused: big documents otherwise parse in quadratic time
                objects = parse_all(text, self.path)
        except (OSError, UnicodeDecodeError, MetadataError) as exc:
            self.failures += 1
            if self._signature is None:
                raise MetadataError(f"--kube-metadata {self.path}: {exc}") from exc
            self._index.source_failed(self.name, "read", None, type(exc).__name__, str(exc))
            log.warning("cannot re-read metadata file, keeping last content path=%s error=%s", self.path, exc)
            return False
        self._signature = signature
        self._index.replace_nodes(objects.nodes)
        self._index.replace_pods(objects.pods)
        catalog = self._index.services
        catalog.replace_services(objects.services)
        catalog.replace_slices(objects.slices)
        if objects.services:
            catalog.mark_synced(self.name)
        else:
            catalog.note_failure(self.name, NO_SERVICES, refused=True)
        self._index.mark_synced(self.name)
        self.reloads += 1
        log.info("metadata file loaded path=%s nodes=%d pods=%d services=%d endpointslices=%d", self.path,
                 len(objects.nodes), len(objects.pods), len(objects.services), len(objects.slices))
        return True

    def start(self) -> None:
        """First read now (raises MetadataError if it fails), then poll in a daemon thread."""
        if self._thread is not None:
            return
        self.poll()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"kzt-metadata-{self.name}", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except MetadataError as exc:  # only reachable if the first read was skipped; keep polling
                log.warning("metadata file poll failed path=%s error=%s", self.path, exc)

"""The control plane of a kernel or end-to-end bed: the RBAC-enforcing test API server serving the bed's
Nodes, Pods, Services and EndpointSlices, and one kubeconfig per component with its own ServiceAccount's
token, so agents and enrichers read metadata as in a cluster (DESIGN §5.8), never from a file.

    with ServedCluster(tmp_path, host="0.0.0.0") as control:   # an address node namespaces reach
        control.sync(objects)                                   # the served state = these objects
        argv += control.args(AGENT, via="10.77.0.1")            # --kubeconfig <agent's, server via that IP>
        ...
        control.sync(changed_objects)                           # adds, updates, deletes: watches see them

`served_cluster` is a fixture over it (started empty on 0.0.0.0, stopped after the test, even on failure).
Use a module- or session-scoped copy (`ServedCluster` in your own fixture) when agents outlive a test.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s_apiserver import AGENT, ENRICHER, FakeApiServer
from tests.support.k8s_rbac import Rbac

__all__ = ["AGENT", "ENRICHER", "ServedCluster", "served_cluster"]

_Key = tuple[str, str, str]  # (kind, namespace, name)


class ServedCluster:
    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", rbac: Rbac | None = None) -> None:
        self.workdir = Path(workdir)
        self.api = FakeApiServer(host=host, rbac=rbac)
        self._served: dict[_Key, str] = {}

    def start(self) -> ServedCluster:
        self.api.start()
        return self

    def stop(self) -> None:
        self.api.stop()

    def __enter__(self) -> ServedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.api.url.rsplit(":", 1)[1])

    def sync(self, objects: Iterable[dict[str, Any]]) -> None:
        """Make the served objects equal `objects` (a List's items, or the items of several): new ones are
        added, changed ones updated, missing ones deleted, each one event as a real server sends."""
        want: dict[_Key, dict[str, Any]] = {}
        for obj in objects:
            meta = obj["metadata"]
            namespace = meta.get("namespace", "") if obj["kind"] != "Node" else ""
            want[(obj["kind"], namespace, meta["name"])] = obj
        for key in [k for k in self._served if k not in want]:
            self.api.delete(key[0], key[2], key[1] or None)
            del self._served[key]
        for key, obj in want.items():
            text = json.dumps(obj, sort_keys=True)
            if self._served.get(key) != text:
                (self.api.update if key in self._served else self.api.add)(copy.deepcopy(obj))
                self._served[key] = text

    def sync_file(self, path: Path) -> None:
        """Serve what a `kubectl get ... -o json` List file holds."""
        self.sync(json.loads(Path(path).read_text()).get("items") or ())

    def kubeconfig(self, account: tuple[str, str], via: str | None = None) -> Path:
        """A kubeconfig as `account` whose server is http://<via>:<port> (default: the listening host)."""
        host = via or self.api.host
        path = self.workdir / f"kubeconfig-{account[1]}-{host.replace(':', '_')}"
        self.api.write_kubeconfig(path, account, f"http://{host}:{self.port}")
        return path

    def args(self, account: tuple[str, str], via: str | None = None) -> list[str]:
        """The component's metadata flags: `--kubeconfig <its own>` (in place of `--kube-metadata`)."""
        return ["--kubeconfig", str(self.kubeconfig(account, via))]


@pytest.fixture
def served_cluster(tmp_path: Path) -> Iterator[ServedCluster]:
    with ServedCluster(tmp_path, host="0.0.0.0") as control:
        yield control

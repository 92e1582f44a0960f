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
`ServedRun` is the demo's `ClusterRun` whose agents and enricher read its objects that way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_kzt.demo.cluster import NodeSpec
from otel_kzt.demo.runner import ClusterRun
from tests.support.k8s_apiserver import AGENT, ENRICHER, FakeApiServer
from tests.support.k8s_rbac import Rbac

__all__ = ["AGENT", "ENRICHER", "ServedCluster", "ServedRun", "served_cluster"]

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
        return self.api.port

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
        """A kubeconfig as `account` whose server is http(s)://<via>:<port> (default: the listening host)."""
        host = via or self.api.host
        path = self.workdir / f"kubeconfig-{account[1]}-{host.replace(':', '_')}"
        self.api.write_kubeconfig(path, account, f"{self.api.scheme}://{host}:{self.port}")
        return path

    def args(self, account: tuple[str, str], via: str | None = None) -> list[str]:
        """The component's metadata flags: `--kubeconfig <its own>` (in place of `--kube-metadata`)."""
        return ["--kubeconfig", str(self.kubeconfig(account, via))]


@pytest.fixture
def served_cluster(tmp_path: Path) -> Iterator[ServedCluster]:
    with ServedCluster(tmp_path, host="0.0.0.0") as control:
        yield control


class ServedRun(ClusterRun):
    """The demo's run with its metadata served by a `ServedCluster` on the host's fabric address (which
    node namespaces reach): agents and enricher get `--kubeconfig` with their own ServiceAccount's token
    instead of `--kube-metadata`. Every `write_metadata()` (start, a routing change) syncs the server, so
    components see it through their watches. The server stops with the run's topology."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.control: ServedCluster | None = None

    def write_metadata(self) -> None:
        super().write_metadata()
        if self.control is None:
            self.control = ServedCluster(self.workdir, host=self.cluster.plan.host(4)).start()
            self._topo.on_close("test API server", self.control.stop)
        self.control.sync_file(self.metadata_file)

    def metadata_args(self, argv: list[str], account: tuple[str, str]) -> list[str]:
        """`argv` with its `--kube-metadata FILE` replaced by `account`'s `--kubeconfig`."""
        assert self.control is not None, "write_metadata() first (start() does)"
        at = argv.index("--kube-metadata")
        return [*argv[:at], *self.control.args(account), *argv[at + 2 :]]

    def agent_argv(self, node: NodeSpec) -> list[str]:
        return self.metadata_args(super().agent_argv(node), AGENT)

    def enricher_argv(self) -> list[str]:
        return self.metadata_args(super().enricher_argv(), ENRICHER)

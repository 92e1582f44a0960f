"""Real components "in a pod": the ServiceAccount volume at its real path and the Service environment, so
`otel-kzt agent` / `otel-kzt enricher` take the product's own in-cluster configuration (no kubeconfig).

`InCluster(workdir, api, ENRICHER)` writes the account's volume (token, ca.crt, namespace) the way kubelet
does (`SecretVolume`: `..data` swapped atomically) and gives `wrapper()`, an argv prefix that runs the
command in a private mount namespace where /run is a fresh tmpfs holding only
/run/secrets/kubernetes.io/serviceaccount (read-only, a bind of the volume: later rotations show through),
with KUBERNETES_SERVICE_HOST/PORT set, no $KUBECONFIG and an empty $HOME (no ~/.kube/config to fall back
on). The wrapper ends in `exec`: the process started is the component itself, so stopping it stops
everything and the namespace goes with it; nothing is mounted on the host.

    with FakeApiServer(tls_dir=tmp_path / "pki") as api:
        pod = InCluster(tmp_path, api, ENRICHER)
        enricher = EnricherProcess(tmp_path, [], "e", wrapper=pod.wrapper())
        pod.rotate()   # a new token in the volume; the server refuses the old one from now on
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import require
from tests.support.k8s_apiserver import FakeApiServer
from tests.support.tls import SecretVolume

SA_DIR = "/run/secrets/kubernetes.io/serviceaccount"  # /var/run is /run: the path kubelet mounts
_ENTER = (
    f"set -e; mount -t tmpfs -o mode=755 kzt-pod-run /run; mkdir -p {SA_DIR};"
    f' mount --bind "$0" {SA_DIR}; mount -o remount,bind,ro {SA_DIR}; exec "$@"'
)


class InCluster:
    """One pod's view of the cluster as `account` (AGENT, ENRICHER) of `api` (which must serve TLS)."""

    def __init__(self, workdir: Path, api: FakeApiServer, account: tuple[str, str]) -> None:
        require(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
        assert api.ca_file is not None, "in-cluster clients speak https only: FakeApiServer(tls_dir=...)"
        self.api, self.account = api, account
        self.volume = SecretVolume(Path(workdir) / f"sa-{account[1]}")
        self.home = Path(workdir) / f"home-{account[1]}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.token = api.token(account)
        self._write()

    def _write(self) -> None:
        assert self.api.ca_file is not None
        self.volume.write(
            {
                "token": self.token.encode(),
                "ca.crt": self.api.ca_file.read_bytes(),
                "namespace": self.account[0].encode(),
            }
        )

    def rotate(self) -> str:
        """As kubelet replaces a bound token: the server refuses the old one, the volume holds the new one."""
        self.token = self.api.rotate_token(self.account)
        self._write()
        return self.token

    def wrapper(self, host: str = "127.0.0.1") -> list[str]:
        """The argv prefix that runs a command in this pod (the API server reached at `host`)."""
        return [
            "env", "-u", "KUBECONFIG", f"HOME={self.home}",
            f"KUBERNETES_SERVICE_HOST={host}", f"KUBERNETES_SERVICE_PORT={self.api.port}",
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", _ENTER, str(self.volume.dir),
        ]  # fmt: skip

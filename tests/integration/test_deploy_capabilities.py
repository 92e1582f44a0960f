"""The agent runs with exactly the DaemonSet's capabilities, and needs each one it asks for.

The real `otel-kzt agent` is started the way the DaemonSet starts it (its args, `NODE_NAME` from the
environment, `no_new_privs`), inside a network namespace of its own, with the capability bounding set cut
down to the manifest's `add` list: as root in a container with `drop: [ALL]` plus those, it holds nothing
else. It must attach, pin and export: the manifest's readiness probe (its `httpGet`, path and named port as
written, asked inside the namespace the way the kubelet asks a hostNetwork pod) turns true, with a real
`otel-kzt enricher` in the same namespace requiring the token the DaemonSet mounts, and both reading their
metadata from the RBAC-enforcing test API server with their own ServiceAccounts' tokens. With one of the
datapath capabilities taken away it must fail instead: the manifest asks for nothing it does not need.
(`SYS_RESOURCE` only matters on kernels before 5.11, so it has no negative case here.) `SYSLOG` is not in
the manifest: the positive test also checks that, with the manifest's set, /proc/kallsyms shows only zero
addresses, the condition under which bcc used to rewrite `bpf_probe_read_kernel` and the load failed.

Names: netns `kx-cap`, node `kx-cap-node` (pins under /sys/fs/bpf/otel-kzt/kx-cap-node), removed at the end.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_kzt.agent.datapath.pins import node_dir
from otel_kzt.netns import entered
from tests.integration import deploy_agents as da
from tests.integration import deploy_files as df
from tests.integration import deploy_stack as ds
from tests.support.k8s_cluster import AGENT, ENRICHER, ServedCluster
from tests.support.k8s_objects import make_node
from tests.support.processes import CLI

pytestmark = [pytest.mark.kernel, pytest.mark.integration]

NETNS = "kx-cap"
NODE = "kx-cap-node"
PIN_DIR = node_dir(NODE)  # the default pin root


def _agent() -> dict[str, object]:
    return df.container(df.get("DaemonSet", "otel-kzt-agent"), "agent")


def _manifest_caps() -> list[str]:
    caps: list[str] = _agent()["securityContext"]["capabilities"]["add"]  # type: ignore[index]
    return caps


def _probe_url() -> str:
    """The readiness probe's URL as the kubelet builds it: the named port resolved from the container's."""
    get: dict[str, object] = _agent()["readinessProbe"]["httpGet"]  # type: ignore[index]
    port = get["port"]
    if isinstance(port, str):
        ports: list[dict[str, object]] = _agent()["ports"]  # type: ignore[assignment]
        port = next(p["containerPort"] for p in ports if p["name"] == port)
    return f"http://127.0.0.1:{port}{get['path']}"


_PROBE = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    urllib.request.urlopen(sys.argv[1], timeout=3).read()\n"
    "except (urllib.error.URLError, OSError):\n"
    "    sys.exit(1)\n"
)


def _cleanup() -> None:
    subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{NETNS}",
            *CLI,
            "agent",
            "--cleanup",
            "--node-name",
            NODE,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def netns() -> Iterator[str]:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)  # a killed run's leftover
    subprocess.run(["ip", "netns", "add", NETNS], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True, timeout=30)
        yield NETNS
    finally:
        _cleanup()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False, timeout=30)


def _setpriv(caps: list[str]) -> list[str]:
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    return ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--"]


def _token(tmp_path: Path) -> Path:
    token = tmp_path / "otlp-token"  # the Secret both the DaemonSet and the Deployment mount
    token.write_text("kx-token\n")
    return token


@pytest.fixture
def control(netns: str, tmp_path: Path) -> Iterator[ServedCluster]:
    """The RBAC-enforcing test API server on the namespace's 127.0.0.1 (its listening socket made inside),
    serving the small cluster and this node: the agent and the enricher list and watch it with their own
    ServiceAccounts' tokens, as deployed (in place of the in-cluster configuration, which needs TLS)."""
    with entered(netns):
        served = ServedCluster(tmp_path).start()
    try:
        served.sync([*da.cluster_objects(), make_node(NODE, ["127.0.0.1"], zone="us-east-1a")])
        yield served
    finally:
        served.stop()


@pytest.fixture
def enricher(netns: str, control: ServedCluster, tmp_path: Path) -> Iterator[ds.EnricherProcess]:
    """A real enricher in the agent's namespace, so an export can be delivered and readiness turn true."""
    process = ds.EnricherProcess(
        tmp_path,
        control.args(ENRICHER),
        "enricher",
        extra=["--bearer-token-file", str(_token(tmp_path))],
        wrapper=["nsenter", f"--net=/run/netns/{netns}"],
    )
    try:
        yield process
    finally:
        process.stop()


def _start(
    tmp_path: Path, caps: list[str], enricher: ds.EnricherProcess, control: ServedCluster
) -> subprocess.Popen[bytes]:
    args = list(_agent()["args"])  # type: ignore[call-overload]
    args[args.index("--otlp-endpoint") + 1] = enricher.otlp_url
    args[args.index("--interval") + 1] = "1s"
    token = _token(tmp_path)
    args[args.index("--otlp-bearer-token-file") + 1] = str(token)
    argv = [
        "nsenter",
        f"--net=/run/netns/{NETNS}",
        *_setpriv(caps),
        *CLI,
        *args,
        *control.args(AGENT),
    ]
    env = {**os.environ, "NODE_NAME": NODE}
    with (tmp_path / f"agent-{'-'.join(caps) or 'none'}.log").open("wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def _probe_ok() -> bool:
    """The manifest's readiness probe, asked from inside the namespace (hostNetwork: the node's port)."""
    probe = ["nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-c", _PROBE, _probe_url()]
    return subprocess.run(probe, capture_output=True, check=False, timeout=10).returncode == 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _kallsyms_addresses(caps: list[str]) -> set[str]:
    """The distinct symbol addresses a process with `caps` sees in /proc/kallsyms (first 200 lines)."""
    out = subprocess.run(
        [*_setpriv(caps), "head", "-n", "200", "/proc/kallsyms"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return {line.split()[0] for line in out.splitlines()}


def test_agent_attaches_and_pins_with_exactly_the_manifest_capabilities(
    netns: str, control: ServedCluster, enricher: ds.EnricherProcess, tmp_path: Path
) -> None:
    assert "SYSLOG" not in _manifest_caps()
    # The agent cannot see kernel symbol addresses (bcc's trigger for rewriting bpf_probe_read_kernel),
    # yet it must load: the helper is called by number.
    assert _kallsyms_addresses(_manifest_caps()) == {"0000000000000000"}
    assert not _probe_ok()
    proc = _start(tmp_path, _manifest_caps(), enricher, control)
    try:
        ds.wait_for(lambda: proc.poll() is not None or _probe_ok(), 90, "the agent's readiness probe")
        log = next(tmp_path.glob("agent-*.log")).read_text(errors="replace")
        assert proc.poll() is None, f"agent exited {proc.returncode}:\n{log[-2000:]}"
        assert enricher.proc.poll() is None, enricher.tail()
        assert any(PIN_DIR.iterdir()), f"attached but nothing pinned under {PIN_DIR}"
        status = Path(f"/proc/{_python_child(proc.pid)}/status").read_text()
        effective = int(
            next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
        )
        # Exactly the manifest's set, less what this test process does not hold itself (a sandbox may lack
        # SYS_RESOURCE, which this kernel does not need).
        assert effective == _cap_mask(_manifest_caps()) & _own_bounding_set()
    finally:
        _stop(proc)
    assert proc.returncode == 0  # SIGTERM: final export, clean exit


@pytest.mark.parametrize("missing", ["BPF", "PERFMON", "NET_ADMIN"])
def test_agent_fails_without_each_datapath_capability(
    netns: str, control: ServedCluster, enricher: ds.EnricherProcess, tmp_path: Path, missing: str
) -> None:
    assert not _probe_ok()
    caps = [c for c in _manifest_caps() if c != missing]
    proc = _start(tmp_path, caps, enricher, control)
    try:
        ds.wait_for(lambda: proc.poll() is not None or _probe_ok(), 90, "the agent to exit or attach")
        assert not _probe_ok(), f"the agent attached without {missing}: the manifest would over-grant"
        assert proc.returncode not in (None, 0), f"without {missing} the agent must fail"
    finally:
        _stop(proc)


# Linux capability numbers (include/uapi/linux/capability.h).
_CAP_NUMBERS = {"NET_ADMIN": 12, "SYS_RESOURCE": 24, "SYSLOG": 34, "PERFMON": 38, "BPF": 39}


def _cap_mask(caps: list[str]) -> int:
    return sum(1 << _CAP_NUMBERS[c] for c in caps)


def _own_bounding_set() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("CapBnd:")).split()[1], 16)


def _python_child(pid: int) -> int:
    """`nsenter` and `setpriv` exec in place, so the pid is already the agent's Python."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"otel_kzt.cli" in part for part in cmdline), shlex.join(p.decode() for p in cmdline)
    return pid

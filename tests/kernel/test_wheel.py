"""A wheel that runs: `pip wheel` of the package, installed (not editable) into a fresh virtualenv of
Debian's python3 with Debian's bcc linked in the way scripts/setup.sh links it, runs from outside the
repository: its `otel-kzt enricher` receives from its `otel-kzt agent` on the kernel (netfilter datapath
compiled from the C sources the wheel carries as package data).

The fresh environment takes the PyPI dependencies from the suite's own virtualenv (a path in a .pth file:
no download in CI); `otel_kzt` itself is only the installed wheel, which the test checks.

    root netns: the wheel's enricher (OTLP 0.0.0.0)  ── kw<run>r ═══ kw<run>u ──  kw<run>-n (its agent)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_kzt import netns, schema
from tests.conftest import REPO
from tests.integration import deploy_stack as ds
from tests.support.k8s_cluster import AGENT, ENRICHER, ServedCluster
from tests.support.k8s_objects import make_node
from tests.support.processes import stop

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
NS = f"kw{RUN}-n"
ROOT_IP, NODE_IP = f"10.94.{RUN}.1", f"10.94.{RUN}.2"
DEBIAN_PYTHON = "/usr/bin/python3"


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, **kw)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its bin directory."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # only what the build reads: the package, its metadata, the README
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "otel_kzt", src / "otel_kzt", ignore=shutil.ignore_patterns("__pycache__"))
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "dist"),
            str(src),
        ]
    )
    [wheel] = (work / "dist").glob("otel_kzt-*.whl")
    env = work / "venv"
    run([DEBIAN_PYTHON, "-m", "venv", str(env)])
    py = env / "bin" / "python"
    site = Path(
        run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    (site / "kzt-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bcc = run([DEBIAN_PYTHON, "-c", "import bcc, os; print(os.path.dirname(bcc.__file__))"]).stdout.strip()
    (site / "bcc").symlink_to(bcc)  # as scripts/setup.sh does
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    where = run([str(py), "-c", "import otel_kzt; print(otel_kzt.__file__)"], cwd=work).stdout.strip()
    assert Path(where).is_relative_to(site), f"otel_kzt comes from {where}, not from the wheel"
    installed = site / "otel_kzt" / "agent" / "datapath" / "bpf"
    assert {p.name for p in installed.iterdir()} >= {"count.h", "flow.h", "netfilter.c"}
    return env / "bin"


@pytest.fixture
def node() -> Iterator[None]:
    with netns.Topology() as topo:
        topo.netns(NS)
        topo.veth(None, f"kw{RUN}r", NS, f"kw{RUN}u", a_addrs=[f"{ROOT_IP}/30"], b_addrs=[f"{NODE_IP}/30"])
        yield


def test_the_installed_wheel_runs_enricher_and_agent(
    venv: Path, node: None, tmp_path: Path, served_cluster: ServedCluster
) -> None:
    """Both read metadata from the RBAC-enforcing API server with their own tokens, through the
    kubernetes client the wheel's dependencies installed."""
    assert run([str(venv / "otel-kzt"), "--version"], cwd=tmp_path).stdout.startswith("otel-kzt ")
    served_cluster.sync([make_node(NS, [NODE_IP], zone="z1")])
    grpc, metrics = ds.free_port(), ds.free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (tmp_path / "enricher.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [str(venv / "otel-kzt"), "enricher", *served_cluster.args(ENRICHER), "--grpc-endpoint",
                 f"0.0.0.0:{grpc}", "--http-endpoint", "", "--metrics-endpoint", f"127.0.0.1:{metrics}"],
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log))  # fmt: skip
        with (tmp_path / "agent.log").open("wb") as log:
            procs.append(netns.popen_in(NS, [
                str(venv / "otel-kzt"), "agent", "--node-name", NS, "--no-pin", "--interval", "0.5s",
                *served_cluster.args(AGENT, via=ROOT_IP), "--otlp-endpoint", f"http://{ROOT_IP}:{grpc}"],
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log))  # fmt: skip

        def reported() -> bool:
            assert all(p.poll() is None for p in procs), (tmp_path / "agent.log").read_text()[-3000:]
            body = ds.http_get(f"http://127.0.0.1:{metrics}/metrics")[1].decode()
            return f'{schema.AGENT_LAST_REPORT}{{k8s_node_name="{NS}"}}' in body

        ds.wait_for(reported, 120, "the wheel's agent reporting to the wheel's enricher")
        assert "flow counter installed" in (tmp_path / "agent.log").read_text()  # compiled from the wheel
    finally:
        codes = [stop(proc) for proc in reversed(procs)]
    assert codes == [0, 0]  # agent, then enricher: both stopped cleanly by SIGTERM

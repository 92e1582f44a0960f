"""The agents' alerts for real: Debian's Prometheus scrapes an enricher fed by two real agents (real
datapath, each in its node's namespace) and evaluates deploy/prometheus/rules.yaml.

- node a's flow map (16 entries) is full and 40 UDP flows keep coming: KztAgentMapNearlyFull and
  KztAgentOverflowGrowing fire for it, and not for node b;
- node b's agent is killed: KztAgentSilent fires for it, and not for node a;
- the agent's RBAC loses nodes: node a's agent reports metadata unsynced, KztAgentMetadataNotSynced fires.
Agents and the enricher read metadata from the RBAC-enforcing API server, each with its own token.
The rules are the shipped ones with time compressed (group interval 1s, `for:` 2s, rate windows 4s, the
5-minute silence 5s): the expressions and thresholds are otherwise unchanged.

    root netns: enricher (OTLP 0.0.0.0), Prometheus  ── kq<run>r<i> ═══ kq<run>u<i> ──  kq<run>-<node>
                10.93.<run>.<4i+1>/30                                   10.93.<run>.<4i+2>/30
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_kzt import netns
from tests.integration import deploy_files as df
from tests.integration import deploy_stack as ds
from tests.support.k8s_cluster import AGENT, ENRICHER, ServedCluster
from tests.support.k8s_objects import make_node
from tests.support.k8s_rbac import Rbac
from tests.support.processes import CLI, stop

pytestmark = pytest.mark.kernel

RUN = os.getpid() % 200 + 20
NODES = {"a": 0, "b": 1}  # node -> veth index
TRAFFIC = str(Path(__file__).resolve().parents[1] / "kernel" / "traffic.py")
ALERTS = ("KztAgentMapNearlyFull", "KztAgentOverflowGrowing", "KztAgentSilent")


def ns(node: str) -> str:
    return f"kq{RUN}-{node}"


def root_ip(i: int) -> str:
    return f"10.93.{RUN}.{4 * i + 1}"


def node_ip(i: int) -> str:
    return f"10.93.{RUN}.{4 * i + 2}"


def compressed_rules(path: Path) -> Path:
    """The shipped agent rules, minutes made seconds."""
    groups = yaml.safe_load(df.RULES.read_text())["groups"]
    for group in groups:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
            rule["expr"] = re.sub(r"\[5m\]", "[4s]", rule["expr"])
            if rule.get("alert") == "KztAgentSilent":
                rule["expr"] = rule["expr"].replace("> 300", "> 5")
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


class Bed:
    """Agents and the enricher read metadata from the RBAC-enforcing API server, each with its own token."""

    def __init__(self, work: Path, topo: netns.Topology) -> None:
        self.work, self.topo = work, topo
        self.control = ServedCluster(work, host="0.0.0.0").start()
        topo.on_close("test API server", self.control.stop)
        self.control.sync([make_node(ns(n), [node_ip(i)], zone=f"z{i}") for n, i in NODES.items()])
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def start_agent(self, node: str, port: int, *extra: str) -> None:
        i = NODES[node]
        argv = [*CLI, "agent", "--node-name", ns(node), "--no-pin",
                "--interval", "1s", *self.control.args(AGENT, via=root_ip(i)),
                "--otlp-endpoint", f"http://{root_ip(i)}:{port}", *extra]  # fmt: skip
        with (self.work / f"agent-{node}.log").open("wb") as log:
            proc = netns.popen_in(ns(node), argv, stdout=subprocess.DEVNULL, stderr=log)
        self.agents[node] = proc
        self.topo.on_close(f"agent {node}", lambda: stop(proc))


def active(prometheus: ds.PrometheusProcess) -> set[tuple[str, str]]:
    """(alert, node) of every firing alert."""
    alerts: list[dict[str, Any]] = prometheus.api("alerts")["data"]["alerts"]
    return {
        (a["labels"]["alertname"], a["labels"].get("k8s_node_name", ""))
        for a in alerts
        if a["state"] == "firing"
    }


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    with netns.Topology() as topo:
        for node, i in NODES.items():
            topo.netns(ns(node))
            topo.veth(None, f"kq{RUN}r{i}", ns(node), f"kq{RUN}u{i}",
                      a_addrs=[f"{root_ip(i)}/30"], b_addrs=[f"{node_ip(i)}/30"])  # fmt: skip
        yield Bed(tmp_path, topo)


def test_alerts_fire_on_a_full_map_and_a_silent_agent(bed: Bed) -> None:
    port = ds.free_port()
    # Reached from the node namespaces: its OTLP receiver listens on every address of the root namespace
    # (a later flag wins over the 127.0.0.1 one EnricherProcess gives).
    listen = ["--grpc-endpoint", f"0.0.0.0:{port}"]
    enricher = ds.EnricherProcess(bed.work, bed.control.args(ENRICHER), "kq-enricher", listen, grpc_port=port)
    bed.topo.on_close("enricher", enricher.stop)
    enricher.wait_ready()
    bed.start_agent("a", port, "--map-size", "16")
    bed.start_agent("b", port)
    prometheus = ds.PrometheusProcess(bed.work, {"otel-kzt-enricher": [enricher.metrics_target]},
                                      [compressed_rules(bed.work / "rules.yaml")])  # fmt: skip
    bed.topo.on_close("prometheus", prometheus.stop)
    ds.wait_for(
        lambda: len(prometheus.query("kzt_agent_last_report_timestamp_seconds")) == 2, 90, "both agents"
    )
    # Node a: 40 flows round-robin for the rest of the test, into a 16-entry map.
    argv = [sys.executable, TRAFFIC, "udp-stream", root_ip(0), "20000", "60", "64", "40"]
    traffic = netns.popen_in(ns("a"), argv, stdout=subprocess.DEVNULL)
    bed.topo.on_close("traffic", lambda: stop(traffic))
    want = {("KztAgentMapNearlyFull", ns("a")), ("KztAgentOverflowGrowing", ns("a"))}
    ds.wait_for(lambda: want <= active(prometheus), 40, f"{want} firing")
    bed.agents["b"].kill()
    bed.agents["b"].wait()
    ds.wait_for(lambda: ("KztAgentSilent", ns("b")) in active(prometheus), 40, "KztAgentSilent for b")
    firing = {(alert, node) for alert, node in active(prometheus) if alert in ALERTS}
    assert firing == want | {("KztAgentSilent", ns("b"))}  # and none of them for the other node
    assert ("KztAgentMetadataNotSynced", ns("a")) not in active(prometheus)
    # The agent's ClusterRole loses nodes (its watch is re-authorised when the server cuts it): node a's
    # agent reports kzt.agent.metadata.synced 0, the enricher (its own role intact) stays ready, the
    # shipped KztAgentMetadataNotSynced fires for node a.
    bed.control.api.set_rbac(Rbac.shipped().without("otel-kzt-agent", "nodes"))
    bed.control.api.drop_connections()
    ds.wait_for(lambda: ("KztAgentMetadataNotSynced", ns("a")) in active(prometheus), 60, "metadata alert")
    assert ds.http_get(f"http://{enricher.metrics_target}/readyz")[0] == 200
    assert any("403 watch nodes system:serviceaccount:otel-kzt:otel-kzt-agent" in r
               for r in bed.control.api.refusals)  # fmt: skip

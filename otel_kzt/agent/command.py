"""`otel-kzt agent`: flags, and wiring datapath, metadata, exporter and the interval loop together.

Every flag has a YAML twin in `--config` (the flag name with `_` for `-`; `--no-pin` is `pin: false`);
flags win, then the file, then the environment (`NODE_NAME`, `OTEL_EXPORTER_OTLP_*`). The actions
`--cleanup` and `--print-bpf` are flags only. SIGTERM/SIGINT (any number of them, `otel_kzt.signals`):
one final export, exit 0; the pinned datapath keeps counting for the next process unless `--no-pin`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from otel_kzt import gctune, logformat
from otel_kzt.agent import heap
from otel_kzt.agent.config import DATAPATHS, PROTOCOLS, AgentConfig, from_values
from otel_kzt.agent.datapath.pins import DEFAULT_PIN_ROOT
from otel_kzt.agent.health import Health, metadata_state
from otel_kzt.configfile import load_yaml, merge
from otel_kzt.errors import KztError
from otel_kzt.serving.limits import split_host_port
from otel_kzt.signals import StopSignals

if TYPE_CHECKING:
    from otel_kzt.agent.state import BpffsReceiverStore

log = logging.getLogger(__name__)

# Flags that act instead of configuring: no YAML twin.
_ACTIONS = ("config", "cleanup", "print_bpf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", metavar="FILE", help="YAML file with any of the options below (flags win)")
    add("--node-name", help="this node's Kubernetes name (env NODE_NAME)")
    add(
        "--no-pin",
        dest="pin",
        action="store_const",
        const=False,
        help="detach the datapath on exit instead of keeping it pinned for the next process",
    )
    add("--pin-root", help=f"bpffs directory of the pins (default {DEFAULT_PIN_ROOT})")
    add("--cleanup", action="store_true", help="detach and unpin this node's datapath, then exit")
    add("--print-bpf", action="store_true", help="print the final eBPF C source and exit")
    add(
        "--otlp-endpoint",
        help="receiver URL(s), comma separated; a name may resolve to several "
        "(env OTEL_EXPORTER_OTLP_ENDPOINT, default http://localhost:4317)",
    )
    add("--otlp-protocol", choices=PROTOCOLS, help="grpc (default) or http/protobuf")
    add("--otlp-headers", help="key=value[,key=value] request headers (env OTEL_EXPORTER_OTLP_HEADERS)")
    add("--otlp-compression", help="none or gzip")
    add("--otlp-timeout", help="per-request timeout, e.g. 10s")
    add(
        "--otlp-certificate",
        metavar="PEM",
        help="CA bundle to verify the receiver's TLS certificate (re-read when it changes)",
    )
    add(
        "--otlp-bearer-token-file",
        metavar="FILE",
        help="send `authorization: Bearer <file content>` (re-read when it changes)",
    )
    add(
        "--otlp-insecure",
        action="store_const",
        const=True,
        help="plaintext gRPC for endpoints written without a scheme",
    )
    add("--otlp-max-points-per-request", type=int, help="split larger exports (default 20000)")
    add("--otlp-max-request-bytes", type=int, help="split larger exports (default 3 MiB)")
    add("--interval", help="export interval (default 10s)")
    add("--idle-timeout", help="evict flows idle this long, after a final export (default 5m)")
    add("--kube-metadata", metavar="FILE", help="Kubernetes List of Nodes and Pods instead of the API")
    add("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then $KUBECONFIG)")
    add("--cluster-name", help="k8s.cluster.name resource attribute")
    add("--map-size", type=int, help="flow map capacity (default 65536)")
    add(
        "--datapath",
        choices=DATAPATHS,
        help="where packets are counted: auto (default: netfilter where it attaches, else tc), netfilter, "
        "tc (device egress), cgroup (socket egress)",
    )
    add(
        "--tc-devices",
        help="tc: devices to hook, comma separated, patterns allowed (default: uplinks, overlays)",
    )
    add("--cgroup-root", help="cgroup: the cgroup v2 directory (default: the host's cgroup2 mount)")
    add("--ephemeral-ports", help="port range never recorded (default 32768-65535)")
    add(
        "--health-endpoint",
        metavar="HOST:PORT",
        help='/healthz, /readyz and the agent\'s own /metrics (default 0.0.0.0:9465; "" disables)',
    )
    add("--log-format", choices=logformat.FORMATS, help="text (default) or json: one object a line")
    add("--overlay-ports", help="UDP ports of overlay encapsulation not exported (default 4789,8472,6081)")


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> AgentConfig:
    """Flags over YAML over environment; raises ConfigError naming the field."""
    file_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    flags: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in _ACTIONS and k not in {"command", "log_level"}
    }
    return from_values(merge(file_values, flags), environ)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    logformat.configure(config.log_format)
    from otel_kzt.agent.datapath import DatapathConfig, cleanup, printable

    if args.cleanup:
        cleanup(config.node_name, config.pin_root)
        log.info("datapath removed: node=%s pin_root=%s", config.node_name, config.pin_root)
        return 0
    datapath_config = DatapathConfig(
        config.node_name,
        pin=config.pin,
        map_size=config.map_size,
        ephemeral_min=config.ephemeral_ports[0],
        ephemeral_max=config.ephemeral_ports[1],
        pin_root=config.pin_root,
        tc_devices=config.tc_devices,
        cgroup_root=config.cgroup_root,
    )
    if args.print_bpf:
        sys.stdout.write(printable(datapath_config, config.datapath).bpf_source())
        return 0
    with StopSignals() as signals, ExitStack() as stack:
        _serve(config, datapath_config, signals.stop, stack)
    return 0


def _serve(config: AgentConfig, datapath_config: Any, stop: threading.Event, stack: ExitStack) -> None:
    from otel_kzt.agent import coverage
    from otel_kzt.agent.datapath import start_datapath
    from otel_kzt.agent.datapath.bpffs import require_host_bpffs
    from otel_kzt.agent.export import Exporter
    from otel_kzt.agent.local import LocalFlows
    from otel_kzt.agent.service import AgentService
    from otel_kzt.agent.vipbytes import ServiceVipBytes

    if config.pin:
        require_host_bpffs(config.pin_root)  # refused before anything starts: pins that would not last
    heap.keep_big_blocks_mapped()
    gctune.space_collections()  # ~1M long-lived objects at 100,000 flows

    health = Health(config.interval_s)
    health.add_check("datapath", lambda: "not attached yet (compiling, loading, attaching)")
    _start_health_port(config, health, stack)  # answers while the datapath loads: alive, not ready
    store = _receiver_store(config, stack)  # opened first: the datapath's start may reset the node's pins
    try:
        datapath = start_datapath(datapath_config, config.datapath)  # a failed start undoes itself
    except BaseException:
        if store is not None:
            store.withdraw()  # and the state it pinned for this start goes too
        raise
    stack.callback(datapath.close)  # pinned: detaches nothing; --no-pin: detaches
    health.add_check("datapath", lambda: None if datapath.attached else "not attached")
    if store is not None:
        store.repin()
    else:  # --no-pin, once started: a start that fails leaves an earlier run's choice as it was
        _discard_receiver_store(config)
    heap.release_freed()
    cgroup = datapath.config.mode == "cgroup"  # counts at the socket: sees Service VIPs (vipbytes.py)
    handle = _open_metadata(config, service_vips=cgroup)
    index = None
    if handle is not None:
        stack.callback(handle.shutdown)
        handle.start()
        index = handle.index
    health.add_check("metadata", lambda: None if (state := metadata_state(index))[0] else state[1])
    exporter = Exporter(config.otlp, config.node_name, store=store)
    stack.callback(exporter.close)
    local = LocalFlows(config.node_name, index, overlay_ports=config.overlay_ports)
    service = AgentService(
        config,
        datapath,
        exporter,
        local,
        index,
        host_name=socket.gethostname(),
        health=health,
        datapath=datapath.config.mode,
        coverage=coverage.for_datapath(datapath, index, config.node_name),
        vips=ServiceVipBytes(index.services, time.time_ns()) if cgroup and index is not None else None,
        devices=datapath,  # tc: hooks devices that appear while it runs (no counts in the other modes)
    )
    log.info(
        "agent running: node=%s endpoints=%s protocol=%s interval_s=%g pin=%s",
        config.node_name,
        ",".join(config.otlp.endpoints),
        config.otlp.protocol,
        config.interval_s,
        config.pin,
    )
    service.run(stop)


def _start_health_port(config: AgentConfig, health: Health, stack: ExitStack) -> None:
    """/healthz, /readyz, /metrics on --health-endpoint; a port in use fails the start (exit 1)."""
    if not config.health_endpoint:
        return
    from otel_kzt.agent.healthport import HealthPort

    host, port = split_host_port(config.health_endpoint, "health_endpoint")
    server = HealthPort(host, port, health)
    try:
        bound = server.start()
    except OSError as exc:
        raise KztError(f"cannot serve --health-endpoint {config.health_endpoint}: {exc.strerror}") from exc
    stack.callback(server.shutdown)
    log.info("health endpoint: address=%s port=%d", host, bound)


def _receiver_store(config: AgentConfig, stack: ExitStack) -> BpffsReceiverStore | None:
    """The pinned store of the receiver choice; None with --no-pin, when nothing may outlive the process."""
    from otel_kzt.agent.state import open_node_store

    if not config.pin:
        return None
    store = open_node_store(config.node_name, config.pin_root)
    if store is not None:
        stack.callback(store.close)
    return store


def _discard_receiver_store(config: AgentConfig) -> None:
    """--no-pin stores no choice, so an earlier run's would be stale for the next pinned run."""
    from otel_kzt.agent.state import discard_node_store

    discard_node_store(config.node_name, config.pin_root)


def _open_metadata(config: AgentConfig, *, service_vips: bool) -> Any:
    """The node-scoped metadata source (with every Service's cluster IPs when `service_vips`), or None
    when none is configured or discoverable."""
    from otel_kzt.k8s import open_metadata

    explicit = config.kube_metadata or config.kubeconfig
    if not explicit and not (os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get("KUBECONFIG")):
        log.warning("no Kubernetes metadata configured: only the node's own addresses are exported")
        return None
    return open_metadata(
        config.kube_metadata,
        node_name=config.node_name,
        kubeconfig=config.kubeconfig,
        service_vips=service_vips,
    )

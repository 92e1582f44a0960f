"""The blind-datapath check: does the datapath see what this node's pods send?

A CNI that moves pod packets past the hook (Cilium eBPF host routing or netkit, Calico eBPF, pods bridged
without br_netfilter) leaves the agent running and counting nothing for pods, with nothing to say so. Each
interval this check compares what the datapath counted with what the kernel's interface counters say was
sent, and gives a coverage ratio (`kzt.agent.datapath.coverage_ratio`, 0..1):

- `netfilter`, `cgroup`: bytes counted from local pods (flows the agent exports with a pod as source, plus
  the overflow bucket) against what the pods' host-side devices (veth/netkit with the peer in another
  network namespace) received from them, less their Ethernet headers;
- `tc`: bytes counted at all (every flow, the overflow bucket) against what the hooked devices sent, less
  their link headers. What a pod sends to its own node or to another pod on it never reaches a hooked
  device: `tc` does not see same-node traffic by design, and this comparison does not expect it to.

No verdict (NaN) while the pods (or the hooked devices) sent too little to judge, on the first interval
(a baseline), and where pods cannot be told apart (no Kubernetes metadata). Below `BLIND_BELOW` the check
logs a WARNING naming the modes to try; the `KztAgentDatapathBlind` alert fires when that lasts 10 minutes.
Known limits: `netfilter` does not see pods talking to their own node (local delivery never passes
POSTROUTING); a node whose pods mostly do that reads low, though rarely below one half.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

BLIND_BELOW = 0.5
MIN_BYTES = 64 * 1024  # per interval: below this, pods sent too little to judge
MIN_PACKETS = 64
POD_DEVICE_KINDS = frozenset({"veth", "netkit"})
# Bytes of link header per packet in the interface counters, by iproute2's link_type.
LINK_HEADER = {"ether": 14, "none": 0, "ipip": 0, "sit": 0, "tunnel6": 0, "gre": 0, "ip6gre": 0}
REPEAT_WARNING_S = 600.0


@dataclass(frozen=True, slots=True)
class Traffic:
    """Cumulative IP-level bytes and packets of a set of devices in one direction."""

    bytes: int
    packets: int


def link_stats() -> list[dict[str, Any]]:
    """`ip -j -s -d link show` of this network namespace: kinds, peers and counters in one call."""
    try:
        out = subprocess.run(
            ["ip", "-j", "-s", "-d", "link", "show"], check=True, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot read interface counters: error=%s", exc)
        return []
    result = json.loads(out or "[]")
    return result if isinstance(result, list) else []


def _ip_level(link: Mapping[str, Any], direction: str) -> Traffic:
    stats = (link.get("stats64") or link.get("stats") or {}).get(direction) or {}
    nbytes, packets = int(stats.get("bytes", 0)), int(stats.get("packets", 0))
    header = LINK_HEADER.get(str(link.get("link_type", "ether")), 14)
    return Traffic(max(0, nbytes - header * packets), packets)


def pod_sent(links: Iterable[Mapping[str, Any]], uplinks: Collection[str]) -> Traffic:
    """What local pods sent: received by the host side of every pod device (peer in another netns)."""
    total_bytes = total_packets = 0
    for link in links:
        kind = str((link.get("linkinfo") or {}).get("info_kind", ""))
        if kind in POD_DEVICE_KINDS and "link_netnsid" in link and link.get("ifname") not in uplinks:
            traffic = _ip_level(link, "rx")
            total_bytes += traffic.bytes
            total_packets += traffic.packets
    return Traffic(total_bytes, total_packets)


def devices_sent(links: Iterable[Mapping[str, Any]], devices: Collection[str]) -> Traffic:
    """What the named devices transmitted."""
    total_bytes = total_packets = 0
    for link in links:
        if link.get("ifname") in devices:
            traffic = _ip_level(link, "tx")
            total_bytes += traffic.bytes
            total_packets += traffic.packets
    return Traffic(total_bytes, total_packets)


class CoverageCheck:
    """One per agent; `observe()` once per interval with the datapath's cumulative counted bytes."""

    def __init__(
        self,
        mode: str,
        *,
        uplinks: Callable[[], Collection[str]],
        links: Callable[[], list[dict[str, Any]]] = link_stats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self._uplinks = uplinks  # tc: the hooked devices; else the devices that are not pods'
        self._links = links
        self._clock = clock
        self._previous: tuple[int, Traffic] | None = None
        self._blind_since: float | None = None
        self._warned_at = -math.inf
        self.ratio = math.nan  # the last verdict, NaN when there is none

    def observe(self, counted_bytes: int | None) -> float:
        """`counted_bytes`: cumulative bytes the datapath counted from pods (tc: counted at all), or None
        when pods cannot be told apart. Returns (and keeps in `ratio`) this interval's coverage."""
        if counted_bytes is None:
            self._previous, self.ratio = None, math.nan
            return self.ratio
        links = self._links()
        uplinks = set(self._uplinks())
        sent = devices_sent(links, uplinks) if self.mode == "tc" else pod_sent(links, uplinks)
        previous, self._previous = self._previous, (counted_bytes, sent)
        if previous is None:
            self.ratio = math.nan
            return self.ratio
        seen = counted_bytes - previous[0]
        sent_bytes, sent_packets = sent.bytes - previous[1].bytes, sent.packets - previous[1].packets
        if sent_bytes < MIN_BYTES or sent_packets < MIN_PACKETS or seen < 0:
            self.ratio = math.nan  # too little to judge, or the counters restarted (a device went)
            return self.ratio
        self.ratio = min(1.0, seen / sent_bytes)
        self._report(seen, sent_bytes)
        return self.ratio

    def _report(self, seen: int, sent: int) -> None:
        now = self._clock()
        if self.ratio >= BLIND_BELOW:
            if self._blind_since is not None:
                log.info(
                    "datapath sees the pods' traffic again: mode=%s coverage=%.2f", self.mode, self.ratio
                )
            self._blind_since = None
            return
        if self._blind_since is None:
            self._blind_since = now
        if now - self._warned_at >= REPEAT_WARNING_S:
            self._warned_at = now
            what = "the hooked devices sent" if self.mode == "tc" else "local pods sent"
            log.warning(
                "datapath blind: %s %d bytes this interval, the %s datapath counted %d (coverage %.2f); "
                "the CNI moves packets past its hook: try %s",
                what,
                sent,
                self.mode,
                seen,
                self.ratio,
                _advice(self.mode),
            )


def _advice(mode: str) -> str:
    others = {"netfilter": "--datapath cgroup (or tc)", "tc": "--datapath cgroup", "cgroup": "--datapath tc"}
    return others.get(mode, "another --datapath")

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

A verdict needs evidence: until the pods (or the hooked devices) sent `MIN_BYTES` and `MIN_PACKETS` since
the last one, the span simply grows (bursty pods are judged over several intervals). The last verdict is
what the gauge shows, for `HOLD_S` at most; none (no series) on the first interval (a baseline), when it
grew old, and where pods cannot be told apart (no Kubernetes metadata). Below `BLIND_BELOW` the check logs a
WARNING naming the modes to try; the `KztAgentDatapathBlind` alert fires when that lasts 10 minutes.
Counted bytes are cumulative: live flows, plus the final values of evicted ones (`Counted`), plus the
overflow bucket. Known limits: `netfilter` does not see pods talking to their own node (local delivery
never passes POSTROUTING); a node whose pods mostly do that reads low, though rarely below one half.
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

from otel_kzt.errors import DatapathError

log = logging.getLogger(__name__)

BLIND_BELOW = 0.5
MIN_BYTES = 64 * 1024  # per interval: below this, pods sent too little to judge
MIN_PACKETS = 64
POD_DEVICE_KINDS = frozenset({"veth", "netkit"})
# Bytes of link header per packet in the interface counters, by iproute2's link_type.
LINK_HEADER = {"ether": 14, "none": 0, "ipip": 0, "sit": 0, "tunnel6": 0, "gre": 0, "ip6gre": 0}
REPEAT_WARNING_S = 600.0
HOLD_S = 300.0  # a verdict older than this (pods went quiet) is no longer shown
UPLINKS_REFRESH_S = 60.0  # which devices are uplinks (or hooked) is re-read this often


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


@dataclass(slots=True)
class Counted:
    """What the datapath counted, as the check compares it: cumulative bytes of live flows from local pods
    and of all flows (the interval loop sums them as it walks the snapshot), plus what was evicted."""

    pods: int = 0  # flows whose source is a pod of this node
    everything: int = 0
    evicted_pods: int = 0  # final values of evicted flows, added once each (they leave the live sums)
    evicted_everything: int = 0


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
        self._uplink_names: frozenset[str] = frozenset()
        self._uplinks_at = -math.inf
        self._links = links
        self._clock = clock
        self._previous: tuple[int, Traffic] | None = None  # the start of the span being judged
        self._sampled: list[dict[str, Any]] | None = None
        self._credit = 0  # bytes counted ahead of the devices' counters at the last verdict
        self._verdict_at = -math.inf
        self._blind_since: float | None = None
        self._warned_at = -math.inf
        self.ratio = math.nan  # the last verdict, NaN when there is none (or it grew old)

    def sample(self) -> None:
        """Read the interface counters now: call it right before the datapath's snapshot, so that what
        the devices had and what the datapath counted are read a snapshot's time apart."""
        self._sampled = self._links()

    def observe_counted(self, counted: Counted, overflow_bytes: int, pods_known: bool) -> float:
        """`observe` on what the interval loop summed: all flows (tc) or local pods' flows, plus overflow.
        `pods_known`: metadata has synced (else pods cannot be told apart)."""
        if self.mode == "tc":
            return self.observe(counted.everything + counted.evicted_everything + overflow_bytes)
        if not pods_known:
            return self.observe(None)
        return self.observe(counted.pods + counted.evicted_pods + overflow_bytes)

    def observe(self, counted_bytes: int | None) -> float:
        """`counted_bytes`: cumulative bytes the datapath counted from pods (tc: counted at all), or None
        when pods cannot be told apart. Returns (and keeps in `ratio`) the coverage shown now."""
        now = self._clock()
        links, self._sampled = self._sampled if self._sampled is not None else self._links(), None
        if counted_bytes is None:
            self._previous, self.ratio, self._credit = None, math.nan, 0
            return self.ratio
        if now - self._uplinks_at >= UPLINKS_REFRESH_S:
            self._uplink_names, self._uplinks_at = frozenset(self._uplinks()), now
        uplinks = self._uplink_names
        sent = devices_sent(links, uplinks) if self.mode == "tc" else pod_sent(links, uplinks)
        previous = self._previous
        if now - self._verdict_at > HOLD_S:
            self.ratio = math.nan
        if previous is None:
            self._previous = (counted_bytes, sent)
            return self.ratio
        seen = counted_bytes - previous[0]
        sent_bytes, sent_packets = sent.bytes - previous[1].bytes, sent.packets - previous[1].packets
        if seen < 0 or sent_bytes < 0 or sent_packets < 0:
            # The counters restarted (a datapath reset, a device or a pod gone): judge from here.
            self._previous, self._credit = (counted_bytes, sent), 0
            return self.ratio
        if sent_bytes < MIN_BYTES or sent_packets < MIN_PACKETS:
            return self.ratio  # too little to judge yet: the span grows
        # Packets that reach the datapath between the counters' read and the snapshot are counted in
        # this span and sent in the next: what this span itself saw beyond what was sent is credited to
        # the next one. Only this span's own excess: wire-exact counting of GSO packets exceeds the
        # per-skb device bytes for good, and must not pile up into a credit that hides a blind datapath.
        credit, self._credit = self._credit, max(0, seen - sent_bytes)
        seen += credit
        self._previous = (counted_bytes, sent)
        self._verdict_at = now
        self.ratio = min(1.0, seen / sent_bytes)
        self._report(seen, sent_bytes, now)
        return self.ratio

    def _report(self, seen: int, sent: int, now: float) -> None:
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
                "datapath blind: %s %d bytes, the %s datapath counted %d (coverage %.2f); "
                "the CNI moves packets past its hook: try %s",
                what,
                sent,
                self.mode,
                seen,
                self.ratio,
                _advice(self.mode),
            )


def for_datapath(datapath: Any, index: Any, node_name: str) -> CoverageCheck:
    """The check for a started `Datapath`: tc compares with the devices it hooked; the other modes with the
    pods' devices, which are the veth/netkit devices that are not uplinks (a route off the node, or the
    Node object's own address: on a node wired by veth, as in the demo and the tests, the uplink is one)."""
    from otel_kzt.agent.datapath import devices

    mode = datapath.config.mode
    if mode == "tc":
        return CoverageCheck(mode, uplinks=lambda: [d.name for d in datapath.mode.hooked])

    def uplinks() -> list[str]:
        node = index.node(node_name) if index is not None else None
        addresses = list(node.addresses) if node is not None else []
        try:
            return [d.name for d in devices.discover(node_addresses=addresses)]
        except DatapathError as exc:
            log.warning("cannot tell uplinks from pod devices: error=%s", exc)
            return []

    return CoverageCheck(mode, uplinks=uplinks)


def _advice(mode: str) -> str:
    others = {"netfilter": "--datapath cgroup (or tc)", "tc": "--datapath cgroup", "cgroup": "--datapath tc"}
    return others.get(mode, "another --datapath")

"""Network-namespace primitives for the demo and the kernel tests: named netns, veth pairs, routes.

Everything goes through iproute2 (`ip`) and `nsenter`, as root. Commands run inside a namespace with
`nsenter --net=/run/netns/<name>`, not `ip netns exec`: the latter remounts /sys, which hides the root
bpffs and the datapath's pins under /sys/fs/bpf.

`Topology` is the safe way to build a test network: it records everything it creates and removes it in
reverse order on exit, also when the body raised.

    with Topology() as topo:
        topo.netns("kd-node")
        topo.netns("kd-pod")
        topo.veth("kd-node", "kdn0", "kd-pod", "eth0", a_addrs=["10.9.0.1/24"], b_addrs=["10.9.0.2/24"])
        topo.route("kd-pod", "default", via="10.9.0.1")
        run_in("kd-pod", ["ping", "-c1", "10.9.0.1"])
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from otel_kzt.errors import KztError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
IFNAME_MAX = 15  # IFNAMSIZ - 1
CLONE_NEWNET = 0x40000000


class NetnsError(KztError):
    """An `ip` / `nsenter` command failed; carries the command and its stderr."""


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside network namespace `ns` (None: the caller's namespace)."""
    if ns is None:
        return list(argv)
    return ["nsenter", f"--net={netns_path(ns)}", *argv]


def _check(argv: Sequence[str], timeout: float = 30.0) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ip(ns: str | None, *args: str) -> str:
    """Run `ip ARGS` inside `ns` (None: here); raises NetnsError on failure."""
    return _check(ns_argv(ns, ["ip", *args]))


def run_in(
    ns: str | None, argv: Sequence[str], timeout: float = 60.0, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command inside `ns` and wait for it (text mode, output captured)."""
    proc = subprocess.run(
        ns_argv(ns, argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} in netns {ns}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def popen_in(ns: str | None, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a command inside `ns` without waiting (the caller owns the process)."""
    return subprocess.Popen(ns_argv(ns, argv), **kwargs)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into netns `name` for the block, and back afterwards.

    For in-process work bound to a namespace at creation time (a netfilter BPF link attaches in the
    namespace of the thread that creates it); sockets created inside stay in that namespace.
    """
    target = os.open(netns_path(name), os.O_RDONLY)
    try:
        with entered_fd(target):
            yield
    finally:
        os.close(target)


@contextmanager
def entered_fd(target: int) -> Iterator[None]:
    """`entered` by an open namespace fd (`/proc/thread-self/ns/net` kept from earlier: a datapath going
    back to the namespace it started in); the fd stays the caller's."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create_netns(name: str) -> None:
    """Create a named netns with loopback up."""
    ip(None, "netns", "add", name)
    ip(name, "link", "set", "lo", "up")
    # No duplicate address detection: a tentative link-local address stalls neighbour discovery
    # for the first packets, which tests and the demo would see as loss.
    for key in ("net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"):
        _check(ns_argv(name, ["sysctl", "-q", "-w", key]))


def delete_netns(name: str) -> None:
    """Delete a named netns (its veth ends go with it); a missing one is fine."""
    if netns_exists(name):
        ip(None, "netns", "delete", name)


def _is_v6(cidr: str) -> bool:
    return ipaddress.ip_interface(cidr).version == 6


def add_address(ns: str | None, ifname: str, cidr: str) -> None:
    """Add an address; IPv6 ones skip duplicate address detection so they are usable at once."""
    extra = ["nodad"] if _is_v6(cidr) else []
    ip(ns, "addr", "add", cidr, "dev", ifname, *extra)


def create_veth(
    ns_a: str | None,
    if_a: str,
    ns_b: str | None,
    if_b: str,
    *,
    a_addrs: Iterable[str] = (),
    b_addrs: Iterable[str] = (),
) -> None:
    """A veth pair with one end in each namespace, addresses set and both ends up."""
    for name in (if_a, if_b):
        if len(name) > IFNAME_MAX:
            raise NetnsError(f"interface name {name!r} is longer than {IFNAME_MAX} characters")
    # The peer is born in its own namespace, so a name taken in ns_a (eth0 ...) does not collide.
    peer_ns = [] if ns_b == ns_a else ["netns", ns_b if ns_b else "1"]
    ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, *peer_ns)
    for ns, ifname, addrs in ((ns_a, if_a, a_addrs), (ns_b, if_b, b_addrs)):
        for cidr in addrs:
            add_address(ns, ifname, cidr)
        ip(ns, "link", "set", ifname, "up")


def delete_link(ns: str | None, ifname: str) -> None:
    """Delete an interface (a veth takes its peer with it); a missing one is fine."""
    try:
        ip(ns, "link", "delete", ifname)
    except NetnsError as exc:
        if "Cannot find device" not in str(exc) and "Cannot open network namespace" not in str(exc):
            raise


def add_route(
    ns: str | None, dest: str, via: str | None = None, dev: str | None = None, family: int | None = None
) -> None:
    """Add a route; `dest` may be `default` (then `family` 4/6, or the family of `via`)."""
    if family is None:
        family = 6 if (via and ":" in via) or ":" in dest else 4
    args = ["-6" if family == 6 else "-4", "route", "add", dest]
    if via:
        args += ["via", via]
    if dev:
        args += ["dev", dev]
    ip(ns, *args)


def enable_forwarding(ns: str | None) -> None:
    """Turn the namespace into a router for IPv4 and IPv6."""
    for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        _check(ns_argv(ns, ["sysctl", "-q", "-w", key]))


class Topology:
    """Builds a network of namespaces and veths; `close()` (or leaving the `with`) undoes it in reverse."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def on_close(self, what: str, undo: Callable[[], None]) -> None:
        """Register an extra clean-up step (a process to stop, a pin to remove ...)."""
        self._undo.append((what, undo))

    def netns(self, name: str) -> str:
        """Create a named netns (a stale one of the same name, left by a crash, is replaced)."""
        delete_netns(name)
        create_netns(name)
        self.on_close(f"netns {name}", lambda: delete_netns(name))
        return name

    def veth(
        self,
        ns_a: str | None,
        if_a: str,
        ns_b: str | None,
        if_b: str,
        *,
        a_addrs: Iterable[str] = (),
        b_addrs: Iterable[str] = (),
    ) -> None:
        create_veth(ns_a, if_a, ns_b, if_b, a_addrs=a_addrs, b_addrs=b_addrs)
        self.on_close(f"veth {if_a}", lambda: delete_link(ns_a, if_a))

    def route(
        self,
        ns: str | None,
        dest: str,
        via: str | None = None,
        dev: str | None = None,
        family: int | None = None,
    ) -> None:
        # Routes die with their interface or namespace: nothing to undo.
        add_route(ns, dest, via, dev, family)

    def close(self) -> None:
        """Undo everything, newest first; one failing step does not stop the others."""
        errors: list[str] = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep going: leaving the rest behind would be worse
                log.warning("topology clean-up failed what=%s error=%s", what, exc)
                errors.append(f"{what}: {exc}")
        if errors:
            raise NetnsError("topology clean-up failed: " + "; ".join(errors))

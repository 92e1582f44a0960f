"""NodeLocal DNS in the end-to-end bed: a DNS server on every node answering the pods' queries over UDP.

Real DNS wire format (RFC 1035: header, question, one answer), so the sizes on the wire are a real
resolver's. The server answers Service names (`<svc>.<ns>.svc.cluster.local`) with their cluster IPs, as
CoreDNS behind node-local-dns does; one socket per listening address, so a reply leaves from the address
the pod asked (node-local-dns binds 169.254.20.10 and, in iptables mode, the kube-dns cluster IP).
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import struct
import threading
from collections.abc import Mapping

from otel_kzt.demo.traffic import enter_netns, run_in_netns

PORT = 53
_HEADER = struct.Struct("!HHHHHH")
TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"


def build_query(ident: int, name: str, qtype: int) -> bytes:
    return _HEADER.pack(ident, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


def _question(msg: bytes) -> tuple[str, int, int]:
    """(name, qtype, end offset) of the first question."""
    labels, at = [], _HEADER.size
    while msg[at]:
        labels.append(msg[at + 1:at + 1 + msg[at]].decode())
        at += 1 + msg[at]
    qtype, _qclass = struct.unpack_from("!HH", msg, at + 1)
    return ".".join(labels), qtype, at + 5


def answer(query: bytes, records: Mapping[str, tuple[str, ...]]) -> bytes:
    """The response to `query`: its address of the asked family, or NXDOMAIN."""
    ident, _flags, _qd, _an, _ns, _ar = _HEADER.unpack_from(query)
    name, qtype, end = _question(query)
    family = 4 if qtype == TYPE_A else 6
    found = [a for a in records.get(name, ()) if ipaddress.ip_address(a).version == family]
    flags = 0x8180 if name in records else 0x8183  # response, recursion desired + available; rcode
    out = _HEADER.pack(ident, flags, 1, len(found), 0, 0) + query[_HEADER.size:end]
    for address in found:
        rdata = ipaddress.ip_address(address).packed
        out += struct.pack("!HHHIH", 0xC00C, qtype, CLASS_IN, 30, len(rdata)) + rdata
    return out


def resolve(netns: str, server: str, name: str, qtype: int = TYPE_A, ident: int = 0x4B5A) -> list[str]:
    """One query from `netns` to `server`; the addresses answered (checks the reply matches)."""
    def body() -> list[str]:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5.0)
            sock.sendto(build_query(ident, name, qtype), (server, PORT))
            reply, peer = sock.recvfrom(4096)
        got_id, _flags, _qd, count, _ns, _ar = _HEADER.unpack_from(reply)
        if got_id != ident or peer[0] != server:
            raise AssertionError(f"DNS reply {got_id:#x} from {peer[0]} to query {ident:#x} to {server}")
        _name, _qtype, at = _question(reply)
        addresses = []
        for _ in range(count):
            size = struct.unpack_from("!H", reply, at + 10)[0]
            addresses.append(str(ipaddress.ip_address(reply[at + 12:at + 12 + size])))
            at += 12 + size
        return addresses

    return run_in_netns(netns, body)


class DnsServer:
    """UDP DNS answering on `addresses` inside `netns` until `stop()` (safe twice, or before start)."""

    def __init__(self, netns: str, addresses: tuple[str, ...],
                 records: Mapping[str, tuple[str, ...]]) -> None:
        self.netns, self.addresses, self.records = netns, addresses, records
        self.answered = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=f"dns-{self.netns}", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None or not self._ready.is_set():
            self.stop()
            raise RuntimeError(f"DNS server in {self.netns} did not start: {self._error}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        socks: list[socket.socket] = []
        try:
            enter_netns(self.netns)
            for address in self.addresses:
                sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind((address, PORT))
                sel.register(sock, selectors.EVENT_READ)
        except BaseException as exc:  # reported by start()
            self._error = exc
            for sock in socks:
                sock.close()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    server = socks[[s.fileno() for s in socks].index(key.fd)]
                    query, peer = server.recvfrom(4096)
                    server.sendto(answer(query, self.records), peer)
                    self.answered += 1
        finally:
            sel.close()
            for sock in socks:
                sock.close()

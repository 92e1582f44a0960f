"""Small traffic generators the kernel tests run inside pod namespaces (nsenter + python3 traffic.py).

Standard library only. Each prints one JSON line on stdout describing what it did, so the test can
compare the datapath against what was really sent.

    udp DST PORT COUNT SIZE [--sport P]     COUNT datagrams of SIZE payload bytes
    udp-ports DST FIRST_PORT N SIZE         one datagram to each of N destination ports
    udp-dstopts DST PORT COUNT SIZE         IPv6 with a destination-options extension header
    icmp DST COUNT SIZE                     echo requests (raw socket), waits for the replies
    tcp-serve PORT                          accept connections forever, discard what arrives
    tcp-send DST PORT NBYTES [DSTOPTS]      one connection sending NBYTES, then a clean close; over IPv6
                                            every packet with a DSTOPTS-byte destination-options header
    tcp-connects DST PORT N                 N short connections (aborted with RST: no TIME_WAIT)
    udp-stream DST PORT SECONDS SIZE NFLOWS round-robin over NFLOWS destination ports until SECONDS
    udp-gso DST PORT COUNT SIZE SEGMENT     COUNT sends of SIZE bytes with UDP_SEGMENT (one GSO packet each)
    udp-tagged DEV MAC SRC DST PORT COUNT SIZE TAGS
                                            COUNT UDP datagrams as Ethernet frames to MAC on DEV (a packet
                                            socket) behind VLAN tags TAGS ("88a8:4000,8100:6000": TPID:TCI)
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import time


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def udp(dst: str, port: int, count: int, size: int, sport: int = 0) -> dict[str, int]:
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
        sock.bind(("", sport))
        for _ in range(count):
            sock.sendto(b"u" * size, (dst, port))
        return {"sent": count, "sport": sock.getsockname()[1]}


def udp_ports(dst: str, first: int, n: int, size: int) -> dict[str, int]:
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
        for port in range(first, first + n):
            sock.sendto(b"p" * size, (dst, port))
        return {"sent": n}


def _dstopts(sock: socket.socket, length: int) -> None:
    """Every packet of `sock` carries a destination-options header of `length` bytes (a multiple of 8):
    next header (the kernel fills it in), its length in 8-byte units after the first 8, then one option
    (type, data length, zeros) filling the rest: PadN where that is at most 7 bytes, as receivers allow
    no more padding (RFC 4942; Linux drops the packet), else an experimental one to skip (0x1E)."""
    fill = length - 2
    option = 1 if fill <= 7 else 0x1E
    header = bytes([0, length // 8 - 1, option, fill - 2]) + bytes(fill - 2)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, header)


def udp_dstopts(dst: str, port: int, count: int, size: int) -> dict[str, int]:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        _dstopts(sock, 8)
        for _ in range(count):
            sock.sendto(b"d" * size, (dst, port))
        return {"sent": count}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp(dst: str, count: int, size: int) -> dict[str, int]:
    v6 = ":" in dst
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    replies = 0
    with socket.socket(_family(dst), socket.SOCK_RAW, proto) as sock:
        sock.settimeout(2.0)
        for seq in range(count):
            kind = 128 if v6 else 8  # echo request; the kernel computes the ICMPv6 checksum itself
            header = struct.pack("!BBHHH", kind, 0, 0, 0x4B44, seq)
            payload = b"i" * size
            if not v6:
                header = struct.pack("!BBHHH", kind, 0, _checksum(header + payload), 0x4B44, seq)
            sock.sendto(header + payload, (dst, 0))
            replies += _await_reply(sock, v6, seq)
    return {"sent": count, "replies": replies}


def _await_reply(sock: socket.socket, v6: bool, seq: int) -> int:
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        data = sock.recv(65535)
        icmp_part = data if v6 else data[(data[0] & 0x0F) * 4 :]
        kind, _code, _sum, ident, got = struct.unpack("!BBHHH", icmp_part[:8])
        if kind == (129 if v6 else 0) and ident == 0x4B44 and got == seq:
            return 1
    return 0


def tcp_serve(port: int) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("::", port))
        srv.listen(4096)
        print(json.dumps({"listening": port}), flush=True)
        while True:
            conn, _peer = srv.accept()
            with conn, contextlib.suppress(ConnectionResetError):  # tcp-connects aborts with RST
                while conn.recv(1 << 16):
                    pass


def tcp_send(dst: str, port: int, nbytes: int, dstopts: int = 0) -> dict[str, int]:
    with socket.socket(_family(dst), socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        if dstopts:  # before connect: TCP's MSS leaves room for it (tcp_v6_connect)
            _dstopts(sock, dstopts)
        sock.connect((dst, port))
        chunk = b"t" * 65536
        left = nbytes
        while left > 0:
            sock.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the server's close, so every packet has passed
        return {"sent": nbytes, "sport": sock.getsockname()[1]}


def tcp_connects(dst: str, port: int, n: int) -> dict[str, int]:
    ports = set()
    linger = struct.pack("ii", 1, 0)  # close with RST: thousands of connections, no TIME_WAIT
    for _ in range(n):
        with socket.socket(_family(dst), socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect((dst, port))
            ports.add(sock.getsockname()[1])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    return {"connections": n, "distinct_client_ports": len(ports)}


def udp_stream(dst: str, first_port: int, seconds: float, size: int, nflows: int) -> dict[str, int]:
    sent = 0
    deadline = time.monotonic() + seconds
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
        while time.monotonic() < deadline:
            for port in range(first_port, first_port + nflows):
                sock.sendto(b"s" * size, (dst, port))
            sent += nflows
    return {"sent": sent}


UDP_SEGMENT = 103  # linux/udp.h: the socket's sends leave as datagrams of at most this many bytes


def udp_gso(dst: str, port: int, count: int, size: int, segment: int) -> dict[str, int]:
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, segment)
        for _ in range(count):
            sock.sendto(b"g" * size, (dst, port))
        return {"sent": count, "datagrams": count * -(-size // segment)}


def udp_tagged(args: list[str]) -> dict[str, int]:
    """Frames built whole (the kernel adds no tag of its own without a VLAN device): IPv4 with its header
    checksum and no UDP checksum, IPv6 with the UDP checksum over its pseudo-header."""
    dev, mac, src, dst, tags = args[0], args[1], args[2], args[3], args[7]
    port, count, size = map(int, args[4:7])
    v6 = ":" in src
    family = socket.AF_INET6 if v6 else socket.AF_INET
    saddr, daddr = socket.inet_pton(family, src), socket.inet_pton(family, dst)
    payload = b"t" * size
    udp_len = 8 + size
    if v6:
        pseudo = saddr + daddr + struct.pack("!IxxxB", udp_len, 17)
        csum = _checksum(pseudo + struct.pack("!HHHH", 40000, port, udp_len, 0) + payload) or 0xFFFF
        ip = struct.pack("!IHBB", 6 << 28, udp_len, 17, 64) + saddr + daddr
        ethertype = 0x86DD
    else:
        csum = 0
        head = struct.pack("!BBHHHBBH", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0) + saddr + daddr
        ip = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
        ethertype = 0x0800
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((dev, 0))
        own = sock.getsockname()[4]
        eth = bytes.fromhex(mac.replace(":", "")) + own
        for tag in filter(None, tags.split(",")):
            tpid, tci = (int(x, 16) for x in tag.split(":"))
            eth += struct.pack("!HH", tpid, tci)
        frame = eth + struct.pack("!H", ethertype) + ip + struct.pack("!HHHH", 40000, port, udp_len, csum)
        for _ in range(count):
            sock.send(frame + payload)
    return {"sent": count}


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "tcp-serve":
        tcp_serve(int(args[0]))
        return
    handlers = {
        "udp": lambda: udp(args[0], *map(int, args[1:])),
        "udp-ports": lambda: udp_ports(args[0], int(args[1]), int(args[2]), int(args[3])),
        "udp-dstopts": lambda: udp_dstopts(args[0], int(args[1]), int(args[2]), int(args[3])),
        "icmp": lambda: icmp(args[0], int(args[1]), int(args[2])),
        "tcp-send": lambda: tcp_send(args[0], *map(int, args[1:])),
        "tcp-connects": lambda: tcp_connects(args[0], int(args[1]), int(args[2])),
        "udp-gso": lambda: udp_gso(args[0], *map(int, args[1:])),
        "udp-tagged": lambda: udp_tagged(args),
        "udp-stream": lambda: udp_stream(args[0], int(args[1]), float(args[2]), int(args[3]), int(args[4])),
    }
    print(json.dumps(handlers[cmd]()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

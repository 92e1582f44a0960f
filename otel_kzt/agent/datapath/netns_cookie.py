"""The calling thread's network namespace as the kernel's never-reused cookie: pinned links are adopted
only in the namespace they were attached in (after a crash the node's namespace may have been re-created,
and a link of a gone namespace counts nothing). Every mode's attachment is per namespace."""

from __future__ import annotations

import socket

SO_NETNS_COOKIE = 71  # Linux >= 5.14: a 64-bit id of a network namespace, never reused


def current_netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")

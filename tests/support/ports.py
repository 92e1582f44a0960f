"""Ports for test servers that a test must name before the server binds them: never one handed out twice.

Binding port 0 and closing returns a port from `ip_local_port_range` (32768-60999): the kernel may hand the
same port to the next `bind(0)` of this session (a second server named before the first one bound it) or
to any outgoing connection of the machine before the server binds it; stop 19's CI lost a test to that
(EADDRINUSE in an enricher started on a "free" port). These come from below the ephemeral range, where
nothing picks ports on its own, each one once per session, and only after a bind shows it is not in use.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading

LOW, HIGH = (
    21_000,
    32_000,
)  # below ip_local_port_range's 32768 (tests/e2e keeps 20,4xx for fixed source ports)

_lock = threading.Lock()
# A start of its own per process, so two test sessions on one machine rarely walk the same ports.
_next = itertools.count(os.getpid() * 7919 % (HIGH - LOW))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` ("" = every address) that no one holds now and this session never gave out."""
    for _ in range(HIGH - LOW):
        with _lock:
            port = LOW + next(_next) % (HIGH - LOW)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left by a test is no hold
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LOW}-{HIGH} on {host!r}")

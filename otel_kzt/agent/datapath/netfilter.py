"""The datapath's two netfilter links (IPv4, IPv6): attach, or adopt the pinned ones of a previous agent.

A link is adopted only when it runs the current dispatcher in the calling thread's network namespace
(the caller decides, comparing what it recorded in the pinned `meta` map); otherwise a new link is
attached first and the old one detached after, so for a moment both run (a packet may be counted twice)
rather than neither (a packet missed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from otel_kzt.agent import netfilter

log = logging.getLogger(__name__)

LINK_PRIORITY = netfilter.NF_IP_PRI_NAT_SRC - 1  # ahead of source NAT: pods keep their own address
SO_NETNS_COOKIE = 71  # Linux >= 5.14: a 64-bit id of a network namespace, never reused


def current_netns_cookie() -> int:
    """The calling thread's network namespace, as the kernel's never-reused cookie."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def attach_or_adopt(dispatch_fd: int, pf: int, path: str | None, *, adopt: bool) -> int:
    """A link fd for `pf` running the dispatcher; `path` is its pin (None: not pinned)."""
    old_fd = -1
    if path is not None:
        with contextlib.suppress(FileNotFoundError):  # nothing pinned yet: a first start
            old_fd = netfilter.obj_get(path)
    if old_fd >= 0 and adopt:
        log.info("link adopted pin=%s", path)
        return old_fd
    priority = LINK_PRIORITY
    if old_fd >= 0 and netfilter.link_info(old_fd).priority == LINK_PRIORITY:
        priority = LINK_PRIORITY - 1  # the kernel refuses two links at one (pf, hook, priority)
    fd = netfilter.link_create_netfilter(dispatch_fd, pf, priority)
    if old_fd >= 0 and path is not None:
        netfilter.link_detach(old_fd)
        os.close(old_fd)
        os.unlink(path)
    if path is not None:
        netfilter.obj_pin(fd, path)
    log.info("link attached pf=%d priority=%d pin=%s", pf, priority, path)
    return fd

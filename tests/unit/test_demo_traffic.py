"""The demo's request/response protocol: exactly the sizes asked for travel each way."""

from __future__ import annotations

import socket
import threading

from otel_kzt.demo.traffic import _HEADER, request, serve_connection


def test_request_and_response_sizes_are_exact() -> None:
    client, server = socket.socketpair()
    client.settimeout(5)  # a short answer fails instead of hanging
    worker = threading.Thread(target=serve_connection, args=(server,))
    worker.start()
    with client:
        for req, resp in ((8, 0), (100, 1), (5_000, 200_000), (70_000, 3)):
            request(client, req, resp)  # reads exactly `resp` bytes
        client.shutdown(socket.SHUT_WR)
        trailing = client.recv(16)  # then the server's close, and not one byte more
    worker.join(5)
    assert not worker.is_alive()
    assert trailing == b""


def test_header_counts_towards_the_request_size() -> None:
    client, server = socket.socketpair()
    with client, server:
        request_thread = threading.Thread(target=request, args=(client, 1_000, 0))
        request_thread.start()
        data = b""
        while len(data) < 1_000:
            data += server.recv(4096)
        request_thread.join(5)
        assert len(data) == 1_000  # 8-byte header + 992 bytes of padding
        assert _HEADER.unpack(data[: _HEADER.size]) == (0, 1_000 - _HEADER.size)

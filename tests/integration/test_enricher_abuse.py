"""Load and abuse against the running service: hundreds of stalled connections, many concurrent near-limit
bodies, a scrape storm (which shares one exposition rebuild a second). Each time a normal client is still
answered, every request gets an answer, memory stays under the stated bound, and the service is healthy
afterwards. Latencies belong to the bench.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from otel_kzt.enricher.config import ExporterConfig
from otel_kzt.enricher.service import EnricherService
from tests.integration.test_enricher_badinput import PB, drained, post
from tests.integration.test_enricher_http_wire import request, values
from tests.integration.test_enricher_service import (
    Downstream,
    api_pki,
    downstream,
    enricher_kubeconfig,
    get,
    running,
    served_config,
)

__all__ = ["api_pki", "downstream", "enricher_kubeconfig"]
LIMIT = 4 << 20
BUDGET = 16 << 20
# Peak RSS growth allowed while 24 clients post near-limit bodies: the budget, the decoded copies of what it
# admits, the clients' own buffers (shared here) and allocator slack. Without a budget it is 24 x 4 MiB x 3.
RSS_BOUND = 160 << 20


def rss() -> int:
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.fixture
def abused(enricher_kubeconfig: Path, downstream: Downstream) -> Iterator[EnricherService]:
    exporter = ExporterConfig(f"127.0.0.1:{downstream.port}", max_elapsed_s=5.0)
    config = served_config(
        enricher_kubeconfig, exporters=(exporter,), max_request_bytes=LIMIT, max_inflight_bytes=BUDGET
    )
    with running(config) as svc:
        yield svc


def healthy(service: EnricherService) -> bool:
    return get(f"http://127.0.0.1:{service.ports['metrics']}/healthz")[0] == 200


@pytest.mark.integration
def test_hundreds_of_stalled_connections_do_not_block_a_normal_client(
    abused: EnricherService, downstream: Downstream
) -> None:
    port = abused.ports["http"]
    stalled: list[socket.socket] = []
    try:
        for i in range(300):  # no request, a partial head, or a head and a trickle of body
            sock = socket.create_connection(("127.0.0.1", port))
            stalled.append(sock)
            if i % 3 == 1:
                sock.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-")
            elif i % 3 == 2:
                sock.sendall(
                    f"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: {PB}\r\n"
                    "Content-Length: 100000\r\n\r\nabc".encode()
                )
        assert post(port, request(51))[0] == 200  # the client's own timeout (10 s) is the bound
        assert values(drained(downstream, 1)) == [51]
    finally:
        for sock in stalled:
            sock.close()
    assert healthy(abused)


@pytest.mark.integration
def test_concurrent_near_limit_bodies_are_each_answered_in_bounded_memory(abused: EnricherService) -> None:
    port = abused.ports["http"]
    body = b"\x0a" + b"\xff" * (LIMIT - 16)  # near the limit, undecodable: 400 once admitted
    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss())

    def send(_: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", "/v1/metrics", body=body, headers={"Content-Type": PB})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(send, range(24)))
    finally:
        done.set()
        sampler.join()
    assert set(statuses) <= {400, 503} and 400 in statuses, statuses  # each answered, none reset
    assert peak[0] - before < RSS_BOUND, f"RSS grew {(peak[0] - before) >> 20} MiB"
    assert healthy(abused) and post(port, request(61))[0] == 200


@pytest.mark.integration
def test_scrape_storm_does_not_starve_the_receivers_and_shares_one_rebuild_a_second(
    abused: EnricherService,
) -> None:
    metrics = f"http://127.0.0.1:{abused.ports['metrics']}/metrics"
    stop = threading.Event()
    scrapes: list[int] = []  # every scrape's status (an assert in a scraper thread would fail nothing)

    def scrape() -> None:
        while not stop.is_set():
            try:
                scrapes.append(get(metrics)[0])
            except OSError:  # refused, reset, timed out: no answer
                scrapes.append(0)

    storm = [threading.Thread(target=scrape, name=f"scraper-{i}") for i in range(8)]
    began = time.monotonic()
    for thread in storm:
        thread.start()
    try:  # every request answered while the storm goes on
        answers = [post(abused.ports["http"], request(70 + i))[0] for i in range(40)]
    finally:
        stop.set()
        for thread in storm:
            thread.join(30)
    elapsed = time.monotonic() - began
    assert answers == [200] * 40 and scrapes and set(scrapes) == {200}
    assert abused.exposition.rebuilds <= elapsed + 2  # one rebuild a second, however many scrapes
    assert healthy(abused)

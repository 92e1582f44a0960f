"""The receivers under load and abuse, timed: the real `otel-kzt enricher` process, default limits.

- stalled: 300 connections that never finish a request head (or a body), then a normal client's requests;
- near-limit: 16 clients posting 60 MiB bodies at once (what once got connections reset unanswered): every
  one is answered (200/400 or 503 + Retry-After when the 256 MiB in-flight budget is full), peak RSS;
- scrape storm: 8 clients scraping /metrics back to back while one client posts OTLP requests.
Latencies are printed (p50 / max); the tests check only that everything is answered.

    .venv/bin/python bench/enricher_abuse.py
"""

from __future__ import annotations

import http.client
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.enricher_cluster import enricher_process, free_port, metadata, proc_hwm, wait_ready
from tests.integration.test_enricher_http_wire import request

PB = "application/x-protobuf"


def post(port: int, body: bytes, timeout: float = 120) -> tuple[int | str, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/metrics", body=body, headers={"Content-Type": PB})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    except OSError as exc:  # a reset or a timeout: no answer
        return type(exc).__name__, time.perf_counter() - t0
    finally:
        conn.close()


def spread(latencies: list[float]) -> str:
    return f"p50 {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"


def stalled(port: int) -> None:
    socks = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
            socks.append(sock)
        answers = [post(port, request(i + 1)) for i in range(20)]
    finally:
        for sock in socks:
            sock.close()
    print(
        f"  300 stalled connections; a normal client's 20 requests: {sorted({a for a, _ in answers})}, "
        f"{spread([t for _, t in answers])}"
    )


def near_limit(port: int, pid: int) -> None:
    body = b"\x0a" + b"\xff" * (60 * 2**20)  # 60 MiB, undecodable once admitted: 400
    before = proc_hwm(pid)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post(port, body), range(16)))
    codes = {c: sum(1 for a, _ in answers if a == c) for c in {a for a, _ in answers}}
    print(
        f"  16 clients x 60 MiB at once: answers {codes}, {spread([t for _, t in answers])}; "
        f"enricher peak RSS {proc_hwm(pid) / 2**20:.0f} MiB (before: {before / 2**20:.0f} MiB)"
    )


def scrape_storm(port: int, metrics_port: int) -> None:
    stop, scrapes = threading.Event(), [0]

    def scrape() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=60)
            conn.request("GET", "/metrics")
            conn.getresponse().read()
            conn.close()
            scrapes[0] += 1

    storm = [threading.Thread(target=scrape) for _ in range(8)]
    for thread in storm:
        thread.start()
    t0 = time.perf_counter()
    try:
        answers = [post(port, request(100 + i)) for i in range(50)]
    finally:
        stop.set()
        for thread in storm:
            thread.join()
    rate = scrapes[0] / (time.perf_counter() - t0)
    print(
        f"  scrape storm (8 scrapers, {rate:.0f} scrapes/s); 50 OTLP requests: "
        f"{sorted({a for a, _ in answers})}, {spread([t for _, t in answers])}"
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kzt-bench-") as tmp:
        metadata(Path(tmp) / "cluster.json", 4)
        http_port, metrics_port = free_port(), free_port()
        enricher = enricher_process(
            Path(tmp) / "cluster.json",
            "--grpc-endpoint", "", "--http-endpoint", f"127.0.0.1:{http_port}",
            "--metrics-endpoint", f"127.0.0.1:{metrics_port}",
        )  # fmt: skip
        try:
            wait_ready(metrics_port)
            print(
                "receivers under abuse (enricher process, default limits: 64 MiB requests, 256 MiB in flight)"
            )
            stalled(http_port)
            near_limit(http_port, enricher.pid)
            scrape_storm(http_port, metrics_port)
            answer = post(http_port, request(999))[0]
            print(f"  afterwards: a normal request answered {answer}")
        finally:
            enricher.terminate()
            enricher.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

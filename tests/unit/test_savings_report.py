"""`otel-kzt report`: the table and the JSON, and exit 1 when the source cannot be read."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from otel_kzt import cli, schema
from otel_kzt.k8s.servicemodel import ClusterVersion
from otel_kzt.savings.engine import Engine
from otel_kzt.savings.jsonform import report_from_json, report_to_json
from otel_kzt.savings.model import Direction, Report, ServiceState, Workload, flow_key
from otel_kzt.savings.render import render
from tests.support.ports import free_port

WEB, API = Workload("shop", "Deployment", "web"), Workload("shop", "Deployment", "api")


def _report(until: int = 20) -> Report:
    """web (a, c) -> api (endpoints in a, b) at 1 MB/s from each zone; at t=11 api is set to
    PreferSameZone, after which a's clients stay in a (c has no endpoint: it still crosses)."""
    engine = Engine(window_s=10.0)
    keys = [
        flow_key(WEB, "a", API, "b", service=("shop", "api"), direction=Direction.FROM),
        flow_key(WEB, "c", API, "a", service=("shop", "api"), direction=Direction.FROM),
    ]
    api = ServiceState("shop", "api", "ClusterIP", schema.ROUTING_NONE, {"a": 1, "b": 1})
    db = ServiceState("shop", "postgres", "ClusterIP", schema.ROUTING_HEADLESS, {"a": 1})
    pg = Workload("shop", "StatefulSet", "postgres")
    db_key = flow_key(API, "b", pg, "a", service=("shop", "postgres"), direction=Direction.FROM)
    version = ClusterVersion(1, 34, "v1.34.2")
    for t in range(until + 1):
        state = api if t < 11 else dataclasses.replace(api, routing="PreferSameZone")
        crossing = (min(t, 11), t)  # seconds of crossing traffic: a's until the change, c's throughout
        totals = {k: (1e6 * n, 1e6 * n * 1e-11) for k, n in zip(keys, crossing, strict=True)}
        totals[db_key] = (2e5 * t, 2e5 * t * 1e-11)
        report = engine.update(float(t), {api.key: state, db.key: db}, totals, version)
    return report


def test_table_names_recommendation_evidence_and_before_after() -> None:
    before = render(_report(until=10), "http://enricher:9464", width=200)
    assert "otel-kzt savings report from http://enricher:9464" in before
    assert "Kubernetes v1.34.2: recommending PreferSameZone" in before
    assert "prefer-same-zone" in before and "kubectl -n shop patch service api" in before
    assert "spread-endpoints" in before and "in c" in before
    assert "from a -> b: 10.0 MB" in before  # evidence: direction, zone pair, bytes over the window
    text = render(_report(), "http://enricher:9464", width=200)
    assert "prefer-same-zone" not in text and "spread-endpoints" in text
    assert "none -> PreferSameZone" in text
    assert "2.0 MB/s" in text and "1.0 MB/s" in text and "50% less" in text
    assert "headless Service" in text  # postgres: why nothing is recommended
    assert "\x1b[" not in text  # no colour codes unless asked


def test_table_when_savings_are_off() -> None:
    off = Report(5.0, False, "list services: HTTP 403 Forbidden", 3600.0, 0.0, "", "")
    text = render(off, "x")
    assert "savings are off: list services: HTTP 403 Forbidden" in text


class _Serve(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        code = 200 if self.path == "/api/v1/savings" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body if code == 200 else b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def enricher_url() -> Iterator[str]:
    _Serve.body = json.dumps(report_to_json(_report())).encode()
    server = HTTPServer(("127.0.0.1", 0), _Serve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_report_command_json(enricher_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--enricher", enricher_url, "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert report_from_json(data) == _report()


def test_report_command_table(enricher_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--enricher", enricher_url]) == 0
    assert "spread-endpoints" in capsys.readouterr().out


def test_unreadable_source_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["report", "--enricher", url]) == 1
    assert f"cannot read {url}/api/v1/savings" in capsys.readouterr().err


def test_wrong_layout_exits_1(enricher_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _Serve.body = b'{"enabled": true}'
    assert cli.main(["report", "--enricher", enricher_url]) == 1
    assert "savings.generated_at: expected float" in capsys.readouterr().err

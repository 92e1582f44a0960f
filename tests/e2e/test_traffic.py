"""The traffic engine in real namespaces: a server that cannot listen is an error, not silence."""

from __future__ import annotations

import pytest

from otel_kzt.demo.runner import ClusterRun
from otel_kzt.demo.traffic import Engine, TrafficError
from otel_kzt.demo.workloads import Listener
from tests.e2e.conftest import TEST_PORT

pytestmark = pytest.mark.kernel


def test_port_taken_is_reported(e2e: ClusterRun) -> None:
    pod = e2e.cluster.routed_pods()[0]
    engine = Engine((Listener(pod.netns, TEST_PORT, pod.name),), ())  # the session's engine holds it
    with pytest.raises(TrafficError, match=rf"servers did not start: {pod.name} port {TEST_PORT}"):
        engine.start()
    engine.stop()  # safe after a failed start


def test_missing_namespace_is_reported(e2e: ClusterRun) -> None:
    engine = Engine((Listener("kz-absent", TEST_PORT, "ghost"),), ())
    with pytest.raises(TrafficError, match="ghost"):
        engine.start()

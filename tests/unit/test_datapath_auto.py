"""`--datapath auto` on kernels that lack netfilter links: it falls back to tc, logs why, and when nothing
can run it raises one error naming every reason; an explicit mode is started as asked."""

from __future__ import annotations

import logging

import pytest

from otel_kzt.agent.datapath import auto
from otel_kzt.agent.datapath.core import DatapathConfig
from otel_kzt.errors import KernelUnsupported, PrivilegeError


class Started:
    def __init__(self, config: DatapathConfig) -> None:
        self.config = config


def fake_start(refuse: dict[str, Exception]) -> object:
    def start(config: DatapathConfig) -> Started:
        if config.mode in refuse:
            raise refuse[config.mode]
        return Started(config)

    return start


def test_auto_prefers_netfilter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auto, "_started", fake_start({}))
    assert auto.start_datapath(DatapathConfig("n1"), "auto").config.mode == "netfilter"  # type: ignore[attr-defined]


def test_auto_falls_back_to_tc_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_links = KernelUnsupported("kernel has no netfilter BPF programs/links (Linux >= 6.4 needed)")
    monkeypatch.setattr(auto, "_started", fake_start({"netfilter": no_links}))
    caplog.set_level(logging.INFO, logger="otel_kzt.agent.datapath.auto")
    assert auto.start_datapath(DatapathConfig("n1"), "auto").config.mode == "tc"  # type: ignore[attr-defined]
    assert "datapath auto: using tc (netfilter: kernel has no netfilter BPF programs/links" in caplog.text


def test_nothing_runs_one_error_names_each_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = {"netfilter": KernelUnsupported("no netfilter links"), "tc": KernelUnsupported("no clsact")}
    monkeypatch.setattr(auto, "_started", fake_start(refuse))
    with pytest.raises(
        KernelUnsupported, match="no datapath can run here: netfilter: no netfilter links; tc: no clsact"
    ):
        auto.start_datapath(DatapathConfig("n1"), "auto")


def test_an_explicit_mode_is_not_replaced_and_privilege_errors_stop_auto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auto, "_started", fake_start({"cgroup": KernelUnsupported("no cgroup links")}))
    with pytest.raises(KernelUnsupported, match="no cgroup links"):
        auto.start_datapath(DatapathConfig("n1"), "cgroup")
    monkeypatch.setattr(auto, "_started", fake_start({"netfilter": PrivilegeError("needs root")}))
    with pytest.raises(PrivilegeError):  # every mode would fail alike: no fallback
        auto.start_datapath(DatapathConfig("n1"), "auto")

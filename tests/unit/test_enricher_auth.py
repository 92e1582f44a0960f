"""The bearer check: constant-time comparison against every token of the (re-read) token file."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import pytest

from otel_kzt.enricher.receivers.auth import BearerCheck
from otel_kzt.errors import ConfigError


def test_every_line_of_the_token_file_is_accepted_and_changes_are_seen(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("new\n\n  old  \n")
    check = BearerCheck(token_file=str(token))
    assert check.required
    assert check.accepts("Bearer new") and check.accepts("Bearer old")
    assert not check.accepts("Bearer ne") and not check.accepts("new") and not check.accepts(None)
    token.write_text("newer\n")
    os.utime(token, ns=(1, 1))  # a different stat signature, whatever the clock's resolution
    check._file._checked -= 2.0  # type: ignore[union-attr]  # past the once-a-second re-check
    assert check.accepts("Bearer newer") and not check.accepts("Bearer old")


def test_no_token_accepts_everything_and_an_empty_file_is_a_config_error(tmp_path: Path) -> None:
    assert BearerCheck().accepts(None) and not BearerCheck().required
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="bearer_token_file"):
        BearerCheck(token_file=str(empty))


def test_tokens_are_compared_in_constant_time_against_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison is `hmac.compare_digest`, once per accepted token and with no early exit, so neither
    a token's bytes nor which line matched shows in the answer's timing (an `==` would pass the tests
    above)."""
    token = tmp_path / "token"
    token.write_text("first\nsecond\n")
    check = BearerCheck(token_file=str(token))
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert check.accepts("Bearer first")
    assert compared == [(b"first", b"first"), (b"first", b"second")]

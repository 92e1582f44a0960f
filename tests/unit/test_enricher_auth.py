"""The bearer check: constant-time comparison against every token of the (re-read) token file."""

from __future__ import annotations

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

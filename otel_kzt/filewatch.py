"""Files that are re-read when they change: bearer tokens and TLS certificates, for agent and enricher.

Why: cert-manager renews a certificate (and an operator rotates a token) by updating a Secret; kubelet
swaps the mounted files atomically (a new `..data` symlink target). A process that read them once keeps
the old certificate until it expires and then every agent fails. So every user of these files asks
`WatchedFiles.current()` when it needs them (a TLS handshake, a request), which re-checks the files' stat
signature at most once per `check_every_s` and re-reads them all together when any changed. A change that
cannot be read or used (a half-written pair) keeps the previous contents and is tried again later.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, Generic, TypeVar

from otel_kzt.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")
CHECK_EVERY_S: Final = 1.0
Signature = tuple[tuple[int, int, int, int], ...]


def _signature(paths: Sequence[str]) -> Signature:
    out = []
    for path in paths:
        st = os.stat(path)  # follows the Secret volume's symlinks: a swap changes the inode
        out.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_all(paths: Sequence[str]) -> tuple[bytes, ...]:
    contents = []
    for path in paths:
        with open(path, "rb") as fh:
            contents.append(fh.read())
    return tuple(contents)


class WatchedFiles(Generic[T]):
    """`load(contents)` of a few files, kept current; `load` may raise ValueError for unusable contents.

    The first read happens in the constructor and raises ConfigError naming `field`: a file that is missing
    at start is a configuration error, one that goes missing later is a warning (the old value stays).
    """

    def __init__(
        self,
        paths: Sequence[str],
        load: Callable[[tuple[bytes, ...]], T],
        field: str,
        check_every_s: float = CHECK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths, self._load, self._field = tuple(paths), load, field
        self._every, self._clock = check_every_s, clock
        self._lock = threading.Lock()
        self.reloads = 0
        try:
            self._signature = _signature(self._paths)
            self._value = load(read_all(self._paths))
        except OSError as exc:
            raise ConfigError(field, f"cannot read {exc.filename}: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(field, f"cannot use {', '.join(self._paths)}: {exc}") from exc
        self._checked = clock()

    def current(self) -> T:
        """The value of the files as they are now (re-checked at most once per `check_every_s`)."""
        now = self._clock()
        if now - self._checked < self._every:
            return self._value
        with self._lock:
            if now - self._checked >= self._every:
                self._checked = now
                self._refresh()
            return self._value

    def _refresh(self) -> None:
        try:
            signature = _signature(self._paths)
            if signature == self._signature:
                return
            value = self._load(read_all(self._paths))
        except (OSError, ValueError) as exc:
            log.warning("cannot reload, keeping the previous contents: field=%s error=%s", self._field, exc)
            return
        self._value, self._signature = value, signature
        self.reloads += 1
        log.info("reloaded: field=%s files=%s", self._field, ",".join(self._paths))


def token_lines(contents: tuple[bytes, ...]) -> tuple[str, ...]:
    """A token file's tokens, one a line (blank lines and surrounding whitespace ignored); none is unusable.

    Several lines make a rotation without a refusal: a receiver accepts every line, a sender sends the first,
    so the new token is added below the old one until every receiver has it, then goes first until every
    sender has moved, and only then is the old one removed (deploy/README.md)."""
    tokens = tuple(line.strip() for line in contents[0].decode().splitlines() if line.strip())
    if not tokens:
        raise ValueError("the token file is empty")
    return tokens


def token_text(contents: tuple[bytes, ...]) -> str:
    """The token a sender sends: the first of `token_lines`."""
    return token_lines(contents)[0]

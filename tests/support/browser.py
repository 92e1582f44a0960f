"""Headless Chromium (Debian's `chromium`) for the web view's tests: the DOM after the page's scripts ran,
and screenshots. Each call gets a fresh profile directory, removed afterwards."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from tests.conftest import require

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-extensions", "--mute-audio")  # fmt: skip
# Virtual time the page gets to run its scripts (fetch, draw) before the DOM is taken.
BUDGET_MS = 4000


def chromium() -> str:
    path = shutil.which("chromium")
    require(path is not None, "chromium is not installed (scripts/setup.sh installs Debian's)")
    assert path is not None
    return path


def _run(args: list[str], timeout_s: float = 120.0) -> str:
    profile = tempfile.mkdtemp(prefix="kzt-chromium-")
    try:
        proc = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def dump_dom(url: str) -> str:
    return _run([f"--virtual-time-budget={BUDGET_MS}", "--dump-dom", url])


def screenshot(url: str, path: Path, size: tuple[int, int] = (1400, 1100)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            f"--virtual-time-budget={BUDGET_MS}",
            f"--window-size={size[0]},{size[1]}",
            "--hide-scrollbars",
            f"--screenshot={path}",
            url,
        ]
    )
    return path


class Elements(HTMLParser):
    """Every element's tag, attributes and text (direct and nested), in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in ("meta", "link", "br", "img", "input"):
            self._open.append(len(self.found) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self.found[self._open.pop()][0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for i in self._open:
            self.found[i][2].append(data)

    def select(self, tag: str, css_class: str) -> list[tuple[dict[str, str], str]]:
        return [
            (attrs, "".join(text).strip())
            for t, attrs, text in self.found
            if t == tag and css_class in attrs.get("class", "").split()
        ]


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser

"""The live terminal view: a heat map and the savings panel, redrawn in place on a terminal only."""

from __future__ import annotations

import io
import os
import pty
import select
import threading
import time

from otel_kzt.demo.live import Keys, Screen, heat_map, savings, screen
from otel_kzt.demo.session import plain
from otel_kzt.demo.view import frame, parse
from otel_kzt.savings.model import Report


def _scrape(zone_ab: float, taken: float):  # type: ignore[no-untyped-def]
    return parse("# TYPE kzt_zone_traffic_bytes counter\n"
                 'kzt_zone_traffic_bytes_total{source_cloud_availability_zone="a",'
                 f'destination_cloud_availability_zone="b"}} {zone_ab}\n'
                 'kzt_zone_traffic_bytes_total{source_cloud_availability_zone="a",'
                 f'destination_cloud_availability_zone="a"}} {zone_ab / 2}\n', taken)


def test_heat_map_colours_by_rate() -> None:
    fr = frame(_scrape(0, 0.0), _scrape(4000, 2.0))
    out = io.StringIO()
    from rich.console import Console

    Console(file=out, force_terminal=True, color_system="truecolor", width=100).print(heat_map(fr.zone_rates))
    text = out.getvalue()
    assert "2.0 kB/s" in text and "1.0 kB/s" in text
    assert "48;2;200;40;30" in text  # the busiest crossing cell: full red background
    assert "48;2;" in text.split("1.0 kB/s")[0].rsplit("\n", 1)[-1]  # the diagonal is shaded too (green)


def test_plain_frame_has_no_escape_codes() -> None:
    fr = frame(_scrape(0, 0.0), _scrape(4000, 2.0))
    text = plain(screen(fr, None, "title", "http://127.0.0.1:9464/metrics", "hint"))
    assert "\x1b[" not in text and "Zone x zone" in text and "waiting for the enricher" in text
    assert "Web view: http://127.0.0.1:9464/" in text


def test_savings_panel_off() -> None:
    off = Report(1.0, False, "list services: HTTP 403", 60.0, 0.0, "", "")
    assert "Savings are off: list services: HTTP 403" in plain(savings(off, "h"))


def test_screen_appends_plain_frames_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Screen(out) as scr:
        assert not scr.live_mode
        scr.show(savings(None, "h"), "frame one")
        scr.show(savings(None, "h"), "frame two")
    assert out.getvalue() == "\nframe one\n\nframe two\n"


def test_keys_read_single_presses_from_a_terminal_and_restore_it() -> None:
    leader, follower = pty.openpty()
    stream = os.fdopen(follower, "r", closefd=False)
    try:
        import termios

        before = termios.tcgetattr(follower)
        stop = threading.Event()
        with Keys(active=True, stream=stream) as keys:
            assert keys.enabled
            assert keys.wait(0.01, stop) is None
            os.write(leader, b"a")
            assert keys.wait(2.0, stop) == "a"  # no Enter needed (cbreak)
            stop.set()
            started = time.monotonic()
            assert keys.wait(30.0, stop) is None and time.monotonic() - started < 5  # a signal ends the wait
        assert termios.tcgetattr(follower) == before
        with Keys(active=False, stream=stream) as keys:
            assert not keys.enabled and keys.wait(30.0, stop) is None
    finally:
        stream.close()
        os.close(leader)
        os.close(follower)


def test_screen_redraws_in_place_on_a_terminal() -> None:
    leader, follower = pty.openpty()
    out = os.fdopen(follower, "w", closefd=False)
    try:
        with Screen(out) as scr:
            assert scr.live_mode
            scr.show(savings(None, "h"), "frame one")
            scr.show(savings(Report(1.0, False, "off for a test", 60.0, 0.0, "", ""), "h"), "frame two")
        out.flush()
        written = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if not ready:
                break
            written += os.read(leader, 65536)
        text = written.decode(errors="replace")
        assert "frame one" not in text  # the plain frames are for pipes only
        assert "waiting for the enricher" in text and "off for a test" in text
        assert "\x1b[1A" in text or "\x1b[A" in text or "\x1b[2K" in text  # the cursor goes back up: redrawn
    finally:
        out.close()
        os.close(leader)
        os.close(follower)

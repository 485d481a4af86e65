"""Progress reporters: plain lines when piped, rich bars on a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from hypeman_images.build.progress import PlainReporter, RichReporter
from hypeman_images.oci.digest import Digest

LAYER = Digest.of(b"layer")


def test_plain_lines_say_each_event_once() -> None:
    out = io.StringIO()
    reporter = PlainReporter(out)
    reporter.stage("pulling", "x")
    reporter.start(LAYER, 2048, cached=False)
    reporter.done(LAYER)
    for n in (10, 20, 100, 100):
        reporter.converted(n, 100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "pulling: x"
    assert lines[1] == f"layer {LAYER.short}: downloading 2.0 KiB"
    assert lines.count("converting: 100 B of 100 B") == 1


def test_rich_bars_draw_to_a_terminal() -> None:
    screen = io.StringIO()
    reporter = RichReporter(Console(file=screen, force_terminal=True, width=100))
    reporter.stage("pulling", "x")
    reporter.start(LAYER, 1 << 20, cached=False)
    reporter.advance(LAYER, 1 << 19)
    reporter.converted(50, 100)
    reporter.close()
    assert LAYER.short in screen.getvalue()
    assert "converting" in screen.getvalue()

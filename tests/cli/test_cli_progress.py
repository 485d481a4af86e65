"""Progress as a user sees it: on a terminal (replayed by ``support.terminal``) and in a pipe.

Same units in both; names and digests drawn as plain text; every bar at
100 % once the image is ready; a cached layer says ``cached``. And Ctrl-C
during a pull leaves the store telling the truth.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from support.pushed import PushedImage
from support.service import CLI
from support.terminal import run_in_terminal, screen

BAR_ROW = re.compile(r"^(\S+) +━+(╸?)(━*) +([\d.]+)/([\d.]+) (\S+)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def bar_rows(lines: list[str]) -> dict[str, re.Match[str]]:
    return {m[1]: m for line in lines if (m := BAR_ROW.match(line))}


def test_the_terminal_and_the_pipe_count_in_the_same_units(
    alpine_ref: PushedImage, tmp_path: Path
) -> None:
    drawn = run_in_terminal([CLI, "pull", "--data-dir", str(tmp_path / "a"), alpine_ref.ref])
    piped = run("pull", "--data-dir", str(tmp_path / "b"), alpine_ref.ref)
    assert drawn.code == piped.returncode == 0
    layer = alpine_ref.image.layers[0].digest[7:19]
    rows = bar_rows(drawn.lines)
    assert rows[layer][6] == rows["converting"][6] == "MiB"
    assert re.search(r"MiB/s", "\n".join(drawn.lines))
    assert not re.search(r"\d (kB|MB|GB)\b", drawn.drawn), "no decimal units on the terminal"
    assert re.search(rf"^layer {layer}: downloading [\d.]+ MiB$", piped.stderr, re.M)
    assert re.search(r"^converting: [\d.]+ MiB of [\d.]+ MiB$", piped.stderr, re.M)
    # One layer is "1 layer", on both.
    assert "converting: 1 layer → ext4" in piped.stderr
    assert "converting 1 layer → ext4" in drawn.lines


def test_bars_end_at_100_percent_and_names_are_plain_text(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    drawn = run_in_terminal([CLI, "pull", "--data-dir", str(data_dir), alpine_ref.ref])
    assert drawn.code == 0
    rows = bar_rows(drawn.lines)
    assert len(rows) == 2  # the layer and the conversion
    for name, row in rows.items():
        assert row[2] == "" and row[4] == row[5], f"{name} ends short of 100 %: {row[0]}"
    # Names and digests are drawn whole: no colour or bold starts inside them.
    short = alpine_ref.manifest_digest[7:19]
    assert f"pulling\x1b[0m {alpine_ref.ref} ({short})\r\n" in drawn.drawn
    assert f"ready\x1b[0m {alpine_ref.ref} ({short})\r\n" in drawn.drawn
    assert f"\r\n{alpine_ref.image.layers[0].digest[7:19]} \x1b[" in drawn.drawn


def test_a_cached_layer_says_cached(alpine_ref: PushedImage, data_dir: Path) -> None:
    d = ("--data-dir", str(data_dir))
    assert run("pull", *d, alpine_ref.ref).returncode == 0
    assert run("rm", *d, alpine_ref.ref).returncode == 0  # the blobs stay until gc
    drawn = run_in_terminal([CLI, "pull", *d, alpine_ref.ref])
    assert drawn.code == 0
    layer = alpine_ref.image.layers[0].digest[7:19]
    (row,) = [line for line in drawn.lines if line.startswith(layer)]
    assert row.endswith(" cached") and not re.search(r"\d:\d\d:\d\d|/s\b", row), row
    # The raw drawing never showed a running clock on that row either.
    assert not re.search(rf"{layer} [^\r\n]*\d:\d\d:\d\d", drawn.drawn)
    assert run("rm", *d, alpine_ref.ref).returncode == 0
    piped = run("pull", *d, alpine_ref.ref)
    assert f"layer {layer}: cached" in piped.stderr.splitlines()


@pytest.mark.parametrize("stage", ["pulling", "mke2fs"])
def test_ctrl_c_during_a_pull_records_it_and_draws_each_row_once(
    alpine_ref: PushedImage, data_dir: Path, stage: str
) -> None:
    """SIGINT to the process group, as Ctrl-C sends it, while the build is parked at ``stage``."""
    d = ("--data-dir", str(data_dir))
    drawn = run_in_terminal(
        [CLI, "pull", *d, alpine_ref.ref],
        env={"HYPEMAN_TEST_PAUSE_AT": stage},
        interrupt_when="paused at",
    )
    assert drawn.code == 130
    lines = drawn.lines
    assert "hypeman-images: interrupted" in lines
    layer = alpine_ref.image.layers[0].digest[7:19]
    bars = [line.split()[0] for line in lines if "━" in line]
    assert bars.count(layer) == 1 and bars.count("converting") <= 1, "\n".join(lines)

    listed = json.loads(run("list", *d, "--json").stdout)
    assert [(i["status"], i["error"]) for i in listed] == [("failed", "interrupted")]
    table = run("list", *d).stdout
    assert "failed: interrupted" in table and "converting" not in table
    # Pulling again builds it.
    again = run("pull", *d, alpine_ref.ref)
    assert again.returncode == 0, again.stderr
    assert json.loads(run("list", *d, "--json").stdout)[0]["status"] == "ready"


def test_screen_replays_rich_redraws() -> None:
    drawn = "a\r\nb 1\r\x1b[2K\x1b[1A\x1b[2Ka\r\nb 2\r\n\x1b[1mdone\x1b[0m\r\n"
    assert screen(drawn) == ["a", "b 2", "done"]

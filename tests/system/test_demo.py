"""``make demo`` (scripts/demo.py) run as the Makefile runs it: registry, push, pull, boot.

The boot is real (QEMU, TCG here: a few seconds). The demo's store goes to a
temp dir through its ``--data-dir`` option, so the checkout's ``demo-data``
is left alone.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def demo_command() -> list[str]:
    """The ``demo`` target's recipe from the Makefile, with ``$(BIN)`` this venv's bin."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^demo:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert match, "the Makefile has no demo target"
    recipe = match.group(1).replace("$(BIN)", str(Path(sys.executable).parent))
    return shlex.split(recipe)


def run_demo(data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*demo_command(), "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_demo_pulls_shows_and_boots(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"
    result = run_demo(data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # The metadata, from `inspect`.
    assert re.search(r"^digest: +sha256:[0-9a-f]{64}$", out, re.MULTILINE), out
    assert re.search(r"^working_dir: +/srv/app$", out, re.MULTILINE), out
    assert re.search(r"^user: +app$", out, re.MULTILINE), out
    assert re.search(r"^env: +GREETING=hi$", out, re.MULTILINE), out
    # The disk listing (debugfs `ls -l`): busybox in /bin, the app's file owned by 1000.
    assert re.search(r"\s40755 \(2\)\s+0\s+0\s+4096 .* bin$", out, re.MULTILINE), out
    assert re.search(r"\s100644 \(1\)\s+1000\s+1000\s+26 .* hello\.txt$", out, re.MULTILINE), out
    # The booted command's output, from inside the VM.
    assert "I am app in /srv/app\nhello from hypeman-images\nLinux " in out, out
    assert "demo: done" in out
    assert "exit code 0" in result.stderr
    disks = list((data_dir / "images").rglob("rootfs.ext4"))
    assert len(disks) == 1


def test_demo_fails_clearly_when_it_cannot_boot(tmp_path: Path) -> None:
    # No hypervisor on PATH (an empty PATH): the demo must not skip the boot it promises.
    empty = tmp_path / "bin"
    empty.mkdir()
    data_dir = tmp_path / "demo-data"
    result = run_demo(data_dir, {"PATH": str(empty)})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("demo: error: this machine cannot boot")
    assert "qemu-system-x86_64" in result.stderr and "make demo" in result.stderr
    assert not data_dir.exists(), "it failed before starting anything"

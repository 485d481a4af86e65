"""Smoke tests of the benchmark helpers in ``bench/`` (layer diffs, measurement)."""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import layers
import measure
from support.images import IMAGES_DIR


def _tar(path: Path, entries: list[tuple[str, str | bytes | None]]) -> Path:
    """``(name, body)``: bytes make a file, ``None`` a directory, a str a hard link to it."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1
            if body is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(body, str):
                info.type, info.linkname = tarfile.LNKTYPE, body
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return path


def _names(layer: layers.LayerFile) -> list[str]:
    with gzip.open(layer.path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        return [info.name for info in tar]


def test_layer_diff_has_changes_whiteouts_and_opaque(tmp_path: Path) -> None:
    lower = _tar(
        tmp_path / "lower.tar",
        [
            ("./", None),
            ("./doc/", None),
            ("./doc/a", b"a"),
            ("./doc/b", b"b"),
            ("./etc/", None),
            ("./etc/keep", b"same"),
            ("./etc/gone", b"x"),
            ("./etc/big", b"old"),
            ("./etc/link", "./etc/big"),
            ("./man/", None),
            ("./man/page", b"m"),
        ],
    )
    upper = _tar(
        tmp_path / "upper.tar",
        [
            ("./", None),
            ("./doc/", None),
            ("./doc/new", b"n"),
            ("./etc/", None),
            ("./etc/keep", b"same"),
            ("./etc/big", b"new"),
            ("./etc/link", "./etc/big"),
        ],
    )
    plan = layers.diff_plan(lower, upper)
    layer = layers.write_layer(upper, plan, tmp_path / "1.tar.gz")
    assert _names(layer) == [  # tarfile reads "./" back as "."
        ".",
        "./.wh.man",
        "./doc",
        "./doc/.wh..wh..opq",
        "./doc/new",
        "./etc",
        "./etc/.wh.gone",
        "./etc/big",
        "./etc/link",  # unchanged header, but its target changed: it moves with it
    ]
    assert (layer.whiteouts, layer.opaques, layer.entries) == (2, 1, 9)
    assert layer.diff_id.startswith("sha256:") and layer.tar_size % 512 == 0


def test_base_layer_is_the_stage_itself(tmp_path: Path) -> None:
    base = _tar(tmp_path / "base.tar", [("./", None), ("./f", b"data")])
    layer = layers.write_layer(base, None, tmp_path / "0.tar.gz")
    assert _names(layer) == [".", "./f"]
    assert layers.describe([layer]).startswith("1 layer, ")


def test_run_measures_a_child_tree(tmp_path: Path) -> None:
    target = tmp_path / "out"
    script = f"import os; f = open({str(target)!r}, 'wb'); f.write(os.urandom(1 << 20))"
    result = measure.run([sys.executable, "-c", script])
    assert result.seconds > 0 and result.max_rss > 1 << 20
    assert result.written >= 1 << 20  # dirtied for the storage layer
    assert measure.disk_usage(tmp_path) >= 1 << 20


def test_run_reports_failure() -> None:
    with pytest.raises(measure.CommandFailed, match="exited 3"):
        measure.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])


@pytest.mark.slow
def test_boot_bench_prints_its_figures() -> None:
    # bench/boot.py as a user runs it (QEMU under TCG: the same on every machine).
    script = Path(__file__).resolve().parents[2] / "bench" / "boot.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "-n",
            "1",
            "--hypervisor",
            "qemu",
            "--accel",
            "tcg",
            "--tarball",
            str(IMAGES_DIR / "alpine-minirootfs-3.20.3-x86_64.tar.gz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^machine\s+qemu/tcg$", result.stdout, re.M), result.stdout
    first = re.search(r"to first output\s+([\d.]+) s", result.stdout)
    off = re.search(r"to power-off\s+([\d.]+) s", result.stdout)
    assert first and off, result.stdout
    assert 0 < float(first.group(1)) <= float(off.group(1))

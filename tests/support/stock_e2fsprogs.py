"""Debian 12's stock e2fsprogs 1.47.0 (no ``mke2fs -d -``), for the fallback's tests.

Fetched once with ``apt-get download`` (the machine's own apt sources) and
unpacked with ``dpkg -x`` into ``~/.cache/hypeman-tests``; its binaries need
its own libext2fs, given by ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

VERSION = "1.47.0-2+b2"
ROOT = Path.home() / ".cache" / "hypeman-tests" / "e2fsprogs-1.47.0"
SBIN = ROOT / "sbin"
LIBDIR = ROOT / "lib" / "x86_64-linux-gnu"
TOOLS = ("mke2fs", "debugfs", "e2fsck", "dumpe2fs", "resize2fs")


def unpacked() -> Path:
    """The unpacked package's root (fetched the first time); skips without apt-get."""
    if not (SBIN / "mke2fs").exists():
        if shutil.which("apt-get") is None:
            pytest.skip("apt-get is needed to fetch e2fsprogs 1.47.0")
        debs = ROOT.parent / "debs-1.47.0"
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["apt-get", "download", f"e2fsprogs={VERSION}", f"libext2fs2={VERSION}"],
            cwd=debs,
            check=True,
            capture_output=True,
        )
        for deb in debs.glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(ROOT)], check=True)
    return ROOT


def wrappers(directory: Path) -> Path:
    """Scripts in ``directory`` that run the stock tools with their own library.

    What ``hypeman-images --mke2fs DIR/mke2fs`` is pointed at: the product finds
    debugfs, e2fsck, dumpe2fs and resize2fs beside mke2fs, as in an installation.
    """
    unpacked()
    directory.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        script = directory / tool
        script.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{LIBDIR}" exec "{SBIN / tool}" "$@"\n')
        script.chmod(0o755)
    return directory / "mke2fs"

"""The floor of the disk step: ``mke2fs -d -`` on an already-flattened tar, beside decompression.

Usage: ``python bench/mke2fs_floor.py LAYER.tar.gz [--mke2fs PATH]``. Prints the
seconds to gunzip the layer to /dev/null, and to pipe the decompressed tar
(held in memory) through :func:`hypeman_images.disk.mke2fs.build_disk` (mke2fs,
e2fsck -fn and the sha256 included), with the disk's size and slack.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "disk"))

from test_ext4 import inputs_of

from hypeman_images.disk.e2fsprogs import find_e2fsprogs
from hypeman_images.disk.mke2fs import build_disk
from hypeman_images.oci.digest import Digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("layer", type=Path)
    parser.add_argument("--mke2fs", default="mke2fs")
    args = parser.parse_args()
    blob = args.layer.read_bytes()
    start = time.perf_counter()
    data = gzip.decompress(blob)
    decompress = time.perf_counter() - start
    tools = find_e2fsprogs(args.mke2fs)
    inputs = inputs_of(data)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = build_disk(
            Path(tmp) / "rootfs.ext4",
            inputs,
            lambda out: out.write(data),
            seed=Digest.of(blob),
            free_space=0,
            mke2fs=tools,
        )
        disk = time.perf_counter() - start
    print(f"tar {len(data) / 2**20:.1f} MiB, {inputs.inodes} inodes")
    print(f"decompress only: {decompress:.3f} s")
    print(f"build_disk ({'fallback' if result.fallback_used else 'mke2fs -d -'}): {disk:.3f} s")
    print(f"disk {result.size_bytes / 2**20:.1f} MiB, slack {result.free_blocks} blocks")


if __name__ == "__main__":
    main()

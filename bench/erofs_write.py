"""EROFS writer throughput against ``mke2fs -d DIR`` and ``mkfs.erofs`` on the same tree.

Makes a mixed tree of about 1 GB under a temporary directory (a few large
files, thousands of medium ones, tens of thousands of small ones, with
symlinks and dirs), reads it once so every tool starts from the page cache,
then times each tool writing its image into the same directory. Prints MB/s
of file content per tool (best of ``-n``).

    .venv/bin/python bench/erofs_write.py [-n 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from hypeman_images.disk.erofs import Entry, ErofsWriter, Kind
from hypeman_images.oci.digest import Digest


def make_tree(root: Path) -> int:
    """A mixed tree; returns the bytes of file content."""
    rng = random.Random(7)
    total = 0
    sizes = [100 << 20] * 5 + [rng.randrange(20 << 10, 140 << 10) for _ in range(5000)]
    sizes += [rng.randrange(0, 10 << 10) for _ in range(20000)]
    block = rng.randbytes(1 << 20)
    for i, size in enumerate(sizes):
        d = root / f"d{i % 200:03d}" / f"s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:05d}", "wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                f.write(
                    block[(i * 4099) % 4096 : (i * 4099) % 4096 + n] if n < 1 << 19 else block[:n]
                )
                left -= n
        total += size
        if i % 50 == 0:
            os.symlink(f"f{i:05d}", d / f"l{i:05d}")
    return total


def entries(root: Path) -> Iterator[tuple[Entry, Path | None]]:
    """The tree as writer entries, parents first (os.walk order)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root).encode()
        rel = b"" if rel == b"." else rel
        st = os.lstat(dirpath)
        yield Entry(rel, Kind.DIR, stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime)), None
        for name in sorted(filenames):
            full = Path(dirpath, name)
            st = os.lstat(full)
            path = (rel + b"/" if rel else b"") + name.encode()
            meta = {"mode": stat.S_IMODE(st.st_mode), "mtime": int(st.st_mtime)}
            if stat.S_ISLNK(st.st_mode):
                yield Entry(path, Kind.SYMLINK, target=os.readlink(full).encode(), **meta), None
            else:
                yield Entry(path, Kind.FILE, size=st.st_size, **meta), full


def write_erofs(root: Path, image: Path) -> None:
    with open(image, "wb+") as out:
        writer = ErofsWriter(out, Digest.of(b"bench"))
        for entry, source in entries(root):
            if source is None:
                writer.add(entry)
            else:
                with open(source, "rb", buffering=0) as body:
                    writer.add(entry, body)
        writer.finish()


def best(n: int, run: object) -> float:
    times = []
    for _ in range(n):
        start = time.monotonic()
        run()  # type: ignore[operator]
        times.append(time.monotonic() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root, image = Path(tmp, "tree"), Path(tmp, "out.img")
        total = make_tree(root)
        subprocess.run(["cat", *map(str, root.rglob("f*"))], stdout=subprocess.DEVNULL, check=False)
        mib = total / 1e6
        tools = {
            "hypeman erofs writer": lambda: write_erofs(root, image),
            "mkfs.erofs (erofs-utils)": lambda: subprocess.run(
                ["mkfs.erofs", "-T0", "--quiet", str(image), str(root)], check=True
            ),
            "mke2fs -d DIR": lambda: (
                image.unlink(missing_ok=True),
                subprocess.run(
                    ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096",
                     "-d", str(root), str(image), f"{int(total * 1.3) >> 10}K"],
                    check=True,
                ),
            ),
        }  # fmt: skip
        print(f"tree: {mib:.0f} MB of file content")
        for name, run in tools.items():
            took = best(args.n, run)
            size = image.stat().st_size
            print(f"{name:26s} {took:6.2f} s  {mib / took:7.0f} MB/s  image {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()

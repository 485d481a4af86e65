"""ext4 against EROFS on the bench images: build wall time, disk size, and what lz4 would give.

``bench/pipeline.py --formats`` runs it. For each image, alternating, on a cold
page cache, a fresh data dir each time: ``hypeman-images pull`` (ext4, the
default: one pass, beside the download) and ``hypeman-images pull --format
erofs`` (one pass too: the bodies into the image beside the download, then
the merge's inodes; ``build/onepass_erofs.py``). Then, in process, an EROFS build's split
(``BuildStats``) and the sizes: the ext4 disk, the EROFS disk, and the same
tree compressed by erofs-utils (``mkfs.erofs -zlz4`` and ``-zlz4hc`` from the
mounted EROFS disk: compression our writer does not do yet), beside ``lz4 -1``
of the uncompressed image as one stream.

Needs root (dropping the page cache, the loop mount) and erofs-utils.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import measure

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.store.formats import DiskFormat

FORMATS = ("ext4", "erofs")


@dataclass
class FormatRun:
    """One cold CLI pull: wall and CPU seconds, peak RSS, and the disk's size."""

    seconds: float
    cpu: float
    disk_bytes: int
    max_rss: int = 0


@dataclass
class FormatResult:
    """Everything measured for one image."""

    name: str
    runs: dict[str, list[FormatRun]] = field(default_factory=lambda: {f: [] for f in FORMATS})
    erofs_split: dict[str, float] = field(default_factory=dict)
    lz4_bytes: int = 0
    lz4hc_bytes: int = 0
    lz4_stream_bytes: int = 0
    mkfs_lz4_s: float = 0.0


def _pull(cli: list[str], ref: str, folder: Path, fmt: str, disk_digest: bool) -> FormatRun:
    data = folder / "data"
    flags = ["--format", fmt] + ([] if disk_digest else ["--no-disk-digest"])
    result = measure.run([*cli, "pull", "--no-progress", *flags, "--data-dir", str(data), ref])
    disk = next(data.rglob(f"rootfs.{fmt}"))
    return FormatRun(result.seconds, result.cpu, disk.stat().st_size, result.max_rss)


def _mkfs_erofs(tree: Path, out: Path, algorithm: str) -> tuple[int, float]:
    started = time.perf_counter()
    subprocess.run(
        ["mkfs.erofs", "--quiet", f"-z{algorithm}", str(out), str(tree)],
        check=True,
        capture_output=True,
    )
    return out.stat().st_size, time.perf_counter() - started


def _compressed(image: Path, work: Path, result: FormatResult) -> None:
    """The tree of ``image`` through mkfs.erofs -zlz4 and -zlz4hc; lz4 -1 of the image."""
    with tempfile.TemporaryDirectory(prefix="erofs-mnt-", dir=work) as mnt:
        subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), mnt], check=True)
        try:
            result.lz4_bytes, result.mkfs_lz4_s = _mkfs_erofs(Path(mnt), work / "lz4.img", "lz4")
            result.lz4hc_bytes, _ = _mkfs_erofs(Path(mnt), work / "lz4hc.img", "lz4hc")
        finally:
            subprocess.run(["umount", mnt], check=True)
    with image.open("rb") as source:
        lz4 = subprocess.run(["lz4", "-1", "-c"], stdin=source, capture_output=True, check=True)
    result.lz4_stream_bytes = len(lz4.stdout)
    for name in ("lz4.img", "lz4hc.img"):
        (work / name).unlink(missing_ok=True)


def compare_formats(
    name: str, ref: str, cli: list[str], runs: int, work: Path, disk_digest: bool = True
) -> FormatResult:
    """``runs`` alternating cold pulls of each format, then the split and the lz4 sizes."""
    result = FormatResult(name)
    for i in range(runs):
        order = FORMATS if i % 2 == 0 else FORMATS[::-1]
        for fmt in order:
            with tempfile.TemporaryDirectory(prefix=f"fmt-{fmt}-", dir=work) as folder:
                measure.drop_caches()
                run = _pull(cli, ref, Path(folder), fmt, disk_digest)
            result.runs[fmt].append(run)
            print(f"  {name} run {i + 1} {fmt}: {run.seconds:.2f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="fmt-inproc-", dir=work) as folder:
        measure.drop_caches()
        stats = BuildStats()
        started = time.perf_counter()
        options = BuildOptions(format=DiskFormat.EROFS, disk_digest=disk_digest)
        with ImageManager(Path(folder) / "data", options=options) as manager:
            stored = manager.pull(ref, stats=stats)
        total = time.perf_counter() - started
        result.erofs_split = {
            "download": stats.download_s,
            "one pass (bodies beside the download, merge, proof)": stats.stages.get(
                "one_pass_s", 0.0
            ),
            "after the download ends": stats.convert_s,
            "one pass tried": stats.stages.get("one_pass_tried_s", 0.0),
            "scan + merge (two passes)": stats.stages.get("flatten_scan_s", 0.0),
            "write EROFS (two passes: all; one pass: the inodes)": stats.stages.get("erofs_s", 0.0),
            "fsck.erofs + sha256 + rename": stats.stages.get("check_s", 0.0),
            "total": total,
        }
        _compressed(stored.disk, Path(folder), result)
    return result


def format_report(results: list[FormatResult]) -> str:
    """The table: medians of wall time and the disk sizes, ext4 against EROFS."""
    head = (
        f"{'image':<8} {'ext4':>8} {'erofs':>8} {'erofs/ext4':>10} {'ext4 disk':>10} "
        f"{'erofs disk':>11} {'size ratio':>10} {'lz4':>9} {'lz4hc':>9} {'lz4 stream':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ext4 = measure.median([x.seconds for x in r.runs["ext4"]])
        erofs = measure.median([x.seconds for x in r.runs["erofs"]])
        ext4_size = r.runs["ext4"][0].disk_bytes
        erofs_size = r.runs["erofs"][0].disk_bytes
        lines.append(
            f"{r.name:<8} {ext4:>7.2f}s {erofs:>7.2f}s {erofs / ext4:>9.2f}x "
            f"{measure.mb(ext4_size):>10} {measure.mb(erofs_size):>11} "
            f"{erofs_size / ext4_size:>9.2f}x {measure.mb(r.lz4_bytes):>9} "
            f"{measure.mb(r.lz4hc_bytes):>9} {measure.mb(r.lz4_stream_bytes):>10}"
        )
    lines.append("")
    for r in results:
        cpu = {f: measure.median([x.cpu for x in r.runs[f]]) for f in FORMATS}
        rss = {f: max(x.max_rss for x in r.runs[f]) >> 20 for f in FORMATS}
        lines.append(
            f"{r.name}: CPU ext4 {cpu['ext4']:.2f}s, erofs {cpu['erofs']:.2f}s; peak RSS ext4 "
            f"{rss['ext4']} MiB, erofs {rss['erofs']} MiB; erofs in process: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in r.erofs_split.items())
            + f"; mkfs.erofs -zlz4 from the mounted tree {r.mkfs_lz4_s:.2f}s"
        )
    return "\n".join(lines)


__all__ = ["FormatResult", "compare_formats", "format_report"]

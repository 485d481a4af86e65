"""The commands on local images: pull, list, inspect, rm, gc and verify.

Each takes the parsed arguments and returns the exit code; failures are
raised as :class:`~hypeman_images.errors.HypemanError` for ``app.main``.
"""

from __future__ import annotations

import argparse
import json

from hypeman_images.build.image import image_of
from hypeman_images.build.progress import human_size
from hypeman_images.cli.config import build_options, open_manager
from hypeman_images.cli.output import image_json, print_json, reporter
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageRecord, ImageStatus


def _format(args: argparse.Namespace) -> DiskFormat | None:
    return DiskFormat(args.format) if args.format else None


def pull(args: argparse.Namespace) -> int:
    """``pull``: build the image's disk and print its path (or the image as JSON)."""
    options = build_options(args)
    progress = reporter(args)
    try:
        with open_manager(args, options) as manager:
            stored = manager.pull(args.image, reporter=progress)
            progress.close()
            # Shown before the manager closes: closing waits for the disk's push to the cache.
            image = image_of(stored)
            if args.json:
                print_json(image_json(image))
            else:
                print(image.disk, flush=True)
    finally:
        progress.close()
    return 0


def list_images(args: argparse.Namespace) -> int:
    """``list``: a table of the local images, or a JSON list of them."""
    with open_manager(args) as manager:
        images = manager.list()
    if args.json:
        print_json([image_json(i) for i in images])
        return 0
    rows = [("REPOSITORY", "TAGS", "DIGEST", "FORMAT", "STATUS", "SOURCE", "SIZE", "CREATED")]
    for image in images:
        size = human_size(image.size_bytes) if image.size_bytes else "-"
        status = str(image.status)
        if image.queue_position:
            status += f" (#{image.queue_position})"
        short = image.digest.partition(":")[2][:12]
        tags = ",".join(image.local_names) or "-"
        source = image.record.source if image.status is ImageStatus.READY else "-"
        fmt = str(image.format)
        rows.append((image.repository, tags, short, fmt, status, source, size, image.created_at))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def inspect(args: argparse.Namespace) -> int:
    """``inspect``: one image's metadata, one field a line (or as JSON)."""
    with open_manager(args) as manager:
        image = manager.get(args.image, format=_format(args))
    if args.json:
        print_json(image_json(image))
        return 0
    fields: list[tuple[str, object]] = [
        ("name", image.name),
        ("digest", image.digest),
        ("status", image.status),
        ("error", image.error),
        ("tags", ", ".join(image.local_names) or "-"),
        ("platform", image.platform),
        ("format", image.format),
        ("size", human_size(image.size_bytes) if image.size_bytes else None),
        ("source", source_text(image.record)),
        ("entrypoint", json.dumps(image.entrypoint)),
        ("cmd", json.dumps(image.cmd)),
        ("working_dir", image.working_dir or "/"),
        ("user", image.user or "root"),
        ("created_at", image.created_at),
        ("disk", image.disk),
    ]
    for key, value in fields:
        if value is not None:
            print(f"{key + ':':13} {value}")
    for item in image.record.env:
        print(f"{'env:':13} {item}")
    return 0


def remove(args: argparse.Namespace) -> int:
    """``rm``: remove images by tag or digest and print what went."""
    removed: list[str] = []
    with open_manager(args) as manager:
        for name in args.image:
            removed.extend(manager.delete(name))
    if args.json:
        print_json({"removed": removed})
    else:
        for name in removed:
            print(f"removed {name}")
    return 0


def gc(args: argparse.Namespace) -> int:
    """``gc``: free what no image needs and print how much."""
    with open_manager(args) as manager:
        report = manager.gc()
    if args.json:
        print_json(
            {
                "blobs_removed": report.blobs_removed,
                "directories_removed": report.directories_removed,
                "scans_removed": report.scans_removed,
                "bytes_freed": report.bytes_freed,
            }
        )
    else:
        print(
            f"removed {report.blobs_removed} blobs, {report.directories_removed} build "
            f"directories and {report.scans_removed} layer scans, freed "
            f"{human_size(report.bytes_freed)}"
        )
    return 0


def verify(args: argparse.Namespace) -> int:
    """``verify``: check a local disk again; a failing one raises CorruptDisk."""
    with open_manager(args) as manager:
        checked = manager.verify(args.image, record=args.record, format=_format(args))
    if args.json:
        print_json(
            {
                "name": checked.name,
                "digest": checked.digest,
                "disk": str(checked.disk),
                "format": checked.format,
                "sha256": checked.sha256,
                "recorded": checked.recorded,
                "recorded_now": checked.recorded_now,
            }
        )
        return 0
    if checked.recorded is not None:
        how = "matches the sha256 recorded at build time"
    elif checked.recorded_now:
        how = "recorded now"
    else:
        how = "none recorded (--record keeps it)"
    fsck = "fsck.erofs" if checked.format == DiskFormat.EROFS else "e2fsck -fn"
    print(f"ok: {checked.name}: {fsck} clean; {checked.sha256} {how}")
    return 0


def source_text(record: ImageRecord) -> str:
    """Where the disk came from: ``build``, or ``disk-cache`` and the artifact it was."""
    if record.source_artifact is None:
        return record.source
    return f"{record.source} ({record.source_repository}@{record.source_artifact})"

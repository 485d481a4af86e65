"""The commands on local images: pull, list, inspect, rm, gc and verify.

Each takes the parsed arguments and returns the exit code; failures are
raised as :class:`~hypeman_images.errors.HypemanError` for ``app.main``.
"""

from __future__ import annotations

import argparse
import json
import sys

from hypeman_images.build.image import image_of
from hypeman_images.build.progress import human_size
from hypeman_images.build.request import check_labels
from hypeman_images.cli.config import build_options, open_manager
from hypeman_images.cli.interrupt import pull_image
from hypeman_images.cli.listing import RepositoryFilter, render, short_id, table_rows
from hypeman_images.cli.output import PROG, image_json, print_json, printable, reporter
from hypeman_images.errors import HypemanError, InvalidArgument
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageRecord


def _format(args: argparse.Namespace) -> DiskFormat | None:
    """The disk format ``--format`` names (inspect, verify), None for "the ready one"."""
    return DiskFormat(args.format) if args.format else None


def pull(args: argparse.Namespace) -> int:
    """``pull``: build the image's disk and print its path (or the image as JSON)."""
    options = build_options(args)
    with open_manager(args, options) as manager:
        progress = reporter(args)
        try:
            stored = pull_image(manager, args.image, progress, labels=user_labels(args.label))
        finally:
            # Before anything else prints: nothing may come between the bars' redraws.
            progress.close()
        # Shown before the manager closes: closing waits for the disk's push to the cache.
        image = image_of(stored)
        if args.json:
            print_json(image_json(image))
        else:
            print(image.disk, flush=True)
    return 0


def list_images(args: argparse.Namespace) -> int:
    """``list``: a table of the local images, their IDs (``-q``), or a JSON list of them."""
    args.json = args.json or args.format == "json"
    wanted = RepositoryFilter.parse(args.repository) if args.repository else None
    labels = user_labels(args.label)
    with open_manager(args) as manager:
        images = [i for i in manager.list(labels=labels) if wanted is None or wanted.matches(i)]
    if args.quiet:
        for image_id in dict.fromkeys(short_id(i) for i in images):
            print(image_id)
    elif args.json:
        print_json([image_json(i) for i in images])
    else:
        for line in render(table_rows(images)):
            print(line)
    return 0


def inspect(args: argparse.Namespace) -> int:
    """``inspect``: one image's metadata, one field a line (or as JSON).

    Text is escaped for the terminal (:func:`printable`): the image's author
    wrote most of it. JSON stays exact.
    """
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
        ("user_labels", ", ".join(f"{k}={v}" for k, v in image.tags.items()) or None),
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
    fields += [("env", item) for item in image.record.env]
    for key, value in fields:
        if value is not None:
            print(f"{key + ':':13} {printable(value)}")
    return 0


def tag(args: argparse.Namespace) -> int:
    """``tag``: point a new local tag at a ready image; silent, as ``docker tag`` is."""
    with open_manager(args) as manager:
        image = manager.tag(args.source, args.target)
    if args.json:
        print_json(image_json(image))
    return 0


def user_labels(items: list[str]) -> dict[str, str] | None:
    """``--label KEY=VALUE`` flags as a mapping (None when there are none)."""
    labels: dict[str, str] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise InvalidArgument(f"invalid --label {item!r}: expected KEY=VALUE")
        labels[key] = value
    try:
        check_labels(labels)
    except InvalidArgument as exc:  # the library says "tag", hypeman's word for a label
        raise InvalidArgument(f"invalid --label: {exc.detail.replace('tag', 'label')}") from exc
    return labels or None


def remove(args: argparse.Namespace) -> int:
    """``rm``: remove what it can, as ``docker rmi`` does; each failure said, none hidden.

    Every name is tried; the exit code is the failures' (1 when they differ).
    """
    removed: list[str] = []
    failures: list[tuple[str, HypemanError]] = []
    with open_manager(args) as manager:
        for name in args.image:
            try:
                gone = manager.delete(name)
            except HypemanError as exc:
                failures.append((name, exc))
                if not args.json:
                    print(f"{PROG}: error: {printable(exc.message, lines=True)}", file=sys.stderr)
                continue
            removed.extend(gone)
            if not args.json:
                for item in gone:
                    print(f"removed {item}", flush=True)
    errors = [error for _, error in failures]
    codes = {error.exit_code for error in errors}
    code = 0 if not errors else codes.pop() if len(codes) == 1 else HypemanError.exit_code
    if args.json:
        print_json({"removed": removed, **_failures_json(failures, len(args.image), code)})
        for error in errors:
            print(f"{PROG}: error: {printable(error.message, lines=True)}", file=sys.stderr)
    return code


def _failures_json(
    failures: list[tuple[str, HypemanError]], asked: int, exit_code: int
) -> dict[str, object]:
    """``rm --json``'s error fields: the usual ``code``/``message``/``exit_code``, and each one."""
    if not failures:
        return {}
    kinds = {error.code for _, error in failures}
    message = (
        failures[0][1].message
        if len(failures) == 1
        else f"{len(failures)} of {asked} images could not be removed"
    )
    return {
        "code": kinds.pop() if len(kinds) == 1 else HypemanError.code,
        "message": message,
        "exit_code": exit_code,
        "errors": [
            {"image": name, "code": error.code, "message": error.message}
            for name, error in failures
        ],
    }


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

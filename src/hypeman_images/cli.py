"""The ``hypeman-images`` command line.

Exit codes (also in the README): 0 ok; 1 other failure; 2 bad usage or image
name; 3 not found; 4 unauthorized; 5 rate limited; 6 platform not in the
index; 7 bad image content; 8 digest mismatch; 9 e2fsprogs problem; 10 data
dir not writable or full; 11 boot failed; 130 interrupted. ``boot`` exits
with the command's own exit code when the VM ran it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .config import BuildOptions, default_data_dir, parse_size
from .errors import HypemanError
from .manager import ImageManager
from .progress import PlainReporter, Reporter, RichReporter
from .spec import Platform
from .store import StoredImage

log = logging.getLogger("hypeman_images")

EXAMPLES = {
    "pull": "hypeman-images pull alpine:3.20\n  hypeman-images pull --platform linux/arm64 ghcr.io/org/app@sha256:…",
    "list": "hypeman-images list --json",
    "inspect": "hypeman-images inspect alpine:3.20",
    "rm": "hypeman-images rm alpine:3.20   (the disk goes with its last tag)",
    "gc": "hypeman-images gc",
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default: $HYPEMAN_DATA_DIR, /var/lib/hypeman as root, "
        "else $XDG_DATA_HOME/hypeman)",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")

    parser = argparse.ArgumentParser(
        prog="hypeman-images",
        description="Turn OCI container images into bootable ext4 disks for microVMs.",
        epilog="Exit codes: 0 ok, 1 other, 2 usage/name, 3 not found, 4 auth, 5 rate limited, "
        "6 platform missing, 7 bad image, 8 digest mismatch, 9 e2fsprogs, 10 storage, 11 boot.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=help,
            epilog=f"example:\n  {EXAMPLES.get(name, '')}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("pull", "Pull an image and convert it into rootfs.ext4; print the disk's path.")
    p.add_argument("image", help="image reference, e.g. alpine, localhost:5000/app:1, repo@sha256:…")
    p.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from an index (default: host's)")
    p.add_argument(
        "--free-space", default=None, help="free space to leave in the disk (e.g. 64M; default 16M)"
    )
    p.add_argument("--mke2fs", default=None, help="mke2fs binary to use (default: from PATH)")
    p.add_argument("--no-progress", action="store_true", help="plain progress lines only")
    p.set_defaults(run=_pull)

    p = command("list", "List local images with their status and size.")
    p.set_defaults(run=_list)

    p = command("inspect", "Show an image's metadata (entrypoint, cmd, env, …) as JSON.")
    p.add_argument("image")
    p.set_defaults(run=_inspect)

    p = command("rm", "Remove an image by tag (its disk goes with the last tag) or by digest.")
    p.add_argument("image", nargs="+")
    p.set_defaults(run=_rm)

    p = command("gc", "Remove cached blobs no image needs and leftovers of interrupted builds.")
    p.set_defaults(run=_gc)
    return parser


def _manager(args: argparse.Namespace, options: BuildOptions | None = None) -> ImageManager:
    return ImageManager(args.data_dir or default_data_dir(), options=options)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _image_json(image: StoredImage) -> dict[str, Any]:
    doc = json.loads(image.record.to_json())
    doc["repository"] = image.repository
    doc["tags"] = list(image.tags)
    doc["disk"] = str(image.disk) if image.disk.exists() else None
    return doc


def _pull(args: argparse.Namespace) -> int:
    options = BuildOptions()
    if args.platform:
        options = replace(options, platform=Platform.parse(args.platform))
    if args.free_space:
        options = replace(options, free_space=parse_size(args.free_space))
    if args.mke2fs:
        options = replace(options, mke2fs=args.mke2fs)
    reporter: Reporter
    if args.json:
        reporter = Reporter()
    elif sys.stderr.isatty() and not args.no_progress:
        reporter = RichReporter()
    else:
        reporter = PlainReporter()
    try:
        with _manager(args, options) as manager:
            image = manager.pull(args.image, reporter=reporter)
    finally:
        reporter.close()
    if args.json:
        _print_json(_image_json(image))
    else:
        print(image.disk)
    return 0


def _list(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        images = manager.list()
    if args.json:
        _print_json([_image_json(i) for i in images])
        return 0
    rows = [("REPOSITORY", "TAGS", "DIGEST", "STATUS", "SIZE")]
    for image in images:
        record = image.record
        size = f"{(record.size_bytes or 0) / 2**20:.1f} MiB" if record.size_bytes else "-"
        rows.append(
            (image.repository, ",".join(image.tags) or "-", record.digest[7:19], record.status, size)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        image = manager.get(args.image)
    _print_json(_image_json(image))
    return 0


def _rm(args: argparse.Namespace) -> int:
    removed: list[str] = []
    with _manager(args) as manager:
        for name in args.image:
            removed.extend(manager.delete(name))
    if args.json:
        _print_json({"removed": removed})
    else:
        for name in removed:
            print(f"removed {name}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        report = manager.gc()
    if args.json:
        _print_json({"blobs_removed": report.blobs_removed, "bytes_freed": report.bytes_freed})
    else:
        print(f"removed {report.blobs_removed} blobs, freed {report.bytes_freed} bytes")
    return 0


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except HypemanError as exc:
        if args.json:
            _print_json({"error": exc.message, "kind": type(exc).__name__})
        print(f"hypeman-images: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hypeman-images: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

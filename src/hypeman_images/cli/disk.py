"""The disk cache on the command line: its flags, and ``disk push`` / ``disk pull`` by hand.

``--disk-cache`` and ``--disk-cache-mode`` go with the build flags (``pull``,
``boot``, ``serve``, ``disk pull``) and with ``disk push``; what they resolve
to, with ``HYPEMAN_DISK_CACHE`` and registries.conf, is
:func:`cli.config.disk_cache`. ``pull`` looks in the cache and pushes to it by
itself; ``disk push`` shares a disk already built, and ``disk pull`` takes a
disk from the cache or fails (never a local build), each with the exit code
of what went wrong (docs/cli.md, "disk").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from hypeman_images.build.image import image_of
from hypeman_images.build.options import BuildOptions
from hypeman_images.cli.config import build_options, disk_cache, open_manager
from hypeman_images.cli.output import PROG, image_json, print_json, reporter
from hypeman_images.errors import DigestMismatch, DiskArtifactInvalid, InvalidArgument, NotFound
from hypeman_images.fleet.cache import CacheMode
from hypeman_images.store.formats import DiskFormat

CACHE_ENV = "HYPEMAN_DISK_CACHE"
P = TypeVar("P", bound=argparse.ArgumentParser)
_NO_CACHE = "no disk cache: name one with --disk-cache REGISTRY/REPOSITORY (or $HYPEMAN_DISK_CACHE)"


def add_disk_cache_flags(parser: argparse.ArgumentParser) -> None:
    """``--disk-cache`` and ``--disk-cache-mode``, in a group of their own."""
    group = parser.add_argument_group("disk cache (built disks shared through a registry)")
    group.add_argument(
        "--disk-cache",
        default=os.environ.get(CACHE_ENV) or None,
        metavar="REGISTRY/REPOSITORY",
        help=f"repository where built disks are looked up and pushed (default: ${CACHE_ENV}, "
        "else registries.conf's disk-cache; an empty value turns it off)",
    )
    group.add_argument(
        "--disk-cache-mode",
        choices=list(CacheMode),
        default=None,
        help="pull: look there before building; push: push what is built here; "
        "both (default): look first, push after a build",
    )


def add_disk_commands(
    sub: argparse._SubParsersAction[P],
    push_parents: Sequence[P],
    pull_parents: Sequence[P],
) -> None:
    """The ``disk`` command and its two actions."""
    summary = "Share built disks through the disk cache by hand: push, pull."
    disk = sub.add_parser("disk", help=summary, description=summary, epilog=EXAMPLES)
    disk.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = disk.add_subparsers(dest="disk_command", required=True, metavar="ACTION")
    push = actions.add_parser(
        "push",
        parents=list(push_parents),
        help="Push a local image's disk to the disk cache.",
        description="Push a local image's ready disk to the disk cache, whatever the mode.",
    )
    push.add_argument("image", help="tag or digest reference of a local image")
    push.add_argument(
        "--format",
        choices=[str(f) for f in DiskFormat],
        help="the disk to push (default: the ready one, ext4 first)",
    )
    push.set_defaults(run=disk_push)
    pull = actions.add_parser(
        "pull",
        parents=list(pull_parents),
        help="Fetch an image's disk from the disk cache, never building it.",
        description="Fetch and verify an image's disk from the disk cache, as pull does, "
        f"but fail (exit {NotFound.exit_code} if there is none, {DiskArtifactInvalid.exit_code} "
        f"or {DigestMismatch.exit_code} if it fails a check) instead of building it here.",
    )
    pull.add_argument("image", help="image reference: alpine, localhost:5000/app:1, …")
    pull.add_argument("--no-progress", action="store_true", help="plain progress lines, no bars")
    pull.set_defaults(run=disk_pull)


EXAMPLES = f"""\
The cache is the repository --disk-cache (or $HYPEMAN_DISK_CACHE, or
registries.conf's disk-cache) names; it is reached as image registries are.

examples:
  {PROG} disk push --disk-cache registry.lan:5000/hypeman/disks alpine:3.20
  {PROG} disk pull --disk-cache registry.lan:5000/hypeman/disks alpine:3.20"""


def disk_push(args: argparse.Namespace) -> int:
    """``disk push``: push a ready local disk to the disk cache and say where it went."""
    cache = disk_cache(args)
    if cache is None:
        raise InvalidArgument(_NO_CACHE)
    with open_manager(args, replace(BuildOptions(), disk_cache=cache)) as manager:
        pushed = manager.push_disk(args.image, DiskFormat(args.format) if args.format else None)
    if args.json:
        print_json(
            {
                "repository": pushed.repository.name,
                "digest": str(pushed.digest),
                "tag": pushed.tag,
                "uploaded": pushed.uploaded,
                "uploaded_bytes": pushed.uploaded_bytes,
                "indexed": pushed.indexed,
            }
        )
    else:
        print(f"{pushed.repository.name}@{pushed.digest}")
    return 0


def disk_pull(args: argparse.Namespace) -> int:
    """``disk pull``: a disk from the cache, verified, or the error that kept it out."""
    options = build_options(args)
    if options.disk_cache is None:
        raise InvalidArgument(_NO_CACHE)
    options = replace(options, disk_cache=replace(options.disk_cache, required=True))
    progress = reporter(args)
    try:
        with open_manager(args, options) as manager:
            stored = manager.pull(args.image, reporter=progress)
    finally:
        progress.close()
    image = image_of(stored)
    if args.json:
        print_json(image_json(image))
    else:
        print(image.disk)
    return 0

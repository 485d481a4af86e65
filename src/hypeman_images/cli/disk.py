"""``disk push`` and ``disk pull``: the disk cache by hand.

``pull`` looks in the cache and pushes to it by itself; ``disk push`` shares
a disk already built, and ``disk pull`` takes a disk from the cache or fails
(never a local build), each with the exit code of what went wrong
(docs/cli.md, "disk"). Their flags, ``--disk-cache`` and
``--disk-cache-mode`` among them, are declared in :mod:`cli.parser`; what the
cache flags resolve to is :func:`cli.config.disk_cache`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from hypeman_images.build.image import image_of
from hypeman_images.build.options import BuildOptions
from hypeman_images.cli.config import build_options, disk_cache, open_manager
from hypeman_images.cli.output import image_json, print_json, reporter
from hypeman_images.errors import InvalidArgument
from hypeman_images.store.formats import DiskFormat

_NO_CACHE = "no disk cache: name one with --disk-cache REGISTRY/REPOSITORY (or $HYPEMAN_DISK_CACHE)"


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

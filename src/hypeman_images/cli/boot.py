"""The ``boot`` command: get (or pull) an image, boot its disk, report the run.

The VM machinery (:mod:`hypeman_images.boot`) is imported inside the handler:
no other command needs it, and they start faster without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
from typing import TYPE_CHECKING

from hypeman_images.build.image import Image, image_of
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.progress import PlainReporter
from hypeman_images.cli.config import build_options, open_manager
from hypeman_images.cli.interrupt import pull_image
from hypeman_images.cli.output import PROG, print_json, printable
from hypeman_images.errors import NotFound
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageStatus

if TYPE_CHECKING:
    from hypeman_images.boot import BootResult


def boot_image(args: argparse.Namespace) -> int:
    """``boot``: run the image's command (or ``-- CMD``) in a microVM; its exit code is ours."""
    import shlex

    from hypeman_images.boot import boot, boot_command

    command = args.args[1:] if args.args[:1] == ["--"] else args.args
    with open_manager(args, build_options(args)) as manager:
        image = _ready_image(manager, args.image, DiskFormat(args.format) if args.format else None)
        if image.disk is None:
            raise NotFound(f"{args.image} has no disk; pull it again")
        metadata = json.loads(image.record.to_json())
        work_dir = manager.data.boot / "run"
        work_dir.mkdir(parents=True, exist_ok=True)
        if args.print_command:
            argv = boot_command(
                image.disk,
                metadata,
                command=command or None,
                hypervisor="cloud-hypervisor",
                accel="kvm",
                work_dir=work_dir,
                cache_dir=manager.data.boot,
                fstype=str(image.format),
            )
            print(shlex.join(argv))
            return 0
        result = boot(
            image.disk,
            metadata,
            command=command or None,
            timeout=args.timeout,
            hypervisor=args.hypervisor,
            accel=args.accel,
            work_dir=work_dir,
            cache_dir=manager.data.boot,
            memory_mib=args.memory,
            fstype=str(image.format),
            output=None if args.json else _write_through,
            stdin=stdin_to_pass(),
        )
    _report(result, as_json=args.json)
    return result.exit_code


def stdin_to_pass(fd: int = 0) -> int | None:
    """``fd`` if the command should read it: a terminal, a pipe, a socket or a file.

    Not /dev/null or another device, and not a closed stdin: the command then
    reads /dev/null, as under ``docker run`` without ``-i``.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    if os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode):
        return fd
    return None


def _write_through(data: bytes) -> None:
    """The command's output, on our stdout as the VM prints it."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _ready_image(manager: ImageManager, name: str, fmt: DiskFormat | None) -> Image:
    """The local image's ``fmt`` disk (any, for None) if it is ready, else the image pulled now
    (as ``--format``, ext4 by default)."""
    try:
        image = manager.get(name, format=fmt)
        if image.status is not ImageStatus.READY:
            raise NotFound(f"{name} is {image.status}, not ready")
    except NotFound:
        image = image_of(pull_image(manager, name, PlainReporter()))
    return image


def _report(result: BootResult, *, as_json: bool) -> None:
    """JSON with the output; else (the output was streamed) how it ran, on stderr."""
    if as_json:
        doc = dataclasses.asdict(result)
        doc.pop("console", None)
        print_json(doc)
        return
    if result.error:
        print(f"{PROG}: {printable(result.error, lines=True)}", file=sys.stderr)
    print(
        f"{PROG}: booted with {result.hypervisor} ({result.accelerator}); "
        f"exit code {result.exit_code}",
        file=sys.stderr,
    )

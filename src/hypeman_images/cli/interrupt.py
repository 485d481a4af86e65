"""Ctrl-C in the CLI: say so, leave the store telling the truth, exit 130 at once.

A build this process runs is abandoned mid-way (its threads are blocked in
I/O and die with the process), so its record, which says ``pulling`` or
``converting``, is rewritten first as ``failed: interrupted``: ``list``
must not show a build nobody runs, and the next ``pull`` starts it again.
A build another process runs is left alone: its lock says it is alive.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from hypeman_images.cli.output import PROG
from hypeman_images.errors import EXIT_INTERRUPTED, HypemanError
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference
from hypeman_images.store.housekeeping import idle_lock
from hypeman_images.store.images import ImageRecord, ImageStatus, StoredImage

if TYPE_CHECKING:  # the CLI's start-up imports this module: no build machinery at load time
    from hypeman_images.build.manager import ImageManager
    from hypeman_images.build.progress import Reporter

INTERRUPTED = "interrupted"


def exit_interrupted() -> NoReturn:
    """Print ``interrupted`` and leave with exit code 130, not waiting for any thread.

    Download and scan workers are blocked in I/O; the interpreter's exit
    would join them. Temp files carry our pid: the next gc removes them.
    """
    print(f"{PROG}: {INTERRUPTED}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def pull_image(
    manager: ImageManager,
    name: str,
    progress: Reporter,
    *,
    labels: Mapping[str, str] | None = None,
) -> StoredImage:
    """``manager.pull``; on Ctrl-C, stop drawing, record the build as interrupted and exit."""
    try:
        return manager.pull(name, reporter=progress, labels=labels)
    except KeyboardInterrupt:
        progress.close()
        record_interrupted(manager, name)
        exit_interrupted()


def record_interrupted(manager: ImageManager, name: str) -> None:
    """Mark the build of ``name`` ``failed: interrupted`` if this process was running it.

    A build past ``pending`` here holds its digest's build lock in this
    process; a pending one may be waiting for another process's lock, and is
    marked only when nobody holds it.
    """
    try:
        image = manager.get(name)
        ref = parse_reference(f"{image.repository}@{image.digest}")
    except HypemanError:
        return  # nothing recorded yet (still resolving), or gone
    if not image.status.active or ref.digest is None:
        return
    digest: Digest = ref.digest

    def interrupted(record: ImageRecord) -> ImageRecord:
        if not record.status.active:
            return record  # it ended meanwhile
        return record.evolve(status=ImageStatus.FAILED, error=INTERRUPTED)

    if image.status is not ImageStatus.PENDING:
        manager.store.update(ref, digest, interrupted)
        return
    with idle_lock(manager.store.digest_dir(ref, digest)) as free:
        if free:
            manager.store.update(ref, digest, interrupted)

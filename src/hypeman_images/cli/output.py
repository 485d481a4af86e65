"""What the CLI prints besides help: JSON documents, an image, progress.

Data goes to stdout (as JSON with ``--json``); progress and messages go to
stderr, so that ``--json`` output can be piped whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hypeman_images.build.image import Image
from hypeman_images.build.progress import PlainReporter, Reporter, RichReporter

PROG = "hypeman-images"


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    print(json.dumps(value, indent=2))


def image_json(image: Image) -> dict[str, Any]:
    """metadata.json's fields (env as the OCI list) with the live status, tags and disk path."""
    doc: dict[str, Any] = json.loads(image.record.to_json())
    doc.update(
        name=image.name,
        status=str(image.status),
        queue_position=image.queue_position,
        error=image.error,
        repository=image.repository,
        tags=list(image.local_names),
        disk=str(image.disk) if image.disk else None,
    )
    return doc


def reporter(args: argparse.Namespace) -> Reporter:
    """Progress for a pull: none with ``--json``, bars on a terminal, else plain lines."""
    if args.json:
        return Reporter()
    if sys.stderr.isatty() and not args.no_progress:
        return RichReporter()
    return PlainReporter()

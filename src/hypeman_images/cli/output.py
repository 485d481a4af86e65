"""What the CLI prints besides help: JSON documents, an image, progress.

Data goes to stdout (as JSON with ``--json``); progress and messages go to
stderr, so that ``--json`` output can be piped whole.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from hypeman_images.build.image import Image
from hypeman_images.build.progress import PlainReporter, Reporter, RichReporter

PROG = "hypeman-images"

# C0 controls, DEL and C1 controls: ESC starts terminal sequences (colours, OSC
# 8 links, window titles, cursor moves), CR rewrites the line, and in 8-bit
# terminals 0x9b is a CSI of its own.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, *, lines: bool = False) -> str:
    """``text`` for a terminal: every control character shown as an escape (``\\x1b``).

    Values that come from an image (its config's env, user, working dir...)
    are the image author's; printed raw, they could move the cursor, hide
    lines or set the terminal's title. JSON output is exact instead. With
    ``lines``, newlines stay (a message of several lines).
    """
    pattern = _CONTROL_BUT_NEWLINE if lines else _CONTROL
    return pattern.sub(lambda m: _NAMED.get(m[0], f"\\x{ord(m[0]):02x}"), str(text))


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    print(json.dumps(value, indent=2))


def image_json(image: Image) -> dict[str, Any]:
    """metadata.json's fields (env as the OCI list) with the live status, tags and disk path.

    ``tags`` (and ``local_names``, the API's word) are the local tag names; the
    labels ``--label`` sets (hypeman's ``tags``) are ``user_labels``, beside
    the image config's own ``labels``.
    """
    doc: dict[str, Any] = json.loads(image.record.to_json())
    doc.update(
        name=image.name,
        status=str(image.status),
        queue_position=image.queue_position,
        error=image.error,
        repository=image.repository,
        tags=list(image.local_names),
        local_names=list(image.local_names),
        user_labels=dict(image.tags),
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

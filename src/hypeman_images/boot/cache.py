"""Files in the boot cache appear whole or not at all (temp file, fsync, rename)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_atomic(target: Path, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to ``target`` through a fsynced temp file in the same directory.

    Concurrent writers of the same content are safe: the last rename wins and
    readers never see a partial file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

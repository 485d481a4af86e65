"""Path safety: the one chokepoint where a tar name becomes a path inside the image.

Paths are bytes, relative to the image root without a leading ``/`` (``b""``
is the root). ``..`` is resolved lexically and clamped at the root, as umoci
(``filepath.Join("/", name)``) and containerd (``fs.RootPath``) do, so no name
climbs out. Symlinks play no part here: :mod:`merge` follows symlinked parents
within the in-memory tree.
"""

from __future__ import annotations

from hypeman_images.errors import LayerError, LimitExceeded
from hypeman_images.layers.limits import Limits

NAME_MAX = 255  # ext4 (and Linux) limit on one path component


class Where:
    """``"layer 2 (sha256:...), entry 17 (b'usr/bin/x')"``, formatted only for an error.

    ``path`` (the entry's cleaned path) is known once the entry is classified:
    the merge's errors name it, so a user finds the entry without counting.
    """

    __slots__ = ("layer", "ordinal", "path")

    def __init__(self, layer: str, ordinal: int, path: bytes | None = None) -> None:
        self.layer, self.ordinal, self.path = layer, ordinal, path

    def __str__(self) -> str:
        named = "" if self.path is None else f" ({self.path[:200]!r})"
        return f"{self.layer}, entry {self.ordinal}{named}"


def clean_path(raw: bytes, *, where: str | Where, limits: Limits) -> bytes:
    """A tar name made relative to the image root: the only place paths are made safe.

    Leading ``/`` and ``./``, empty and ``.`` segments are dropped, and ``..``
    is resolved lexically and clamped at the root -- ``../x``, ``/x`` and
    ``a/../../x`` all become ``x`` -- as umoci (``filepath.Join("/", hdr.Name)``
    in ``oci/layer/tar_extract.go``) and containerd (``fs.RootPath``) do. The
    result never starts with ``/`` and never climbs out; ``b""`` is the root.
    Symlinks in the tree play no part here: resolution is purely lexical;
    :func:`merge.merge` then follows symlinked parents within the tree.
    """
    if b"\0" in raw:
        raise LayerError(f"{where}: name {raw!r} contains a NUL byte")
    # Fast path (most names, e.g. ``./usr/bin/x`` or ``usr/lib/``): with the ``./``
    # and one trailing ``/`` gone, no segment is empty, ``.`` or ``..`` (none
    # starts with ``.``), and at 255 bytes or less no segment is too long, so the
    # loop below would return the name unchanged.
    name = raw[2:] if raw.startswith(b"./") else raw
    if name.endswith(b"/"):
        name = name[:-1]
    if (
        name
        and len(name) <= NAME_MAX
        and len(name) <= limits.max_path_bytes
        and not name.startswith((b"/", b"."))
        and not name.endswith(b"/")
        and b"//" not in name
        and b"/." not in name
    ):
        return name
    parts: list[bytes] = []
    for part in raw.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        if len(part) > NAME_MAX:
            raise LayerError(
                f"{where}: a component of {raw[:80]!r}... is {len(part)} bytes; ext4 allows "
                f"{NAME_MAX}"
            )
        parts.append(part)
    path = b"/".join(parts)
    if len(path) > limits.max_path_bytes:
        raise LimitExceeded(
            f"{where}: path of {len(path)} bytes exceeds Limits.max_path_bytes="
            f"{limits.max_path_bytes}"
        )
    return path


def split_path(path: bytes) -> tuple[bytes, bytes]:
    """``(parent, name)`` of a cleaned path; the parent is ``b""`` at the root."""
    parent, _, base = path.rpartition(b"/")
    return parent, base


def join_path(parent: bytes, name: bytes) -> bytes:
    """``name`` inside ``parent`` (``b""`` for the root), the inverse of :func:`split_path`."""
    return parent + b"/" + name if parent else name

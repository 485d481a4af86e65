"""Where data lives and the knobs a build takes.

The data dir is ``/var/lib/hypeman`` for root, else ``$XDG_DATA_HOME/hypeman``
(``~/.local/share/hypeman``); ``HYPEMAN_DATA_DIR`` and ``--data-dir`` override.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hypeman_images.errors import InvalidArgument
from hypeman_images.fleet.cache import DiskCache
from hypeman_images.layers.limits import Limits
from hypeman_images.oci.spec import Platform
from hypeman_images.store.formats import DiskFormat

SYSTEM_DATA_DIR = Path("/var/lib/hypeman")
DEFAULT_FREE_SPACE = 16 * 1024 * 1024


def default_data_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """The data dir the rules above give (``--data-dir`` is the CLI's to apply).

    An empty variable counts as unset; a relative ``XDG_DATA_HOME`` is ignored,
    as the XDG Base Directory spec asks ("consider the path invalid").
    """
    env = os.environ if env is None else env
    if env.get("HYPEMAN_DATA_DIR"):
        return absolute(Path(env["HYPEMAN_DATA_DIR"]))
    if (os.geteuid() if euid is None else euid) == 0:
        return SYSTEM_DATA_DIR
    xdg = Path(env.get("XDG_DATA_HOME") or "")
    if not xdg.is_absolute():
        home = Path(env["HOME"]) if env.get("HOME") else Path.home()
        xdg = home / ".local/share"
    return xdg / "hypeman"


def absolute(path: Path) -> Path:
    """``path`` made absolute against the current directory, ``..`` folded, symlinks kept.

    Done once, where a data dir enters (:class:`DataDir`): every path under it
    is then absolute, as the tools it is handed to need (debugfs reads a
    relative value file's name as a path inside the image).
    """
    return Path(os.path.abspath(path))


@dataclass(frozen=True)
class DataDir:
    """The data dir's parts: ``images/`` (the image store) and ``cache/`` (the blob cache).

    ``root`` is made absolute on construction (:func:`absolute`).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", absolute(self.root))

    @property
    def images(self) -> Path:
        """The image store."""
        return self.root / "images"

    @property
    def cache(self) -> Path:
        """The blob cache, an OCI image layout."""
        return self.root / "cache"

    @property
    def boot(self) -> Path:
        """Kernel and initramfs cache for ``boot``."""
        return self.root / "boot"


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``1GiB``, ``4096``: binary units, as mke2fs and dd read them."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise InvalidArgument(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 64M)")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


@dataclass(frozen=True)
class BuildOptions:
    """How one image is turned into a disk.

    ``limits`` are the safety limits against hostile layers (entries, sizes,
    header and path lengths); the defaults fit every real image.
    ``disk_digest``: record the disk's sha256 in metadata.json (reproducibility:
    two builds of a digest can be compared, and ``verify`` checks a disk against
    it; docs/design.md). Hashing is the last step of a build, after mke2fs, on
    one core beside ``e2fsck -fn``, so its cost grows with the disk's size (see
    docs/performance.md); off, the record is ``null``.
    ``one_pass``: build images reading each layer once, as it downloads
    (:mod:`hypeman_images.layers.onepass`), falling back to two passes where that
    cannot decide; off, every image takes the two-pass path after the pull.
    ``check_space``: lower the byte limits to what the data dir's filesystem
    has room for when a build starts (:func:`pipeline.room_for_content`), so an
    image too big for it (a decompression bomb too) fails with
    :class:`StorageError` before its bytes fill the host's disk. Off only to
    test what a disk filled by others does.
    ``disk_cache``: the repository where built disks are shared, looked up
    before a build and pushed to after one (:mod:`hypeman_images.build.diskcache`).
    ``format``: the disk's filesystem, ext4 (by ``mke2fs``) or a read-only
    EROFS image (written by :mod:`hypeman_images.disk.erofs`, in one pass or
    two as ``one_pass`` and the image say; docs/design.md, "EROFS disks").
    """

    platform: Platform = field(default_factory=Platform.host)
    free_space: int = DEFAULT_FREE_SPACE
    mke2fs: str | None = None
    disk_digest: bool = True
    limits: Limits = field(default_factory=Limits)
    one_pass: bool = True
    check_space: bool = True
    disk_cache: DiskCache | None = None
    format: DiskFormat = DiskFormat.EXT4

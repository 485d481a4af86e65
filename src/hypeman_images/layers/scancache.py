"""Pass 1's layer scans kept by blob digest, so a cached layer is scanned once.

A :class:`entries.LayerScan` is a function of the layer blob's bytes (and of
the :class:`limits.Limits` it ran under), so once pass 1 has read a blob and
its diff_id has matched an image config, the scan can be kept beside the blob
and reused by every later image that lists the same blob: a new tag of an
image, or a new image on shared base layers. containerd does the same with the
uncompressed digest it records per content blob. A cached scan is trusted as
much as the blob it describes; the pull re-hashes that blob (its compressed
digest, much cheaper than a scan) and downloads it again if it rotted.

Files live in the blob cache but outside its OCI layout's ``blobs/``::

    <cache>/scans/sha256/<blob hex>

The format is a versioned binary file that loads without running code (never
pickle: the data dir may be less trusted than the code) and fast: one
fixed-size record per entry and its strings in regions of their own, so
loading a scan costs a small fraction of the pass 1 it saves.
It is made of, after an 8-byte magic and three little-endian u32 -- format
version, CRC-32 of everything after them, length of the JSON header --:

- a JSON header: ``blob`` (digest), ``compression``, ``diff_id`` (verified),
  ``size`` (uncompressed bytes), ``limits`` (the :class:`Limits` fields but the byte limits),
  ``entries`` (count) and ``regions`` (the byte length of each below);
- one fixed-size record per entry (:data:`_RECORD`: the integer fields, the
  kind's code and the number of xattrs);
- the paths, each followed by a NUL (a path never contains one);
- the link targets, likewise;
- the xattrs, in entry order: name length, value length, name (UTF-8 with
  surrogate escapes, as :mod:`tarheader` decoded it), value.

Writes are atomic (temp name, rename) but not fsynced: whatever is wrong with
a file -- torn by a crash, truncated, another version, another blob, other
limits, or not even well-formed -- makes it a miss (the byte limits aside: a
scan whose size is within today's ``max_layer_bytes`` is good whatever they
were when it was made, as builds lower them to their disk's room, and the
file does not record them); the layer is scanned again and the file
overwritten. The loader also checks what pass 1
guarantees (clean paths and hard-link names, lengths within the limits), so a
doctored file cannot hand :func:`merge.merge` a path pass 1 would refuse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypeman_images.errors import HypemanError, StorageError
from hypeman_images.fsutil import (
    TEMP_PREFIX,
    allocated_bytes,
    storage_error,
    write_atomic,
    writer_alive,
)
from hypeman_images.layers.entries import Entry, Kind, LayerScan, SparseEntry
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.paths import clean_path
from hypeman_images.layers.scan import SHARED_MAX
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import LAYER_COMPRESSION, Descriptor
from hypeman_images.store.blobs import BlobStore

log = logging.getLogger(__name__)

SCANS_DIR = "scans"
# Bump on any change to what is stored or how (Entry's fields, the record, the
# regions, what pass 1 checks before it keeps an entry): files of another version
# are misses, rescanned and overwritten. 2: device numbers checked, others zeroed.
FORMAT_VERSION = 2
_MAGIC = b"HMSCAN\r\n"
_PREAMBLE = struct.Struct("<8sIII")  # magic, version, crc32 of the rest, header length
# ordinal, kind code, mode, uid, gid, mtime, size, offset, devmajor, devminor, xattrs.
# Unsigned where pass 1 never gives a negative, so a loaded value cannot be one
# either; a scan with a value that does not fit (a PAX uid over 2^32) is not saved.
_RECORD = struct.Struct("<IBHIIqQQIIH")
_XATTR = struct.Struct("<II")  # name length, value length
# The Entry fields, in the order Entry() takes them; a test holds them to entries.Entry.
ENTRY_FIELDS = (
    "ordinal",
    "path",
    "kind",
    "mode",
    "uid",
    "gid",
    "mtime",
    "size",
    "target",
    "devmajor",
    "devminor",
    "xattrs",
    "offset",
)
# Stable codes, not the enum's order: a Kind added or moved must not change them.
KIND_CODES = (
    Kind.FILE,
    Kind.DIR,
    Kind.SYMLINK,
    Kind.LINK,
    Kind.CHAR,
    Kind.BLOCK,
    Kind.FIFO,
    Kind.WHITEOUT,
    Kind.OPAQUE,
)
_CODE_OF_KIND = {kind: code for code, kind in enumerate(KIND_CODES)}
_ENDS = (b"/", b"\0")  # what ends a path segment in the NUL-framed path region


class _Invalid(Exception):
    """The file is not a usable scan; the reason goes to the debug log."""


def encode(scan: LayerScan, layer: Descriptor, limits: Limits) -> bytes:
    """The file that records ``scan`` of ``layer``'s blob, made under ``limits``.

    Raises :class:`struct.error` for a value the format cannot hold, or
    :class:`UnicodeEncodeError` for an xattr name :mod:`tarheader` could not have made.
    """
    records = bytearray()
    xattrs = bytearray()
    for e in scan.entries:
        records += _RECORD.pack(
            e.ordinal,
            _CODE_OF_KIND[e.kind],
            e.mode,
            e.uid,
            e.gid,
            e.mtime,
            e.size,
            e.offset,
            e.devmajor,
            e.devminor,
            len(e.xattrs),
        )
        for name, value in e.xattrs:
            raw = name.encode("utf-8", "surrogateescape")
            xattrs += _XATTR.pack(len(raw), len(value))
            xattrs += raw
            xattrs += value
    paths = b"".join(e.path + b"\0" for e in scan.entries)
    targets = b"".join(e.target + b"\0" for e in scan.entries)
    regions = (records, paths, targets, xattrs)
    header = {
        "blob": str(layer.digest),
        "compression": LAYER_COMPRESSION.get(layer.media_type),
        "diff_id": str(scan.diff_id),
        "size": scan.size,
        # Not the byte limits: builds lower them to their disk's room, and the same
        # scan must make the same file whatever room the build that made it had.
        "limits": _shaping(dataclasses.asdict(limits)),
        "entries": len(scan.entries),
        "regions": [len(r) for r in regions],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    rest = b"".join((head, *regions))
    return _PREAMBLE.pack(_MAGIC, FORMAT_VERSION, zlib.crc32(rest), len(head)) + rest


def decode(data: bytes, layer: Descriptor, index: int, limits: Limits) -> LayerScan:
    """The scan ``data`` records, as layer ``index`` of the image at hand.

    Raises :class:`ValueError` (with the reason) unless ``data`` is a whole
    file of this version for ``layer``'s blob, made under exactly ``limits``.
    """
    try:
        return _decode(data, layer, index, limits)
    except ValueError:
        raise
    except (_Invalid, HypemanError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc


def _decode(data: bytes, layer: Descriptor, index: int, limits: Limits) -> LayerScan:
    if len(data) < _PREAMBLE.size:
        raise _Invalid("shorter than its preamble")
    magic, version, crc, head_len = _PREAMBLE.unpack_from(data)
    if magic != _MAGIC:
        raise _Invalid("not a scan file")
    if version != FORMAT_VERSION:
        raise _Invalid(f"format version {version}, not {FORMAT_VERSION}")
    view = memoryview(data)[_PREAMBLE.size :]
    if zlib.crc32(view) != crc:
        raise _Invalid("checksum mismatch (torn or altered)")
    header = _header(json.loads(bytes(view[:head_len])), layer, limits)
    count: int = header["entries"]
    lengths: list[int] = header["regions"]
    if sum(lengths) != len(view) - head_len or lengths[0] != count * _RECORD.size:
        raise _Invalid("regions do not add up")
    start = head_len
    regions = []
    for length in lengths:
        regions.append(view[start : start + length])
        start += length
    records, path_bytes, target_bytes, xattr_bytes = regions
    path_region = bytes(path_bytes)
    paths = _framed(path_region, count)
    targets = _framed(bytes(target_bytes), count)
    _check_paths(path_region, paths, limits)
    if count and max(map(len, targets)) > limits.max_link_bytes:
        raise _Invalid("a link target is over Limits.max_link_bytes")

    entries = _entries(_RECORD.iter_unpack(records), paths, targets, bytes(xattr_bytes), limits)
    diff_id = Digest.parse(header["diff_id"])
    return LayerScan(index, str(layer.digest), diff_id, header["size"], entries)


def _entries(
    records: Iterator[tuple[Any, ...]],
    paths: list[bytes],
    targets: list[bytes],
    xattr_data: bytes,
    limits: Limits,
) -> tuple[Entry, ...]:
    entries: list[Entry] = []
    append = entries.append
    at = 0
    shared: dict[int, int] = {}  # modes and mtimes, as pass 1 shares them
    for record, path, target in zip(records, paths, targets, strict=True):
        ordinal, code, mode, uid, gid, mtime, size, offset, major, minor, n = record
        kind = KIND_CODES[code]
        if kind is Kind.LINK or kind is Kind.SYMLINK:
            _check_target(kind, target, limits)
        if len(shared) < SHARED_MAX:
            mode, mtime = shared.setdefault(mode, mode), shared.setdefault(mtime, mtime)
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if n:
            xattrs, at = _xattrs(xattr_data, at, n)
        append(
            Entry(
                ordinal,
                path,
                kind,
                mode,
                uid,
                gid,
                mtime,
                size,
                target,
                major,
                minor,
                xattrs,
                offset,
            )
        )
    if at != len(xattr_data):
        raise _Invalid("xattr region has bytes left over")
    return tuple(entries)


def _header(header: Any, layer: Descriptor, limits: Limits) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise _Invalid("header is not an object")
    if header.get("blob") != str(layer.digest):
        raise _Invalid(f"made for blob {header.get('blob')!r}")
    if header.get("compression") != LAYER_COMPRESSION.get(layer.media_type):
        raise _Invalid(f"made for {header.get('compression')!r} content")
    if not isinstance(header.get("limits"), dict) or _shaping(header["limits"]) != _shaping(
        dataclasses.asdict(limits)
    ):
        raise _Invalid("made under other limits")
    count, size, regions = header.get("entries"), header.get("size"), header.get("regions")
    if type(count) is not int or not 0 <= count <= limits.max_entries:
        raise _Invalid(f"entry count {count!r}")
    if type(size) is not int or not 0 <= size <= limits.max_layer_bytes:
        raise _Invalid(f"size {size!r}")
    if not isinstance(regions, list) or len(regions) != 4:
        raise _Invalid("regions")
    if any(type(n) is not int or n < 0 for n in regions):
        raise _Invalid("regions")
    if not isinstance(header.get("diff_id"), str):
        raise _Invalid("diff_id")
    return header


# The byte limits do not change what a scan holds, only whether it may be
# used: a build lowers them to its disk's room (pipeline.build_limits), so they
# are checked against the scan's size below instead of being part of the key.
# The layer count is the image's, never one layer's.
_NOT_SHAPING = ("max_layer_bytes", "max_image_bytes", "max_layers")


def _shaping(limits: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in limits.items() if name not in _NOT_SHAPING}


def _framed(region: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings of ``region``, exactly."""
    parts = region.split(b"\0")
    if len(parts) != count + 1 or parts.pop():
        raise _Invalid("string region does not hold one string per entry")
    return parts


def _check_paths(region: bytes, paths: list[bytes], limits: Limits) -> None:
    """Every path is one :func:`paths.clean_path` could return, all tested at once.

    In the NUL-framed region, that is: no leading or trailing slash, no empty
    segment, no ``.`` or ``..`` segment (one scan for each separator-dot pair,
    then a look at the few dotfiles found).
    """
    framed = b"\0" + region
    if b"//" in framed or b"\0/" in framed or b"/\0" in framed:
        raise _Invalid("a path has an empty segment")
    for separator in (b"/.", b"\0."):
        at = framed.find(separator)
        while at >= 0:
            after = framed[at + 2 : at + 4]
            if after[:1] in _ENDS or (after[:1] == b"." and after[1:] in _ENDS):
                raise _Invalid("a path has a '.' or '..' segment")
            at = framed.find(separator, at + 2)
    if paths and max(map(len, paths)) > limits.max_path_bytes:
        raise _Invalid("a path is over Limits.max_path_bytes")


def _check_target(kind: Kind, target: bytes, limits: Limits) -> None:
    if kind is Kind.SYMLINK and not target:
        raise _Invalid("a symlink has no target")
    if kind is Kind.LINK and clean_path(target, where="scan file", limits=limits) != target:
        raise _Invalid("a hard link's name is not clean")


def _xattrs(data: bytes, at: int, count: int) -> tuple[tuple[tuple[str, bytes], ...], int]:
    out = []
    for _ in range(count):
        name_len, value_len = _XATTR.unpack_from(data, at)
        at += _XATTR.size
        name_end = at + name_len
        end = name_end + value_len
        if end > len(data):
            raise _Invalid("xattr region is short")
        out.append((data[at:name_end].decode("utf-8", "surrogateescape"), data[name_end:end]))
        at = end
    return tuple(out), at


@dataclass(frozen=True)
class ScanCache:
    """Scan files under ``root`` (``<cache>/scans``), one per layer blob digest."""

    root: Path

    @classmethod
    def beside(cls, blobs: BlobStore) -> ScanCache:
        """The scan cache of a blob cache: ``<cache>/scans``."""
        return cls(blobs.root / SCANS_DIR)

    def path(self, blob: Digest) -> Path:
        """Where the scan of ``blob`` lives (whether or not it is there)."""
        return self.root / blob.algorithm / blob.encoded

    def load(self, layer: Descriptor, index: int, limits: Limits) -> LayerScan | None:
        """The saved scan of ``layer``'s blob as layer ``index``, or ``None`` (a miss).

        Any file that is not a whole, current scan of this blob made under
        exactly ``limits`` is a miss.
        """
        path = self.path(layer.digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("scan cache: cannot read %s: %s", path, exc)
            return None
        try:
            return decode(data, layer, index, limits)
        except ValueError as exc:
            log.debug("scan cache: ignoring %s: %s", path, exc)
            return None

    def save(self, layer: Descriptor, scan: LayerScan, limits: Limits) -> bool:
        """Keep ``scan`` of ``layer``'s blob, made under ``limits``; True if it was written.

        Call only once the scan's diff_id has matched the image config's. Best
        effort: the cache only saves time, so failing to write (a full disk, a
        value the format cannot hold) is logged and the build goes on.
        """
        final = self.path(layer.digest)
        if self.root.is_symlink() or final.parent.is_symlink():
            log.warning("scan cache: not saving %s: %s is a symlink", layer.digest, final.parent)
            return False
        if any(isinstance(e, SparseEntry) for e in scan.entries):
            # The format has no place for a sparse map (GNU tar --sparse, rare in
            # images); such a layer is scanned again each time instead.
            log.debug("scan cache: not saving %s: it holds sparse files", layer.digest)
            return False
        try:
            data = encode(scan, layer, limits)
        except (struct.error, UnicodeEncodeError) as exc:
            log.debug("scan cache: not saving %s: %s", layer.digest, exc)
            return False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            # No fsync: a file a crash tears is a miss (its checksum says so).
            write_atomic(final, data, durable=False)
        except (OSError, StorageError) as exc:
            log.warning("scan cache: cannot save %s: %s", final, exc)
            return False
        return True

    def _files(self) -> Iterator[Path]:
        if self.root.is_symlink():
            return  # not ours to clean: gc deletes only inside the data dir
        with contextlib.suppress(FileNotFoundError):
            for alg_dir in sorted(self.root.iterdir()):
                if alg_dir.is_dir() and not alg_dir.is_symlink():
                    yield from (p for p in sorted(alg_dir.iterdir()) if not p.is_dir())

    def sweep(self) -> int:
        """Remove temp files whose writer is gone (a crash); return the bytes freed."""
        freed = 0
        for path in self._files():
            if path.name.startswith(TEMP_PREFIX) and not writer_alive(path.name):
                freed += _remove(path)
        return freed

    def gc(self, blobs: BlobStore) -> tuple[int, int]:
        """Remove the scans of blobs no longer in ``blobs`` and dead writers' temp files.

        Returns how many scan files went and the bytes freed (temp files included).
        """
        removed = freed = 0
        for path in self._files():
            if path.name.startswith(TEMP_PREFIX):
                if not writer_alive(path.name):
                    freed += _remove(path)
                continue
            try:
                blob = Digest.parse(f"{path.parent.name}:{path.name}")
            except HypemanError:
                blob = None  # not a name this module writes
            if blob is None or not blobs.has(blob):
                freed += _remove(path)
                removed += 1
        return removed, freed


def _remove(path: Path) -> int:
    try:
        info = path.lstat()
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise storage_error(exc, f"cannot remove {path}") from exc
    return allocated_bytes(info)


__all__ = ["FORMAT_VERSION", "SCANS_DIR", "ScanCache", "decode", "encode"]

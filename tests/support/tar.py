"""Write tar streams entry by entry, with full control of every header byte.

Python's ``tarfile`` encodes PAX values as UTF-8 text, which corrupts binary
xattr values such as ``security.capability``, and it normalises names. Layers
in tests must be able to carry raw binary xattrs and hostile names, so this
module writes POSIX ustar headers and PAX extended headers (``x``) itself.

PAX records are ``"<len> <key>=<value>\\n"`` where ``len`` counts the whole
record including its own digits (POSIX.1-2008, pax "extended header"). Values
are written as raw bytes; ``hdrcharset=BINARY`` is added when a path is not
valid UTF-8 so that GNU tar and libarchive keep it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

BLOCK = 512

EntryKind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo", "raw"]

_TYPEFLAG: dict[str, bytes] = {
    "file": b"0",
    "hardlink": b"1",
    "symlink": b"2",
    "char": b"3",
    "block": b"4",
    "dir": b"5",
    "fifo": b"6",
}

# Largest values that fit the ustar octal fields (7 digits for ids, 11 for
# size and mtime); anything larger goes into a PAX record instead.
_MAX_ID = 0o7777777
_MAX_SIZE = 0o77777777777


@dataclass(frozen=True)
class TarEntry:
    """One tar member, written exactly as described (name bytes kept as given).

    ``name`` and ``linkname`` are raw bytes so that tests can write hostile or
    non-UTF-8 names. ``xattrs`` become ``SCHILY.xattr.<name>`` PAX records with
    raw binary values. ``pax`` adds arbitrary extra PAX records.
    """

    kind: EntryKind
    name: bytes
    content: bytes = b""
    linkname: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: bytes = b""
    gname: bytes = b""
    mtime: int = 0
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict, hash=False)
    pax: Mapping[str, bytes] = field(default_factory=dict, hash=False)


def _b(value: str | bytes) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value


def file(name: str | bytes, content: bytes = b"", mode: int = 0o644, **kw: Any) -> TarEntry:
    """A regular file."""
    return TarEntry("file", _b(name), content=content, mode=mode, **kw)


def directory(name: str | bytes, mode: int = 0o755, **kw: Any) -> TarEntry:
    """A directory; a trailing ``/`` is added to the name as docker and tar do."""
    raw = _b(name)
    return TarEntry("dir", raw if raw.endswith(b"/") else raw + b"/", mode=mode, **kw)


def symlink(name: str | bytes, target: str | bytes, **kw: Any) -> TarEntry:
    """A symbolic link (mode 0777 as on Linux)."""
    kw.setdefault("mode", 0o777)
    return TarEntry("symlink", _b(name), linkname=_b(target), **kw)


def hardlink(name: str | bytes, target: str | bytes, **kw: Any) -> TarEntry:
    """A hard link to ``target``, a path inside the image (relative to its root)."""
    return TarEntry("hardlink", _b(name), linkname=_b(target), **kw)


def char_device(name: str | bytes, major: int, minor: int, **kw: Any) -> TarEntry:
    """A character device node."""
    return TarEntry("char", _b(name), devmajor=major, devminor=minor, **kw)


def block_device(name: str | bytes, major: int, minor: int, **kw: Any) -> TarEntry:
    """A block device node."""
    return TarEntry("block", _b(name), devmajor=major, devminor=minor, **kw)


def fifo(name: str | bytes, **kw: Any) -> TarEntry:
    """A named pipe."""
    return TarEntry("fifo", _b(name), **kw)


def raw(member: bytes) -> TarEntry:
    """Tar bytes written as they are: a member another tool made (GNU tar's sparse files)."""
    return TarEntry("raw", b"", content=member)


def whiteout(path: str | bytes, **kw: Any) -> TarEntry:
    """``dir/.wh.name``: deletes ``dir/name`` from lower layers (image-spec layer.md)."""
    parent, _, base = _b(path).rstrip(b"/").rpartition(b"/")
    name = (parent + b"/" if parent else b"") + b".wh." + base
    return TarEntry("file", name, mode=0o644, **kw)


def opaque(directory_path: str | bytes, **kw: Any) -> TarEntry:
    """``dir/.wh..wh..opq``: hides every lower-layer child of ``dir``."""
    parent = _b(directory_path).rstrip(b"/")
    return TarEntry("file", (parent + b"/" if parent else b"") + b".wh..wh..opq", **kw)


def _octal(value: int, width: int) -> bytes:
    """A NUL-terminated octal field of ``width`` bytes."""
    return b"%0*o\0" % (width - 1, value)


def pax_record(key: str, value: bytes) -> bytes:
    """One PAX record; its length prefix counts itself."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _ustar_header(
    name: bytes,
    *,
    size: int,
    typeflag: bytes,
    entry: TarEntry | None = None,
    linkname: bytes = b"",
) -> bytes:
    mode = entry.mode if entry else 0o644
    uid = entry.uid if entry and entry.uid <= _MAX_ID else 0
    gid = entry.gid if entry and entry.gid <= _MAX_ID else 0
    mtime = entry.mtime if entry and 0 <= entry.mtime <= _MAX_SIZE else 0
    fields = [
        name[:100].ljust(100, b"\0"),
        _octal(mode & 0o7777777, 8),
        _octal(uid, 8),
        _octal(gid, 8),
        _octal(size if size <= _MAX_SIZE else 0, 12),
        _octal(mtime, 12),
        b" " * 8,  # checksum placeholder: spaces while summing
        typeflag,
        linkname[:100].ljust(100, b"\0"),
        b"ustar\x0000",
        (entry.uname if entry else b"")[:32].ljust(32, b"\0"),
        (entry.gname if entry else b"")[:32].ljust(32, b"\0"),
        _octal(entry.devmajor if entry else 0, 8),
        _octal(entry.devminor if entry else 0, 8),
        b"\0" * 155,
    ]
    header = b"".join(fields).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def _needs_binary_charset(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def encode_entry(entry: TarEntry) -> bytes:
    """The bytes of one member: an optional PAX header, the ustar header, the data."""
    if entry.kind == "raw":
        return entry.content
    size = len(entry.content) if entry.kind == "file" else 0
    records: list[bytes] = []
    if len(entry.name) > 100:
        records.append(pax_record("path", entry.name))
    if len(entry.linkname) > 100:
        records.append(pax_record("linkpath", entry.linkname))
    if any(_needs_binary_charset(v) for v in (entry.name, entry.linkname)) and records:
        records.insert(0, pax_record("hdrcharset", b"BINARY"))
    if entry.uid > _MAX_ID:
        records.append(pax_record("uid", str(entry.uid).encode()))
    if entry.gid > _MAX_ID:
        records.append(pax_record("gid", str(entry.gid).encode()))
    if size > _MAX_SIZE:
        records.append(pax_record("size", str(size).encode()))
    if not 0 <= entry.mtime <= _MAX_SIZE:
        records.append(pax_record("mtime", str(entry.mtime).encode()))
    for key, value in entry.xattrs.items():
        records.append(pax_record("SCHILY.xattr." + key, value))
    for key, value in entry.pax.items():
        records.append(pax_record(key, value))

    out = b""
    if records:
        pax_data = b"".join(records)
        pax_name = b"PaxHeaders/" + entry.name.rstrip(b"/").rpartition(b"/")[2][:80]
        out += _ustar_header(pax_name, size=len(pax_data), typeflag=b"x") + _pad(pax_data)
    out += _ustar_header(
        entry.name, size=size, typeflag=_TYPEFLAG[entry.kind], entry=entry, linkname=entry.linkname
    )
    return out + _pad(entry.content if entry.kind == "file" else b"")


def build_tar(entries: list[TarEntry] | tuple[TarEntry, ...]) -> bytes:
    """A complete tar archive: the members in order, then two zero blocks."""
    return b"".join(encode_entry(e) for e in entries) + b"\0" * (2 * BLOCK)

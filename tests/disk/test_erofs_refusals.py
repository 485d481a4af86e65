"""Input the EROFS format cannot hold is refused with a HypemanError, before any damage."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from support.erofs_check import SEED

from hypeman_images.disk.erofs import Entry, ErofsInputError, ErofsWriter, Kind
from hypeman_images.errors import HypemanError, LayerError

ROOT = Entry(b"", Kind.DIR, mode=0o755)
Case = Callable[[ErofsWriter], None]


def add(*entries: Entry, body: bytes | None = None) -> Case:
    def run(w: ErofsWriter) -> None:
        for e in entries:
            w.add(e, io.BytesIO(body) if body is not None and e.kind is Kind.FILE else None)

    return run


def f(path: bytes, **kw: object) -> Entry:
    return Entry(path, Kind.FILE, **kw)  # type: ignore[arg-type]


CASES: dict[str, Case] = {
    "missing parent": add(ROOT, f(b"no/such")),
    "parent is a file": add(ROOT, f(b"a"), f(b"a/b")),
    "duplicate path": add(ROOT, f(b"a"), f(b"a")),
    "root not first": add(f(b"a")),
    "root a file": add(f(b"")),
    "root twice": add(ROOT, ROOT),
    "empty component": add(ROOT, f(b"a//b")),
    "trailing slash": add(ROOT, Entry(b"d", Kind.DIR), f(b"d/")),
    "dot name": add(ROOT, f(b".")),
    "dotdot name": add(ROOT, f(b"..")),
    "NUL in name": add(ROOT, f(b"a\0b")),
    "256-byte name": add(ROOT, f(b"n" * 256)),
    "mode with type bits": add(ROOT, f(b"a", mode=0o100644)),
    "uid past 32 bits": add(ROOT, f(b"a", uid=1 << 32)),
    "negative gid": add(ROOT, f(b"a", gid=-1)),
    "nsec past a second": add(ROOT, f(b"a", mtime_nsec=10**9)),
    "mtime past 64 bits": add(ROOT, f(b"a", mtime=1 << 63)),
    "size past 16 TiB": add(ROOT, f(b"a", size=(1 << 44) + 1)),
    "body too short": add(ROOT, f(b"a", size=10), body=b"123"),
    "body too long": add(ROOT, f(b"a", size=2), body=b"123"),
    "no body": add(ROOT, f(b"a", size=2)),
    "body on a dir": lambda w: (w.add(ROOT), w.add(Entry(b"d", Kind.DIR), io.BytesIO(b"x"))),  # type: ignore[func-returns-value]
    "sparse map overlaps": add(ROOT, f(b"a", size=100, sparse=((0, 10), (5, 10)))),
    "sparse map past size": add(ROOT, f(b"a", size=100, sparse=((90, 20),))),
    "empty symlink": add(ROOT, Entry(b"l", Kind.SYMLINK)),
    "4096-byte symlink": add(ROOT, Entry(b"l", Kind.SYMLINK, target=b"t" * 4096)),
    "NUL in symlink": add(ROOT, Entry(b"l", Kind.SYMLINK, target=b"a\0")),
    "major past 12 bits": add(ROOT, Entry(b"c", Kind.CHAR, devmajor=4096)),
    "minor past 20 bits": add(ROOT, Entry(b"c", Kind.BLOCK, devminor=1 << 20)),
    "hard link to nothing": add(ROOT, Entry(b"h", Kind.HARDLINK, target=b"x")),
    "hard link to a dir": add(ROOT, Entry(b"d", Kind.DIR), Entry(b"h", Kind.HARDLINK, target=b"d")),
    "xattr without index": add(ROOT, f(b"a", xattrs=((b"gnu.translator", b"x"),))),
    "xattr empty suffix": add(ROOT, f(b"a", xattrs=((b"user.", b"x"),))),
    "xattr name too long": add(ROOT, f(b"a", xattrs=((b"user." + b"n" * 251, b"x"),))),
    "xattr value 64 KiB": add(ROOT, f(b"a", xattrs=((b"user.a", bytes(65536)),))),
    "xattr twice": add(ROOT, f(b"a", xattrs=((b"user.a", b"1"), (b"user.a", b"2")))),
    "add after finish": lambda w: (w.add(ROOT), w.finish(), w.add(f(b"a"))),  # type: ignore[func-returns-value]
    "finish without root": lambda w: w.finish(),  # type: ignore[func-returns-value]
    "finish after a failure": lambda w: _failed_then(w, lambda: w.finish()),
    "add after a failure": lambda w: _failed_then(w, lambda: w.add(f(b"b"))),
}


def _failed_then(w: ErofsWriter, then: Callable[[], object]) -> None:
    w.add(ROOT)
    with pytest.raises(ErofsInputError):
        w.add(f(b"a", size=5), io.BytesIO(b"123"))
    then()


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_refused(tmp_path: Path, case: Case) -> None:
    out_path = tmp_path / "out.img"
    with open(out_path, "wb+") as out:
        writer = ErofsWriter(out, SEED)
        with pytest.raises(ErofsInputError) as info:
            case(writer)
    assert isinstance(info.value, LayerError) and isinstance(info.value, HypemanError)
    assert info.value.code == "bad_layer"
    assert [p.name for p in tmp_path.iterdir()] == ["out.img"]  # nothing written beside it


def test_a_body_stream_with_bytes_is_a_type_error(tmp_path: Path) -> None:
    with open(tmp_path / "out.img", "wb+") as out:
        writer = ErofsWriter(out, SEED)
        writer.add(ROOT)
        with pytest.raises(TypeError):
            writer.add(f(b"a", size=1), b"x")  # type: ignore[arg-type]

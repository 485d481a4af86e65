"""Layer stacks for the flattening edge cases, shared by the golden, oracle and umoci tests.

``CASES`` maps a readable id to a stack of layers (bottom first), each a list
of raw :class:`~support.tar.TarEntry` specs; ``ERRORS`` maps an id to a stack
the flattener must refuse, the exception and a fragment of its message.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypeman_images.errors import LayerError

from . import sparse
from .tar import (
    TarEntry,
    block_device,
    char_device,
    directory,
    fifo,
    file,
    hardlink,
    opaque,
    raw,
    symlink,
    whiteout,
)

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service+ep

Layers = Sequence[Sequence[TarEntry]]


def d(name: str | bytes, **kw: object) -> TarEntry:
    return directory(name, **kw)  # type: ignore[arg-type]


BASE = [d("etc"), file("etc/passwd", b"root:x:0:0\n"), d("usr"), d("usr/bin")]

CASES: dict[str, Layers] = {
    "whiteout_file": [BASE, [whiteout("etc/passwd")]],
    "whiteout_dir": [
        [*BASE, file("usr/bin/a", b"a"), d("usr/bin/sub"), file("usr/bin/sub/b", b"b")],
        [whiteout("usr/bin")],
    ],
    "whiteout_then_parent_recreated": [
        [d("a"), d("a/b"), file("a/b/c", b"old")],
        [whiteout("a")],
        [d("a/b", mode=0o700), file("a/b/new", b"new")],
    ],
    "opaque_alone": [
        [d("o"), file("o/lower1", b"1"), d("o/sub"), file("o/sub/x", b"x"), file("keep", b"k")],
        [d("o", mode=0o750), opaque("o")],
    ],
    "opaque_siblings_before_and_after_marker": [
        [d("o"), file("o/lower", b"1")],
        [d("o"), file("o/before", b"b"), opaque("o"), file("o/after", b"a")],
    ],
    "deleted_then_readded": [
        [file("f", b"one", mode=0o600)],
        [whiteout("f")],
        [file("f", b"three", mode=0o640)],
    ],
    "whiteout_before_and_after_entry_same_layer": [
        [file("x", b"lower"), file("y", b"lower")],
        [whiteout("x"), file("x", b"upper-x"), file("y", b"upper-y"), whiteout("y")],
    ],
    "whiteout_of_nothing": [[file("a", b"a")], [whiteout("nothing"), whiteout("no/such/dir")]],
    "file_to_dir": [[file("p", b"file")], [d("p"), file("p/child", b"c")]],
    "dir_to_file": [[d("p"), file("p/child", b"c")], [file("p", b"now a file")]],
    "dir_to_symlink": [[d("p"), file("p/child", b"c")], [symlink("p", "/etc")]],
    "symlink_to_dir": [[symlink("p", "/etc")], [d("p", mode=0o711), file("p/x", b"x")]],
    "dir_over_dir_keeps_children": [
        [d("p", mode=0o755, uid=1, mtime=100), file("p/child", b"c")],
        [d("p", mode=0o700, uid=2, gid=3, mtime=200)],
    ],
    "duplicate_entries_later_wins": [
        [file("f", b"first"), file("f", b"second", mode=0o600), d("g"), d("g", mode=0o700)]
    ],
    "hardlinks_same_layer": [
        [
            file("a", b"shared", mode=0o755, uid=5, gid=6, mtime=7),
            hardlink("b", "a"),
            hardlink("c/d", "a"),
        ]
    ],
    "hardlink_to_lower_layer": [[file("a", b"shared")], [hardlink("b", "a")]],
    "hardlink_target_deleted_later": [
        [file("a", b"keep me"), hardlink("b", "a")],
        [whiteout("a")],
    ],
    "hardlink_target_replaced_later": [
        [file("a", b"old content"), hardlink("b", "a")],
        [file("a", b"new content")],
    ],
    "hardlink_chain": [[file("a", b"x"), hardlink("b", "a"), hardlink("c", "b")]],
    # Docker, containerd and umoci apply a layer in tar order: each link is made while
    # its lower-layer target exists; the marker after it removes the target's name only.
    "hardlink_to_lower_then_whiteout_same_layer": [
        [
            file("a", b"lower a", mode=0o600, uid=3),
            d("d"),
            file("d/f", b"in d"),
            d("o"),
            file("o/g", b"in o"),
        ],
        [
            hardlink("b", "a"),
            whiteout("a"),
            hardlink("keep-f", "d/f"),
            whiteout("d"),
            hardlink("o/h", "o/g"),
            opaque("o"),
        ],
    ],
    "hardlink_before_target_resolves_to_lower": [
        [file("t", b"lower")],
        [hardlink("l", "t"), file("t", b"upper")],
    ],
    "hardlink_header_metadata_ignored": [
        [file("a", b"x", mode=0o4755, uid=1), hardlink("b", "a", mode=0o600, uid=9)]
    ],
    "symlinks": [
        [
            symlink("rel", "../etc/passwd"),
            symlink("abs", "/etc/passwd"),
            symlink("dangling", "/nowhere"),
            symlink("todir", "usr/bin"),
            symlink("long", "/" + "x" * 70),
            *BASE,
        ]
    ],
    "ids_and_mode_bits": [
        [
            file("big", b"", uid=70000, gid=65536),
            file("huge", b"", uid=1 << 21, gid=(1 << 32) - 2),
            file("suid", b"", mode=0o4755),
            file("sgid", b"", mode=0o2755),
            d("sticky", mode=0o1777),
        ]
    ],
    "xattrs": [
        [
            file("ping", b"elf", mode=0o755, xattrs={"security.capability": CAP}),
            file("u", b"u", xattrs={"user.bin": b"\x00\xff\x01", "trusted.t": b"\xfe"}),
            d("dir", xattrs={"user.d": b"v"}),
            file(
                "drop",
                b"",
                xattrs={
                    "security.selinux": b"x\x00",
                    "trusted.overlay.opaque": b"y",
                    "weird.ns": b"z",
                },
            ),
        ]
    ],
    "devices_fifos": [
        [
            d("dev"),
            char_device("dev/null", 1, 3, mode=0o666),
            block_device("dev/sda", 8, 0),
            fifo("dev/pipe", mode=0o600),
            TarEntry("file", b"dev/sock", mode=0o140755),
        ]
    ],
    "empty_files": [[file("e1", b""), file("e2", b"", mode=0o600), hardlink("e3", "e1")]],
    "odd_names": [
        [
            file("with space", b"1"),
            file(b"new\nline", b"2"),
            file(b"bin\xff\xfe", b"3"),
            file(b"caf\xc3\xa9", b"4"),
            file("n" * 255, b"5"),
            d(b"\xffdir"),
            file(b"\xffdir/" + b"\xfe" * 200, b"6"),
            symlink(b"s\xff", b"t\xfe" * 80),
        ]
    ],
    # 24 levels of 20-byte names: 504 bytes, past ustar's 255 so PAX carries the path.
    "deep_path": [
        [file("/".join([f"level{i:02d}-xxxxxxxxxx"[:20] for i in range(24)]) + "/leaf", b"deep")]
    ],
    "hostile_names": [
        [
            file("../x", b"x"),
            file("/abs", b"abs"),
            file("a/../../b", b"b"),
            file("./c/./d/../e", b"e"),
            hardlink("l", "../../../x"),
            symlink("s", "../../../../etc/shadow"),
        ]
    ],
    "root_entry_sets_root_metadata": [[d("./", mode=0o700, uid=1, gid=2, mtime=99), file("f")]],
    "pax_rename": [[file("short", b"renamed", pax={"path": b"renamed/by/pax"})]],
    "whiteouts_stored_as_link_and_chardev": [
        [file("a", b"a"), file("b", b"b"), file("c", b"c")],
        [TarEntry("hardlink", b".wh.a", linkname=b"c"), TarEntry("char", b".wh.b")],
    ],
    "empty_layers": [[], BASE, []],
    "implicit_parents": [[file("x/y/z", b"z")], [file("x/y/w", b"w")]],
    "marker_implies_directory": [[file("k", b"k")], [whiteout("newdir/sub/gone")]],
    # Symlinked parents are resolved inside the tree (securejoin, as umoci does).
    "symlink_parent_absolute": [
        BASE,
        [symlink("a", "/etc")],
        [file("a/passwd", b"through a\n", mode=0o600), d("a/sub", mode=0o700)],
    ],
    "symlink_parent_same_layer": [[d("etc"), symlink("a", "/etc"), file("a/x", b"x")]],
    "symlink_parent_merged_usr": [
        [d("usr"), d("usr/lib", mtime=5), symlink("lib", "usr/lib"), file("usr/lib/libc.so")],
        [file("lib/x.so", b"elf"), d("lib/x", mode=0o750), file("lib/x/y.so", b"y")],
    ],
    "symlink_parent_dangling_creates_target": [
        [symlink("lib", "usr/lib")],
        [file("lib/x.so", b"elf")],
    ],
    "symlink_parent_relative_clamped": [
        [*BASE, symlink("a", "../../../etc"), d("x"), d("x/y"), symlink("x/y/b", "../../../..")],
        [file("a/one", b"1"), file("x/y/b/etc/two", b"2")],
    ],
    "symlink_parent_chain": [[symlink("a", "b"), symlink("b", "/c")], [file("a/f", b"f")]],
    "symlink_parent_dotdot_is_physical": [
        [d("x"), d("x/y"), symlink("b", "/x/y"), symlink("a", "b/..")],
        [file("a/f", b"lands in x, not in /")],
    ],
    "symlink_replaced_not_followed": [
        [*BASE, symlink("a", "/etc"), symlink("b", "/etc"), symlink("c", "/etc")],
        [file("a", b"a file now"), whiteout("b"), d("c", mode=0o700)],
    ],
    "whiteout_through_symlink": [
        [*BASE, file("etc/group", b"g"), symlink("a", "/etc")],
        [whiteout("a/passwd")],
    ],
    "whiteout_through_symlink_of_same_layer": [
        [d("real"), file("real/x", b"x"), file("real/y", b"y")],
        [symlink("a", "real"), whiteout("a/x"), opaque("a")],
    ],
    "whiteout_in_dir_replacing_symlink": [
        [d("real"), file("real/x", b"x"), symlink("a", "real")],
        [d("a"), whiteout("a/x")],
    ],
    # The same layer with the marker first: umoci now agrees (it deletes real/x), which
    # shows its reading depends on the tar order that layer.md says must not matter.
    "whiteout_before_dir_replacing_symlink": [
        [d("real"), file("real/x", b"x"), symlink("a", "real")],
        [whiteout("a/x"), d("a")],
    ],
    "opaque_through_symlink": [
        [d("real"), file("real/old", b"old"), symlink("o", "real")],
        [opaque("o"), file("o/new", b"new")],
    ],
    "hardlink_through_symlink": [
        [d("usr"), d("usr/lib"), file("usr/lib/libc.so", b"c"), symlink("lib", "usr/lib")],
        [hardlink("libc-link", "lib/libc.so"), hardlink("lib/again", "/lib/libc.so")],
    ],
    "hardlink_to_symlink_itself": [[file("t", b"t"), symlink("s", "t"), hardlink("l", "s")]],
    # Files with holes as GNU tar --sparse --format=posix stores them (all three PAX
    # formats), each a regular file of its real size on the disk: one all hole, one
    # starting with a hole, one hard-linked, one replaced by the layer above.
    "sparse_files": [
        [
            d("data"),
            *(raw(sparse.member(f"data/{fmt}", fmt)) for fmt in ("pax-0.0", "pax-0.1", "pax-1.0")),
            raw(sparse.member("data/all-hole", "pax-1.0", runs=(), size=2 << 20)),
            raw(sparse.member("data/hole-first", "pax-0.1", runs=((1 << 21, b"x" * 4096),))),
            hardlink("data/link", "data/pax-1.0"),
        ],
        [file("data/pax-0.1", b"no longer sparse")],
    ],
    # The old GNU format (type 'S', the map in the header): umoci refuses it (test_umoci).
    "sparse_gnu_format": [[raw(sparse.member("gnu-sparse", "gnu"))]],
}


# The cases a single pass (layers.onepass) leaves to the merge: a parent, marker or link target
# reached through a symlink of a lower layer, and hard links to a file below
# the link's layer (or one a layer above replaced). Pinned, so that a pass
# that gives up more often fails here.
ONE_PASS_FALLS_BACK = {
    "hardlink_before_target_resolves_to_lower",
    "hardlink_target_deleted_later",
    "hardlink_target_replaced_later",
    "hardlink_through_symlink",
    "hardlink_to_lower_layer",
    "hardlink_to_lower_then_whiteout_same_layer",
    "opaque_through_symlink",
    "symlink_parent_absolute",
    "symlink_parent_chain",
    "symlink_parent_dangling_creates_target",
    "symlink_parent_dotdot_is_physical",
    "symlink_parent_merged_usr",
    "symlink_parent_relative_clamped",
    "symlink_parent_same_layer",
    "whiteout_before_dir_replacing_symlink",
    "whiteout_in_dir_replacing_symlink",
    "whiteout_through_symlink",
    "whiteout_through_symlink_of_same_layer",
}


def symlink_chain(n: int) -> list[list[TarEntry]]:
    """``s0 -> s1 -> ... -> /d``, then ``s0/f``: placing it takes ``n`` dereferences."""
    links = [symlink(f"s{i}", f"s{i + 1}") for i in range(n - 1)]
    return [[d("d"), *links, symlink(f"s{n - 1}", "/d")], [file("s0/f", b"f")]]


ERRORS: dict[str, tuple[Layers, type[Exception], str]] = {
    "bare_whiteout": ([[TarEntry("file", b"dir/.wh.")]], LayerError, "no valid name"),
    # Linux's dev_t holds a 12-bit major and a 20-bit minor (MKDEV).
    "device_major_too_big": ([[char_device("dev/x", 4096, 0)]], LayerError, "device number"),
    "device_minor_too_big": ([[char_device("dev/x", 1, 1 << 20)]], LayerError, "device number"),
    "link_to_missing": ([[hardlink("l", "missing")]], LayerError, "no such file"),
    "link_to_dir": ([[d("dd"), hardlink("l", "dd")]], LayerError, "names a directory"),
    # The marker first: the target is gone when the link comes (docker fails as well).
    "link_after_whiteout_of_target": (
        [[file("a", b"x")], [whiteout("a"), hardlink("b", "a")]],
        LayerError,
        "no such file",
    ),
    "link_before_target_same_layer": (
        [[hardlink("l", "t"), file("t", b"x")]],
        LayerError,
        "at this point of the tar",
    ),
    "child_of_file": ([[file("a", b"")], [file("a/b", b"")]], LayerError, "is a file"),
    "symlink_loop": (
        [[symlink("a", "b"), symlink("b", "a")], [file("a/f", b"")]],
        LayerError,
        "too many levels of symbolic links",
    ),
    "symlink_self_loop": ([[symlink("a", "a/x"), file("a/f", b"")]], LayerError, "too many"),
    "symlink_to_file_as_parent": (
        [[file("target", b"t"), symlink("a", "target")], [file("a/f", b"")]],
        LayerError,
        "not a directory",
    ),
    "hop_limit": (symlink_chain(256), LayerError, "too many levels of symbolic links"),
    "root_replaced_by_file": ([[file("/", b"")]], LayerError, "cannot replace the root"),
    "nul_in_pax_path": (
        [[file("x", b"", pax={"path": b"a\x00b"})]],
        LayerError,
        "NUL",
    ),
    "component_too_long": ([[file("n" * 256, b"")]], LayerError, "ext4 allows 255"),
    "inside_whiteout_name": ([[file(".wh.x/y", b"")]], LayerError, "inside a whiteout"),
    "opaque_marker_inside_whiteout_name": (
        [[TarEntry("char", b".wh./.wh..wh..opq")]],
        LayerError,
        "inside a whiteout",
    ),
}

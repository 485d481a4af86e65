"""Read an ext4 disk image back into the oracle's ``dict[str, Node]`` form.

As root the disk is loop-mounted read-only (``noload``: never replay a
journal, the image must not change) and walked with ``lstat``; otherwise
``debugfs`` is driven in batch mode, which is slower and handles only names
without ``"`` or newlines. ``/lost+found`` is left out: mke2fs always creates
it, no layer asked for it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Collection, Mapping
from pathlib import Path

from .oracle import Node, NodeType

_FMT: dict[int, NodeType] = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}
EXCLUDED = frozenset({"/lost+found"})


def read_disk_tree(image: Path | str) -> dict[str, Node]:
    """The tree of an ext4 image: mounted if root, else read with debugfs."""
    return read_mounted(image) if os.geteuid() == 0 else read_with_debugfs(image)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _node_from_lstat(path: str) -> Node:
    st = os.lstat(path)
    kind = _FMT[stat.S_IFMT(st.st_mode)]
    xattrs = {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
    }
    return Node(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else 0,
        sha256=_sha256_file(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        xattrs=xattrs,
        mtime=int(st.st_mtime),
        inode=st.st_ino,
    )


def read_dir_tree(root: Path | str, excluded: Collection[str] = ()) -> dict[str, Node]:
    """Walk a directory on the host as a file tree (``lstat``, never following symlinks).

    Paths are relative to ``root`` and start with ``/``; ``excluded`` paths and
    everything below them are left out. Used for a mounted disk and for the
    rootfs ``umoci unpack`` writes, so both are read by the same code.
    """
    root = os.fspath(root)
    tree = {"/": _node_from_lstat(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
        for name in dirnames + filenames:
            path = (rel.rstrip("/") + "/" + name) if rel != "/" else "/" + name
            if path in excluded:
                continue
            tree[path] = _node_from_lstat(os.path.join(dirpath, name))
        dirnames[:] = [d for d in dirnames if (rel.rstrip("/") + "/" + d) not in excluded]
    return dict(sorted(tree.items()))


def read_mounted(image: Path | str) -> dict[str, Node]:
    """Loop-mount ``image`` read-only and walk it (needs root); always unmounts."""
    with tempfile.TemporaryDirectory(prefix="disk-") as mnt:
        subprocess.run(
            ["mount", "-t", "ext4", "-o", "loop,ro,noload", str(image), mnt],
            check=True,
            capture_output=True,
        )
        try:
            return read_dir_tree(mnt, EXCLUDED)
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)


def _debugfs(image: Path | str, commands: list[str]) -> str:
    result = subprocess.run(
        ["debugfs", "-f", "-", str(image)],
        input="\n".join(commands).encode(),
        capture_output=True,
        check=True,
    )
    return result.stdout.decode("utf-8", "surrogateescape")


def _sections(output: str) -> list[str]:
    """debugfs -f echoes each command as ``debugfs: cmd``; split on those lines."""
    return re.split(r"^debugfs: .*$", output, flags=re.M)[1:]


def _ls(image: Path | str, directories: list[str]) -> dict[str, tuple[int, int, int, int, int]]:
    """path -> (inode, st_mode, uid, gid, size) for the children of ``directories``."""
    out: dict[str, tuple[int, int, int, int, int]] = {}
    sections = _sections(_debugfs(image, [f'ls -p "{d}"' for d in directories]))
    for directory, text in zip(directories, sections, strict=True):
        for line in text.splitlines():
            fields = line.split("/")
            if len(fields) < 7 or fields[5] in (".", ".."):
                continue
            name = "/".join(fields[5:-2])
            size = int(fields[-2]) if fields[-2] else 0
            path = directory.rstrip("/") + "/" + name
            out[path] = (int(fields[1]), int(fields[2], 8), int(fields[3]), int(fields[4]), size)
    return out


def _parse_xattrs(text: str) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    block = text.split("Extended attributes:\n", 1)
    for line in block[1].splitlines() if len(block) == 2 else []:
        match = re.match(r"^  (\S+) \(\d+\)(?: = (.*))?$", line)
        if not match:
            break
        value = match.group(2) or ""
        if value.startswith('"'):
            raw = value[1:-1].encode("latin-1").decode("unicode_escape").encode("latin-1")
        else:
            raw = bytes.fromhex(value.replace(" ", ""))
        xattrs[match.group(1)] = raw
    return xattrs


def read_with_debugfs(image: Path | str) -> dict[str, Node]:
    """Read the tree without root via ``debugfs`` (small disks; simple names)."""
    entries: dict[str, tuple[int, int, int, int, int]] = {}
    level = ["/"]
    while level:
        found = {p: e for p, e in _ls(image, level).items() if p not in EXCLUDED}
        entries.update(found)
        level = [p for p, e in found.items() if stat.S_ISDIR(e[1])]
    root_stat = _sections(_debugfs(image, ['stat "/"']))[0]
    paths = sorted(entries)
    stats = _sections(_debugfs(image, [f'stat "{p}"' for p in paths]))
    with tempfile.TemporaryDirectory(prefix="debugfs-") as tmp:
        # Slow symlinks (targets of 60+ bytes) keep their target in a data block: dumped too.
        files = [p for p in paths if stat.S_ISREG(entries[p][1]) or stat.S_ISLNK(entries[p][1])]
        _debugfs(image, [f'dump "{p}" "{tmp}/{i}"' for i, p in enumerate(files)])
        contents = {p: Path(tmp, str(i)).read_bytes() for i, p in enumerate(files)}
    tree = {"/": _debugfs_node(root_stat, None, b"")}
    for path, text in zip(paths, stats, strict=True):
        tree[path] = _debugfs_node(text, entries[path], contents.get(path, b""))
    return dict(sorted(tree.items()))


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise AssertionError(f"debugfs stat output lacks {pattern!r}:\n{text}")
    return match.group(1)


def _debugfs_node(text: str, entry: tuple[int, int, int, int, int] | None, content: bytes) -> Node:
    mode_ = int(_field(r"Mode:\s+(\d+)", text), 8)
    # debugfs prints ids as signed 32-bit numbers (gid 2**32-2 as -2).
    uid = int(_field(r"User:\s+(-?\d+)", text)) & 0xFFFFFFFF
    gid = int(_field(r"Group:\s+(-?\d+)", text)) & 0xFFFFFFFF
    inode = int(_field(r"Inode: (\d+)", text))
    kind = _FMT[stat.S_IFMT(entry[1])] if entry else "dir"
    mtime = int(_field(r"\bmtime: 0x([0-9a-f]+)", text), 16)
    target = None
    if kind == "symlink":
        fast = re.search(r'Fast link dest: "(.*)"$', text, flags=re.M)
        target = fast.group(1) if fast else content.decode("utf-8", "surrogateescape")
    rdev = None
    if kind in ("char", "block"):
        dev = re.search(r"Device major/minor number: (\d+):(\d+)", text)
        rdev = (int(dev.group(1)), int(dev.group(2))) if dev else None
    return Node(
        type=kind,
        mode=mode_,
        uid=uid,
        gid=gid,
        size=len(content) if kind == "file" else 0,
        sha256=hashlib.sha256(content).hexdigest() if kind == "file" else None,
        target=target,
        rdev=rdev,
        xattrs=_parse_xattrs(text),
        mtime=mtime,
        inode=inode,
    )


def e2fsck_clean(image: Path | str) -> None:
    """Assert ``e2fsck -fn`` finds nothing to fix (exit 0), with its output."""
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, (
        f"e2fsck -fn {image} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


def _link_groups(tree: Mapping[str, Node]) -> dict[str, frozenset[str]]:
    by_inode: defaultdict[int, set[str]] = defaultdict(set)
    for path, node in tree.items():
        if node.type != "dir":
            by_inode[node.inode].add(path)
    return {p: frozenset(group) for group in by_inode.values() for p in group}


def compare_trees(
    expected: Mapping[str, Node],
    actual: Mapping[str, Node],
    *,
    ignore_mtime_for_dirs: bool = False,
    ignore_fields: Collection[str] = (),
) -> list[str]:
    """Readable differences, ``path: field expected X vs actual Y``; [] if equal.

    Hard links are compared as partitions of paths (``inode`` ids themselves
    are never compared). ``ignore_fields`` names Node fields to skip, e.g.
    ``{"xattrs"}`` or ``{"mtime"}``.
    """
    diffs = [f"{p}: missing" for p in sorted(expected.keys() - actual.keys())]
    diffs += [f"{p}: unexpected {actual[p].type}" for p in sorted(actual.keys() - expected.keys())]
    skip = {"inode", *ignore_fields}
    for path in sorted(expected.keys() & actual.keys()):
        want, got = expected[path], actual[path]
        for name in Node.__dataclass_fields__:
            if name in skip or (name == "mtime" and ignore_mtime_for_dirs and want.type == "dir"):
                continue
            a, b = getattr(want, name), getattr(got, name)
            if name == "mode":
                a, b = oct(a), oct(b)
            if a != b:
                diffs.append(f"{path}: {name} expected {a!r} vs actual {b!r}")
    want_groups, got_groups = _link_groups(expected), _link_groups(actual)
    for path in sorted(expected.keys() & actual.keys()):
        if path in want_groups and want_groups[path] != got_groups.get(path):
            a = sorted(want_groups[path])
            b = sorted(got_groups.get(path, ()))
            if a != b:
                diffs.append(f"{path}: hard links expected {a} vs actual {b}")
    return diffs

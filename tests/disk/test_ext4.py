"""ext4 disks from tar streams: the mke2fs -d - path, the staging fallback, sizing, failures."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
from support import stock_e2fsprogs
from support import tar as t
from support.images import IMAGES_DIR

from hypeman_images.disk.debugfs import quote
from hypeman_images.disk.e2fsprogs import TOOLS_FILE, E2fsprogs, find_e2fsprogs, warm_e2fsprogs
from hypeman_images.disk.mke2fs import DiskResult, build_disk
from hypeman_images.disk.sizing import BLOCK_SIZE, SizeInputs, plan_disk
from hypeman_images.errors import StorageError, ToolError
from hypeman_images.oci.digest import Digest

IMAGES = IMAGES_DIR
SEED = Digest.of(b"test seed")
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="loop mounts and tmpfs need root")

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service


# ---------------------------------------------------------------- helpers


def inputs_of(data: bytes) -> SizeInputs:
    """What flatten would count for this (already merged) tar."""
    dirs: dict[str, int] = {"": 0}
    inodes = ndirs = blocks = nbytes = symlinks = xattrs = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            name = m.name.strip("/").removeprefix("./")
            if name in ("", "."):
                continue
            parent, _, leaf = name.rpartition("/")
            dirs[parent] = dirs.get(parent, 0) + (8 + len(leaf.encode()) + 3) // 4 * 4
            for key, value in m.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    xattrs += len(key) - 13 + len(value.encode("utf-8", "surrogateescape"))
            if m.islnk():
                continue
            inodes += 1
            if m.isdir():
                ndirs += 1
                dirs.setdefault(name, 0)
            elif m.isreg():
                blocks += math.ceil(m.size / BLOCK_SIZE)
                nbytes += m.size
            elif m.issym() and len(m.linkname.encode()) >= 60:
                symlinks += 1
    return SizeInputs(inodes, ndirs, nbytes, blocks, symlinks, tuple(dirs.values()), xattrs)


def fixups_of(entries: list[t.TarEntry]) -> list[tuple[bytes, str, bytes]]:
    """The xattrs mke2fs's tar reader drops (everything but security.capability)."""
    return [
        (b"/" + e.name.strip(b"/"), name, value)
        for e in entries
        for name, value in e.xattrs.items()
        if name != "security.capability"
    ]


def build(
    dest: Path,
    entries: list[t.TarEntry],
    tools: E2fsprogs,
    *,
    free_space: int = 0,
    writer: Callable[[BinaryIO], None] | None = None,
) -> DiskResult:
    data = t.build_tar(entries)
    return build_disk(
        dest,
        inputs_of(data),
        writer or (lambda out: out.write(data)),
        seed=SEED,
        free_space=free_space,
        mke2fs=tools,
        xattr_fixups=fixups_of(entries),
    )


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None  # None for directories (entry order may differ, not content)
    sha256: str | None
    link: str | None
    rdev: int
    xattrs: tuple[tuple[str, bytes], ...]
    mtime: int
    group: str | None  # first path of its hard-link group


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    mnt = image.with_suffix(".mnt")
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def tree(image: Path) -> dict[str, Node]:
    """Every path of the disk with what the tar must have put there (loop mount)."""
    out: dict[str, Node] = {}
    seen: dict[int, str] = {}
    with mounted(image) as mnt:
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in (
                ["", *dirnames, *filenames] if dirpath == str(mnt) else [*dirnames, *filenames]
            ):
                full = os.path.join(dirpath, name) if name else dirpath
                rel = "/" + os.path.relpath(full, mnt).removeprefix(".")
                st = os.lstat(full)
                kind = stat.S_IFMT(st.st_mode)
                digest = None
                if stat.S_ISREG(st.st_mode):
                    with open(full, "rb") as f:
                        digest = hashlib.file_digest(f, "sha256").hexdigest()
                xattrs = tuple(
                    sorted(
                        (x, os.getxattr(full, x, follow_symlinks=False))
                        for x in os.listxattr(full, follow_symlinks=False)
                    )
                )
                group = None
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    group = seen.setdefault(st.st_ino, rel)
                out[rel] = Node(
                    kind=oct(kind),
                    mode=st.st_mode,
                    uid=st.st_uid,
                    gid=st.st_gid,
                    size=None if stat.S_ISDIR(st.st_mode) else st.st_size,
                    sha256=digest,
                    link=os.readlink(full) if stat.S_ISLNK(st.st_mode) else None,
                    rdev=st.st_rdev,
                    xattrs=xattrs,
                    mtime=int(st.st_mtime),
                    group=group,
                )
    return out


def _counted_mke2fs(directory: Path) -> tuple[Path, Path]:
    """The real mke2fs behind a wrapper that counts its runs (in the file returned second)."""
    real = shutil.which("mke2fs") or "/sbin/mke2fs"
    runs = directory / "runs"
    wrapper = directory / "mke2fs"
    for tool in ("debugfs", "e2fsck", "dumpe2fs"):
        (directory / tool).symlink_to(shutil.which(tool) or f"/sbin/{tool}")
    wrapper.write_text(f'#!/bin/sh\necho run >> {runs}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, runs


def test_an_unchanged_mke2fs_is_probed_once_a_replaced_one_again(tmp_path: Path) -> None:
    wrapper, runs = _counted_mke2fs(tmp_path)
    first = find_e2fsprogs(wrapper)
    assert first.tar_input
    probes = len(runs.read_text().splitlines())
    assert probes >= 1
    assert find_e2fsprogs(wrapper) is first
    assert len(runs.read_text().splitlines()) == probes
    # apt replacing the binary gives it a new inode and times: probe again.
    replacement = tmp_path / "mke2fs.new"
    replacement.write_text(wrapper.read_text() + "# upgraded\n")
    replacement.chmod(0o755)
    replacement.rename(wrapper)
    assert find_e2fsprogs(wrapper) is not first
    assert len(runs.read_text().splitlines()) == 2 * probes


def test_callers_at_once_share_one_probe_and_a_warm_up_serves_the_next(tmp_path: Path) -> None:
    wrapper, runs = _counted_mke2fs(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: find_e2fsprogs(wrapper), range(4)))
    assert all(f is found[0] for f in found)
    probes = len(runs.read_text().splitlines())
    assert probes == 2  # mke2fs -V and the tar probe, once for the four callers
    # A warm-up started ahead (a disk-cache pull, while it resolves) probes a new
    # installation once; the call that needs the answer waits for it.
    other = tmp_path / "other"
    other.mkdir()
    wrapper2, runs2 = _counted_mke2fs(other)
    warm_e2fsprogs(wrapper2)
    assert find_e2fsprogs(wrapper2).tar_input
    assert len(runs2.read_text().splitlines()) == 2


def test_the_probe_is_kept_for_the_next_process(tmp_path: Path) -> None:
    wrapper, runs = _counted_mke2fs(tmp_path)
    kept = tmp_path / "cache" / TOOLS_FILE
    kept.parent.mkdir()
    first = find_e2fsprogs(wrapper, remember=kept)
    probes = len(runs.read_text().splitlines())
    assert kept.is_file()
    # The next process, with nothing in memory, reads it and runs nothing.
    script = (
        "import sys; from pathlib import Path; from hypeman_images.disk.e2fsprogs import "
        "find_e2fsprogs; t = find_e2fsprogs(Path(sys.argv[1]), remember=Path(sys.argv[2])); "
        "print(t.version_text, t.tar_input, t.debugfs)"
    )
    argv = [sys.executable, "-c", script, str(wrapper), str(kept)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    assert out == [first.version_text, "True", str(tmp_path / "debugfs")]
    assert len(runs.read_text().splitlines()) == probes
    # A kept file that makes no sense is probed again (and rewritten).
    kept.write_text("{not json")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "True"
    assert json.loads(kept.read_text())["version"] == list(first.version)
    assert len(runs.read_text().splitlines()) > probes


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tools() -> E2fsprogs:
    found = find_e2fsprogs()
    if not found.tar_input:
        pytest.skip(found.why_no_tar or "mke2fs cannot read tar")
    return found


@pytest.fixture(scope="session")
def old_tools() -> E2fsprogs:
    """Debian 12's stock e2fsprogs 1.47.0 (no tar input), unpacked into a cache dir."""
    stock_e2fsprogs.unpacked()
    return find_e2fsprogs(
        stock_e2fsprogs.SBIN / "mke2fs", env={"LD_LIBRARY_PATH": str(stock_e2fsprogs.LIBDIR)}
    )


# ---------------------------------------------------------------- trees


def rich_entries() -> list[t.TarEntry]:
    long_target = "/usr/lib/" + "x" * 80
    return [
        t.directory(".", mode=0o755),
        t.directory("etc"),
        t.file("etc/shadow", b"root:*::0:::::\n", mode=0o640, uid=0, gid=42),
        t.file("etc/big-id", b"id", uid=3_000_000, gid=3_000_001),
        t.directory("tmp", mode=0o1777),
        t.directory("bin"),
        t.file("bin/su", b"\x7fELF su", mode=0o4755),
        t.file("bin/wall", b"\x7fELF wall", mode=0o2755, gid=5),
        t.file(
            "bin/ping",
            b"\x7fELF ping",
            mode=0o755,
            xattrs={"security.capability": CAP, "user.foo": b"\x00\xffbar", "trusted.bar": b"b"},
        ),
        t.symlink("bin/sh", "busybox"),
        t.symlink("bin/long", long_target),
        t.file("bin/busybox", b"\x7fELF busybox" * 1000, mode=0o755),
        t.hardlink("bin/ash", "bin/busybox", mode=0o755),
        t.hardlink("bin/hush", "bin/busybox", mode=0o755),
        t.directory("dev"),
        t.char_device("dev/null", 1, 3, mode=0o666),
        t.block_device("dev/loop0", 7, 0, mode=0o660, gid=6),
        t.fifo("dev/initctl", mode=0o600),
        t.directory("with space"),
        t.file('with space/q"uote name', b"q", xattrs={"user.q": b"v"}),
        t.file("mtime", b"m", mtime=1_700_000_000),
    ]


def test_rich_tree_through_tar_path(tmp_path: Path, tools: E2fsprogs) -> None:
    result = build(tmp_path / "rootfs.ext4", rich_entries(), tools)
    assert result.fallback_used is False
    assert result.tool_version == tools.version_text
    if not IS_ROOT:
        pytest.skip("tree checks need a loop mount")
    nodes = tree(tmp_path / "rootfs.ext4")
    assert (nodes["/etc/shadow"].mode, nodes["/etc/shadow"].uid, nodes["/etc/shadow"].gid) == (
        0o100640,
        0,
        42,
    )
    assert (nodes["/etc/big-id"].uid, nodes["/etc/big-id"].gid) == (3_000_000, 3_000_001)
    assert nodes["/tmp"].mode == 0o41777
    assert nodes["/bin/su"].mode == 0o104755
    assert nodes["/bin/wall"].mode == 0o102755
    assert dict(nodes["/bin/ping"].xattrs) == {
        "security.capability": CAP,
        "user.foo": b"\x00\xffbar",
        "trusted.bar": b"b",
    }
    assert nodes["/bin/sh"].link == "busybox"
    assert nodes["/bin/long"].link == "/usr/lib/" + "x" * 80
    assert nodes["/bin/ash"].group == nodes["/bin/hush"].group == nodes["/bin/busybox"].group
    assert nodes["/dev/null"].kind == oct(stat.S_IFCHR)
    assert nodes["/dev/null"].rdev == os.makedev(1, 3)
    assert nodes["/dev/loop0"].rdev == os.makedev(7, 0)
    assert nodes["/dev/initctl"].kind == oct(stat.S_IFIFO)
    assert dict(nodes['/with space/q"uote name'].xattrs) == {"user.q": b"v"}
    assert nodes["/mtime"].mtime == 1_700_000_000


def test_same_inputs_give_the_same_bytes(tmp_path: Path, tools: E2fsprogs) -> None:
    first = build(tmp_path / "a.ext4", rich_entries(), tools)
    second = build(tmp_path / "b.ext4", rich_entries(), tools)
    assert first.sha256 is not None
    assert first.sha256 == second.sha256
    assert first.sha256 == Digest.of((tmp_path / "a.ext4").read_bytes())


def test_size_is_content_plus_free_space(tmp_path: Path, tools: E2fsprogs) -> None:
    tight = build(tmp_path / "tight.ext4", rich_entries(), tools)
    # Slack is the 64-block margin plus a few blocks the estimate rounds up.
    assert tight.free_blocks <= 64 + 32
    roomy = build(tmp_path / "roomy.ext4", rich_entries(), tools, free_space=10 << 20)
    assert roomy.free_blocks * BLOCK_SIZE >= 10 << 20
    assert roomy.free_blocks * BLOCK_SIZE <= (10 << 20) + (96 + 16) * BLOCK_SIZE


@pytest.mark.parametrize("image", ["alpine-minirootfs-3.20.3-x86_64.tar.gz"], ids=["alpine"])
def test_real_image_sizes_tightly(tmp_path: Path, tools: E2fsprogs, image: str) -> None:
    data = gzip.decompress((IMAGES / image).read_bytes())
    inputs = inputs_of(data)
    result = build_disk(
        tmp_path / "rootfs.ext4",
        inputs,
        lambda out: out.write(data),
        seed=SEED,
        free_space=0,
        mke2fs=tools,
    )
    assert result.blocks == plan_disk(inputs).blocks  # no retry happened
    assert result.free_blocks <= 64 + 32
    if IS_ROOT:
        shadow = tree(tmp_path / "rootfs.ext4")["/etc/shadow"]
        assert (shadow.mode, shadow.uid, shadow.gid) == (0o100640, 0, 42)


# ---------------------------------------------------------------- fallback


def test_old_e2fsprogs_is_reported_clearly(old_tools: E2fsprogs) -> None:
    assert old_tools.version == (1, 47, 0)
    assert old_tools.tar_input is False
    assert old_tools.why_no_tar is not None
    assert "1.47.0" in old_tools.why_no_tar
    assert "needs >= 1.47.1" in old_tools.why_no_tar
    assert "bookworm-backports" in old_tools.why_no_tar


@needs_root
def test_fallback_gives_the_same_tree(
    tmp_path: Path, tools: E2fsprogs, old_tools: E2fsprogs
) -> None:
    fast = build(tmp_path / "fast.ext4", rich_entries(), tools)
    slow = build(tmp_path / "slow.ext4", rich_entries(), old_tools)
    assert slow.fallback_used is True
    assert (slow.blocks, slow.inodes) == (fast.blocks, fast.inodes)
    assert tree(tmp_path / "slow.ext4") == tree(tmp_path / "fast.ext4")
    again = build(tmp_path / "again.ext4", rich_entries(), old_tools)
    assert again.sha256 == slow.sha256


@needs_root
def test_fallback_on_alpine(tmp_path: Path, tools: E2fsprogs, old_tools: E2fsprogs) -> None:
    data = gzip.decompress((IMAGES / "alpine-minirootfs-3.20.3-x86_64.tar.gz").read_bytes())
    disks = {}
    for name, which in (("fast", tools), ("slow", old_tools)):
        disks[name] = tmp_path / f"{name}.ext4"
        build_disk(
            disks[name],
            inputs_of(data),
            lambda out: out.write(data),
            seed=SEED,
            free_space=0,
            mke2fs=which,
        )
    assert tree(disks["slow"]) == tree(disks["fast"])


# ---------------------------------------------------------------- failures


def test_mke2fs_failure_leaves_nothing(tmp_path: Path, tools: E2fsprogs) -> None:
    entries = [t.file("orphan/child", b"x"), t.directory("orphan")]
    with pytest.raises(ToolError, match=r"(?s)mke2fs failed.*cannot find directory \"orphan\""):
        build(tmp_path / "rootfs.ext4", entries, tools)
    assert list(tmp_path.iterdir()) == []


def test_stream_error_kills_mke2fs_and_cleans_up(tmp_path: Path, tools: E2fsprogs) -> None:
    def broken(out: BinaryIO) -> None:
        out.write(t.build_tar([t.directory("etc")])[:512])
        raise RuntimeError("layer went away")

    with pytest.raises(RuntimeError, match="layer went away"):
        build(tmp_path / "rootfs.ext4", [t.directory("etc")], tools, writer=broken)
    assert list(tmp_path.iterdir()) == []


def test_stream_error_kills_a_wrapped_mke2fs_whole(tmp_path: Path) -> None:
    # A --mke2fs wrapper that runs the real one as a child (no exec), late: killing
    # only the wrapper left the real mke2fs to start after the temp disk was
    # removed, and mke2fs creates a missing image file (test_load's leftover).
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    real = shutil.which("mke2fs") or "/sbin/mke2fs"
    for tool in ("debugfs", "e2fsck", "dumpe2fs", "resize2fs"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/sbin/{tool}")
    wrapper = bin_dir / "mke2fs"
    wrapper.write_text(f'#!/bin/sh\nsh -c \'sleep 0.5; exec {real} "$@"\' sh "$@"\nexit $?\n')
    wrapper.chmod(0o755)
    wrapped = find_e2fsprogs(wrapper)

    def broken(out: BinaryIO) -> None:
        time.sleep(0.2)  # the wrapper has started its child by now
        raise RuntimeError("layer went away")

    with pytest.raises(RuntimeError, match="layer went away"):
        build(out / "rootfs.ext4", [t.directory("etc")], wrapped, writer=broken)
    time.sleep(1.5)  # past the wrapper's delay: a surviving mke2fs would have run
    assert list(out.iterdir()) == []


@needs_root
def test_full_data_dir_is_a_storage_error(tmp_path: Path, tools: E2fsprogs) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(small)], check=True)
    try:
        entries = [t.file("blob", os.urandom(12 << 20))]
        with pytest.raises(StorageError, match="full"):
            build(small / "rootfs.ext4", entries, tools)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_debugfs_quoting() -> None:
    assert quote(b"/a b") == b'"/a b"'
    assert quote(b'a"b') == b'"/a""b"'
    assert quote(b"/a\nb") == b'"/a\nb"'  # run alone with -R by run_batch
    with pytest.raises(ToolError, match="NUL"):
        quote(b"/a\0b")


# ---------------------------------------------------------------- large files


def sparse_writer(sizes: dict[str, int]) -> tuple[Callable[[BinaryIO], None], dict[str, str]]:
    """A stream of mostly-zero files with data at the start, 2/4 GiB marks and the end."""
    digests: dict[str, str] = {}
    marks = (0, 2**31 - 3, 2**32 - 3)
    data = b"DATA" * 1024

    def body(size: int) -> Iterator[bytes]:
        chunk = 1 << 20
        pos = 0
        while pos < size:
            n = min(chunk, size - pos)
            buf = bytearray(n)
            for mark in (*marks, size - len(data)):
                lo, hi = max(mark, pos), min(mark + len(data), pos + n)
                if lo < hi:
                    buf[lo - pos : hi - pos] = data[lo - mark : hi - mark]
            yield bytes(buf)
            pos += n

    for name, size in sizes.items():
        h = hashlib.sha256()
        for part in body(size):
            h.update(part)
        digests[name] = h.hexdigest()

    def write(out: BinaryIO) -> None:
        for name, size in sizes.items():
            info = tarfile.TarInfo(name)
            info.size = size
            out.write(info.tobuf(format=tarfile.PAX_FORMAT))
            for part in body(size):
                out.write(part)
            out.write(bytes(-size % 512))
        out.write(bytes(1024))

    return write, digests


@pytest.mark.slow
def test_files_over_2_and_4_gib(tmp_path: Path, tools: E2fsprogs) -> None:
    sizes = {"two": 2**31 + 4097, "four": 2**32 + 12345}
    write, digests = sparse_writer(sizes)
    inputs = SizeInputs(
        inodes=2,
        directories=0,
        file_bytes=sum(sizes.values()),
        file_blocks=sum(math.ceil(s / BLOCK_SIZE) for s in sizes.values()),
        long_symlinks=0,
        dirent_bytes=(32,),
        xattr_bytes=0,
    )
    image = tmp_path / "big.ext4"
    build_disk(image, inputs, write, seed=SEED, free_space=0, mke2fs=tools, compute_sha256=False)
    for name, size in sizes.items():
        argv = [str(tools.debugfs), "-R", f"dump /{name} /dev/stdout", str(image)]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as dump:
            assert dump.stdout is not None
            h, count = hashlib.sha256(), 0
            while chunk := dump.stdout.read(1 << 20):
                h.update(chunk)
                count += len(chunk)
        assert (count, h.hexdigest()) == (size, digests[name])


def test_big_directories_fit_the_estimate(tmp_path: Path, tools: E2fsprogs) -> None:
    entries = [t.directory("many")]
    entries += [t.file(f"many/{'n' * (i % 200 + 1)}-{i}", b"x" * (i % 5000)) for i in range(6000)]
    entries += [t.symlink(f"many/link-{i}", "/" + "t" * 100) for i in range(300)]
    data = t.build_tar(entries)
    result = build_disk(
        tmp_path / "rootfs.ext4",
        inputs_of(data),
        lambda out: out.write(data),
        seed=SEED,
        free_space=0,
        mke2fs=tools,
    )
    assert result.blocks == plan_disk(inputs_of(data)).blocks
    assert result.free_blocks <= 64 + 64


def test_an_estimate_too_small_is_retried_larger(
    tmp_path: Path, tools: E2fsprogs, caplog: pytest.LogCaptureFixture
) -> None:
    entries = [t.file(f"f{i}", os.urandom(40_000)) for i in range(100)]
    data = t.build_tar(entries)
    honest = inputs_of(data)
    lying = SizeInputs(
        honest.inodes, 0, honest.file_bytes, honest.file_blocks * 8 // 10, 0, (0,), 0
    )
    result = build_disk(
        tmp_path / "rootfs.ext4",
        lying,
        lambda out: out.write(data),
        seed=SEED,
        free_space=0,
        mke2fs=tools,
    )
    assert result.blocks > plan_disk(lying).blocks
    assert "retrying 25% larger" in caplog.text

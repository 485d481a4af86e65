"""Make the ext4 disk: size it from what flatten counted, run mke2fs, finish, check.

The fast path pipes the merged tar stream into ``mke2fs -d -`` (e2fsprogs
>= 1.47.1). mke2fs's tar reader keeps only ``security.capability`` of a
member's xattrs (misc/create_inode_libarchive.c, ``set_inode_xattr_tar``), so
the rest arrive afterwards as ``xattr_fixups`` through one debugfs batch.
With an older mke2fs, :mod:`hypeman_images.disk.fallback` stages the files
and replays ownership, modes, times, devices and xattrs with debugfs.

Invariants of :func:`build_disk`:

* the disk appears at ``dest`` by rename, only after mke2fs, the fixups and
  ``e2fsck -fn`` all succeeded; on failure the temp file is gone;
* same stream, same seed, same e2fsprogs release => byte-identical file: the
  UUID and directory hash seed come from the seed, every libext2fs clock read
  is pinned by ``E2FSPROGS_FAKE_TIME``, and mke2fs reads our own
  ``mke2fs.conf`` instead of the host's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import signal
import struct
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from hypeman_images.disk import debugfs
from hypeman_images.disk import fallback as ext4_fallback
from hypeman_images.disk.e2fsprogs import E2fsprogs, run_tool, tail, tool_env
from hypeman_images.errors import StorageError, ToolError
from hypeman_images.fsutil import fsync_dir, start_writeback, temp_prefix
from hypeman_images.oci.digest import Digest

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
INODE_SIZE = 256
BLOCKS_PER_GROUP = BLOCK_SIZE * 8
FIXED_TIME = 1  # E2FSPROGS_FAKE_TIME; 0 would mean "use the clock" to libext2fs.

# Inodes 1..10 are reserved and 11 is lost+found (EXT2_GOOD_OLD_FIRST_INO).
_FIRST_INODE = 11
_INODES_PER_ITABLE_BLOCK = BLOCK_SIZE // INODE_SIZE
_DESC_SIZE = 64  # 64bit feature
# A directory block may end in a 12-byte checksum tail (metadata_csum, no longer
# asked for; still reserved so the sizing stays what it was), and an
# entry never spans blocks, so a block can waste up to one maximal entry
# (8 + 255 name bytes, rounded to 4).
_DIR_BLOCK_USABLE = BLOCK_SIZE - 12 - 264
_DOT_ENTRIES = 24  # "." and ".." (12 bytes each)
_LOST_FOUND_BLOCKS = 4  # mke2fs grows lost+found to 16 KiB
_EXTENT_MAX_BLOCKS = 32768  # 128 MiB per extent at 4 KiB blocks
_EXTENTS_PER_BLOCK = (BLOCK_SIZE - 12) // 12  # 340
_MARGIN_BLOCKS = 64
_INODE_MARGIN = 16

# Features spelled out so that neither the host's /etc/mke2fs.conf nor a
# distribution default changes the layout. No journal, no resize_inode: the
# disk is a read-only lower layer, never grown online; dropping the reserved
# GDT blocks saves up to 1024 blocks per backup group.
#
# No metadata_csum (issue 7): with it, mke2fs -d - took 3.1 s against 1.6 s
# without on an 851 MB, 34k-entry image (e2fsprogs 1.47.2, best of 3), and its
# hottest user-space code was libext2fs's software crc32c: linking each entry
# re-reads and re-checksums its directory's blocks. The disk is a read-only
# lower layer: ``e2fsck -fn`` checks it before it is published, so per-block
# checksums would only catch corruption after that, which ``e2fsck -fn`` or
# the whole-file sha256 (``disk_sha256`` in metadata.json)
# catch too, when a consumer cares to check. The result is plain ext4 (as mke2fs
# made it before 1.43), which every Linux mounts read-only. The sizing
# (``_DIR_BLOCK_USABLE``) still reserves the 12-byte directory-block checksum
# tail: a little slack, and disks the same size as before.
FEATURES = (
    "none,ext_attr,dir_index,filetype,extent,64bit,flex_bg,sparse_super,"
    "large_file,huge_file,dir_nlink,extra_isize"
)
# The one-pass build (issue 7) sizes its disk before the stream and shrinks it
# after. Two changes make the shrink a mere truncation: without flex_bg each
# group keeps its inode table inside it, so the groups resize2fs drops take
# theirs along (with flex_bg the first group holds all of a flex group's
# tables and the data starts behind them: resize2fs then had to move blocks,
# and failed); uninit_bg (group descriptor checksums only) lets e2fsck skip
# the inode tables' unused parts, which a generous inode count makes large.
ONE_PASS_FEATURES = FEATURES.replace(",flex_bg,", ",") + ",uninit_bg"
# The most inodes a group can hold (one per block): what the one-pass disk's
# groups get on a large image, since nothing says how many entries the layers
# have before they are read. The table's unused blocks are never written (a
# sparse file), but they count in the disk's size: 8 MiB per 128 MiB group.
ONE_PASS_INODES_PER_GROUP = BLOCKS_PER_GROUP
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 0
\thash_alg = half_md4
\tflex_bg_size = 16
\tlazy_itable_init = false
\terrors = remount-ro

[fs_types]
\text4 = {
\t\tfeatures = extent,huge_file,flex_bg,64bit,dir_nlink,extra_isize
\t}
"""

_NO_BLOCK = re.compile(rb"Could not allocate (block|inode)|No free space in the directory")


@dataclass(frozen=True)
class SizeInputs:
    """What the disk must hold, counted by flatten before the stream starts.

    ``inodes``: distinct inodes of the tree (hard links count once, the root
    directory not included). ``directories``: how many of them are
    directories. ``file_blocks``: sum of ceil(size / 4096) over regular files.
    ``long_symlinks``: symlinks whose target is 60 bytes or longer (shorter
    ones live in the inode). ``dirent_bytes``: per directory, the sum over its
    entries of 8 + len(name) rounded up to 4 ("." and ".." not included).
    ``xattr_bytes``: sum of len(name) + len(value) over all xattrs.
    """

    inodes: int
    directories: int
    file_bytes: int
    file_blocks: int
    long_symlinks: int
    dirent_bytes: Sequence[int]
    xattr_bytes: int


@dataclass(frozen=True)
class DiskLayout:
    """The size chosen for a disk: ``blocks`` of 4 KiB and ``inodes`` (``-N``)."""

    blocks: int
    inodes: int
    content_blocks: int  # estimated blocks for the tree itself, metadata excluded

    @property
    def size_bytes(self) -> int:
        return self.blocks * BLOCK_SIZE


@dataclass(frozen=True)
class DiskResult:
    """What :func:`build_disk` made. ``content_bytes`` is what the filesystem uses."""

    path: Path
    size_bytes: int
    content_bytes: int
    sha256: Digest | None
    blocks: int
    inodes: int
    free_blocks: int
    free_inodes: int
    tool_version: str
    fallback_used: bool


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _backup_groups(groups: int) -> int:
    """Groups holding a superblock copy with sparse_super: 0, 1 and powers of 3, 5, 7."""
    found = {0, 1} & set(range(groups))
    for base in (3, 5, 7):
        power = base
        while power < groups:
            found.add(power)
            power *= base
    return len(found)


def _metadata_blocks(blocks: int, inodes: int, per_group: int = 0) -> tuple[int, int]:
    """Blocks of fs metadata for a filesystem of ``blocks``; and the real inode count.

    ``per_group``: a fixed number of inodes per group (a resize keeps the one
    the disk was made with); otherwise ``inodes`` spread over the groups.
    """
    groups = _ceil(blocks, BLOCKS_PER_GROUP)
    per_group = per_group or (
        _ceil(_ceil(inodes, groups), _INODES_PER_ITABLE_BLOCK) * _INODES_PER_ITABLE_BLOCK
    )
    inode_tables = groups * per_group // _INODES_PER_ITABLE_BLOCK
    gdt = _ceil(groups * _DESC_SIZE, BLOCK_SIZE)
    supers = _backup_groups(groups) * (1 + gdt)
    return supers + 2 * groups + inode_tables, groups * per_group


def _extent_blocks(blocks: int, files: int) -> int:
    """Extent-tree blocks beyond the 4 extents an inode holds.

    A contiguous file needs one extent per 128 MiB plus one per metadata
    region it runs across; a file needs a tree block only past 4 extents,
    i.e. past ~256 MiB. Zero blocks that mke2fs leaves as holes split extents
    too, but each hole is a data block not written, which pays for the
    extent (340 extents per tree block).
    """
    big_files = min(files, blocks // (4 * _EXTENT_MAX_BLOCKS // 2))
    leaves = _ceil(2 * blocks, _EXTENT_MAX_BLOCKS * _EXTENTS_PER_BLOCK)
    return big_files + leaves


def content_blocks(inputs: SizeInputs) -> int:
    """Blocks the tree itself takes: data, directories, symlinks, extents, xattrs."""
    directories = 0
    for used in [*inputs.dirent_bytes, 0]:  # + root when flatten does not list it
        dir_blocks = max(1, _ceil(used + _DOT_ENTRIES, _DIR_BLOCK_USABLE))
        # Directories grow a block at a time between file data: may fragment.
        directories += dir_blocks + (_ceil(dir_blocks, _EXTENTS_PER_BLOCK) if dir_blocks > 4 else 0)
    missing_dirs = max(0, inputs.directories - len(inputs.dirent_bytes))
    files = max(1, inputs.inodes - inputs.directories)
    # An inode's own xattr space is ~92 bytes; anything more takes a block. A
    # spilling inode carries at least ~32 bytes of names and values.
    xattr_blocks = _ceil(inputs.xattr_bytes, 32)
    return (
        inputs.file_blocks
        + _extent_blocks(inputs.file_blocks, files)
        + directories
        + missing_dirs
        + inputs.long_symlinks
        + xattr_blocks
        + _LOST_FOUND_BLOCKS
    )


def plan_disk(inputs: SizeInputs, free_space: int = 0, inodes_per_group: int = 0) -> DiskLayout:
    """The smallest layout that holds ``inputs`` plus ``free_space`` bytes, with a margin.

    Total = content (see :func:`content_blocks`) + free space + a margin of
    64 blocks + metadata, where metadata (superblock and descriptor copies,
    two bitmaps and the inode table of each group) depends on the total: the
    sum is iterated to a fixed point. ``inodes_per_group`` fixes the inode
    table of each group (the size to shrink a one-pass disk to); then there
    are at least enough groups for the inodes.
    """
    if free_space < 0:
        raise ValueError("free_space must not be negative")
    content = content_blocks(inputs)
    want_inodes = _FIRST_INODE + inputs.inodes + _INODE_MARGIN + free_space // 16384
    base = content + _ceil(free_space, BLOCK_SIZE) + _MARGIN_BLOCKS
    if inodes_per_group:
        base = max(base, (_ceil(want_inodes, inodes_per_group) - 1) * BLOCKS_PER_GROUP + 1)
    blocks = base
    for _ in range(20):
        meta, inodes = _metadata_blocks(blocks, want_inodes, inodes_per_group)
        total = base + meta
        # mke2fs drops a last group too small for its own metadata + 50 blocks
        # (ext2fs_initialize); never let the tail group be that small.
        tail_blocks = total % BLOCKS_PER_GROUP
        group_meta = 3 + _ceil(inodes, _ceil(total, BLOCKS_PER_GROUP)) // _INODES_PER_ITABLE_BLOCK
        if 0 < tail_blocks < group_meta + 64:
            total += group_meta + 64 - tail_blocks
        if total == blocks:
            break
        blocks = total
    _, inodes = _metadata_blocks(blocks, want_inodes, inodes_per_group)
    return DiskLayout(blocks=blocks, inodes=inodes, content_blocks=content)


def one_pass_layout(uncompressed: int, free_space: int = 0) -> DiskLayout:
    """A disk that holds any tree the layers' ``uncompressed`` bytes of tar can make.

    Each entry has a 512-byte header, and takes one inode and at most one
    block per 512 bytes of tar (a directory or a 1-byte file: one block for
    1024 bytes of header and body); so one inode and one block per 512 bytes,
    a sixteenth more for their inode tables, the free space and a margin.
    The file is sparse: what is never written costs nothing, and
    :func:`plan_disk` with the disk's own inodes per group says what to shrink
    it to once the tree is known. The inodes per group stay what mke2fs makes
    of this count: a small image's one group gets a small table, a large
    image's groups 32k each (``ONE_PASS_INODES_PER_GROUP``, the most a group
    holds). Implicit parent directories are the one thing not counted: a
    layer of deep paths without directory entries can exhaust it, and mke2fs
    then says so.
    """
    entries = _ceil(uncompressed, 512)
    inodes = _FIRST_INODE + entries + free_space // 16384 + 1024
    blocks = entries + entries // 16 + _ceil(free_space, BLOCK_SIZE) + 4 * _MARGIN_BLOCKS
    groups = _ceil(blocks, BLOCKS_PER_GROUP)
    inodes = min(inodes, groups * ONE_PASS_INODES_PER_GROUP)
    return DiskLayout(blocks=blocks, inodes=inodes, content_blocks=0)


def seed_uuid(seed: Digest, purpose: str) -> uuid.UUID:
    """A UUID derived from the seed digest (a name-based v5 UUID, RFC 4122 §4.3)."""
    namespace = uuid.UUID("6f1d3b1e-8c43-5a4e-9a4f-6879706d616e")
    return uuid.uuid5(namespace, f"{purpose}:{seed}")


def mke2fs_argv(
    tools: E2fsprogs,
    image: Path,
    layout: DiskLayout,
    seed: Digest,
    label: str | None,
    source: str,
    features: str = FEATURES,
) -> list[str]:
    """The mke2fs command line; ``source`` is ``-`` (tar on stdin) or a directory."""
    extended = ",".join(
        [
            "root_owner=0:0",
            "lazy_itable_init=0",
            "nodiscard",
            # A fresh file reads as zeros: no need to write zeroed inode tables.
            "assume_storage_prezeroed=1",
            f"hash_seed={seed_uuid(seed, 'hash-seed')}",
        ]
    )
    # -T default: otherwise mke2fs picks the "floppy"/"small" profile by size.
    argv = [str(tools.mke2fs), "-q", "-t", "ext4", "-T", "default", "-O", features]
    argv += ["-b", str(BLOCK_SIZE)]
    argv += ["-I", str(INODE_SIZE), "-N", str(layout.inodes), "-m", "0", "-E", extended]
    argv += ["-U", str(seed_uuid(seed, "fs-uuid"))]
    if label is not None:
        if len(label.encode()) > 16:
            raise ValueError(f"ext4 labels hold 16 bytes; {label!r} is longer")
        argv += ["-L", label]
    if source != "-":
        # The staged files carry host xattrs (SELinux labels, ...): never copy them.
        argv[argv.index("-E") + 1] += ",no_copy_xattrs"
    return [*argv, "-d", source, str(image), str(layout.blocks)]


def _mke2fs_env(tools: E2fsprogs, conf: Path) -> dict[str, str]:
    env = tool_env(tools, FIXED_TIME)
    env["MKE2FS_CONFIG"] = str(conf)
    return env


def _storage(exc: OSError, doing: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"the data dir's filesystem is full: {doing}: {exc.strerror}")
    return StorageError(f"{doing}: {exc.strerror}")


class _TooSmall(Exception):
    """mke2fs ran out of blocks or inodes: the estimate was too small."""


def _check_mke2fs(rc: int, stderr: bytes) -> None:
    if rc == 0:
        return
    if b"No space left on device" in stderr:
        raise StorageError(f"the data dir's filesystem is full: mke2fs said: {tail(stderr)}")
    if _NO_BLOCK.search(stderr):
        raise _TooSmall(tail(stderr))
    raise ToolError(f"mke2fs failed (exit {rc}): {tail(stderr)}")


_WRITEBACK_EVERY_S = 0.1


@contextlib.contextmanager
def _early_writeback(image: Path) -> Iterator[None]:
    """:func:`fsutil.start_writeback` on ``image`` every 0.1 s while the block runs.

    mke2fs writes the disk and fsyncs it when it closes it: without this the
    whole disk went to the device after the last tar byte (~0.35 s of an
    851 MB image's build, issue 7).
    """
    stop = threading.Event()

    def run() -> None:
        try:
            fd = os.open(image, os.O_RDONLY)
        except OSError:
            return
        try:
            while not stop.wait(_WRITEBACK_EVERY_S):
                start_writeback(fd)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name="writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# Bigger writes into mke2fs's stdin: fewer syscalls and context switches than
# subprocess's 8 KiB buffer and the 64 KiB pipe. The buffer is the stdin's own,
# never a second writer on its fd: one of those, left holding bytes when a
# stream failed, wrote them on its way out into whatever pipe had been given
# the fd number since -- another build's mke2fs ("Damaged tar archive").
_STDIN_BUFFER = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def run_mke2fs_stream(
    argv: list[str], env: dict[str, str], write_stream: Callable[[BinaryIO], None]
) -> None:
    """Run mke2fs with ``write_stream`` feeding its stdin from this thread.

    stdout and stderr go to a temp file, not a pipe, so mke2fs never blocks on
    output while we block on its stdin. If mke2fs dies early the write fails
    with a broken pipe and the error reports mke2fs's stderr instead; if
    ``write_stream`` raises, mke2fs is killed and the exception propagates.
    """
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                env=env,
                bufsize=_STDIN_BUFFER,
                # Its own process group, killed whole: a --mke2fs wrapper script that
                # does not exec would otherwise leave the real mke2fs running, which
                # re-creates the temp disk we removed (mke2fs creates a missing image).
                process_group=0,
            )
        except OSError as exc:
            raise ToolError(f"cannot run mke2fs ({argv[0]}): {exc.strerror}") from exc
        assert proc.stdin is not None
        # Not a pipe, or over /proc/sys/fs/pipe-max-size: keep the size it has.
        with contextlib.suppress(OSError):
            fcntl.fcntl(proc.stdin.fileno(), _F_SETPIPE_SZ, _STDIN_BUFFER)
        broken = False
        try:
            try:
                write_stream(cast(BinaryIO, proc.stdin))
                proc.stdin.close()
            except BrokenPipeError:
                broken = True
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    broken = True
        rc = proc.wait()
        output.seek(0)
        said = output.read()
    _check_mke2fs(rc if rc != 0 or not broken else 1, said or b"mke2fs stopped reading")


def _sha256(path: Path) -> Digest:
    # file_digest hashes in 256 KiB slices and hashlib drops the GIL for each, so
    # this runs on one core while e2fsck (a subprocess) runs on the other.
    with path.open("rb") as handle:
        hasher = hashlib.file_digest(handle, "sha256")
    return Digest("sha256", hasher.hexdigest())


def e2fsck_findings(tools: E2fsprogs, image: Path, lines: int) -> str | None:
    """What ``e2fsck -fn`` found in ``image``: ``None`` if nothing at all, else
    ``(exit N): <the last lines of its output>``."""
    proc = run_tool(tools, [str(tools.e2fsck), "-fn", str(image)], what="e2fsck")
    if proc.returncode == 0:
        return None
    return f"(exit {proc.returncode}): {tail(proc.stdout + proc.stderr, lines)}"


def fsck(tools: E2fsprogs, image: Path) -> None:
    """``e2fsck -fn``: must find nothing at all to fix."""
    findings = e2fsck_findings(tools, image, 25)
    if findings is not None:
        raise ToolError(f"e2fsck -fn found problems in the new disk {findings}")


# The primary superblock: 1024 bytes at offset 1024 (kernel.org ext4 "Super Block").
_SB_OFFSET, _SB_SIZE, _SB_MAGIC = 1024, 1024, 0xEF53
_INCOMPAT_64BIT = 0x80


def superblock_counts(image: Path) -> dict[str, int]:
    """``Block count``, ``Free blocks``, ``Inode count``, ``Free inodes``, ``Inodes per group``.

    Read from the primary superblock directly: the same fields dumpe2fs
    prints (``ext2fs_blocks_count`` and friends take the ``_hi`` halves only
    with the 64bit feature), without a process start. e2fsck -fn has checked
    them against the bitmaps by the time they are used.
    """
    with image.open("rb") as handle:
        handle.seek(_SB_OFFSET)
        sb = handle.read(_SB_SIZE)
    if len(sb) < _SB_SIZE or struct.unpack_from("<H", sb, 0x38)[0] != _SB_MAGIC:
        raise ToolError(f"{image.name} has no ext4 superblock")
    inodes, blocks_lo, _, free_lo, free_inodes = struct.unpack_from("<5I", sb, 0)
    (per_group,) = struct.unpack_from("<I", sb, 0x28)
    blocks_hi, _, free_hi = struct.unpack_from("<3I", sb, 0x150)
    if not struct.unpack_from("<I", sb, 0x60)[0] & _INCOMPAT_64BIT:
        blocks_hi = free_hi = 0
    return {
        "Block count": blocks_hi << 32 | blocks_lo,
        "Free blocks": free_hi << 32 | free_lo,
        "Inode count": inodes,
        "Free inodes": free_inodes,
        "Inodes per group": per_group,
    }


def check_and_hash(
    tools: E2fsprogs,
    image: Path,
    compute_sha256: bool,
    check: Callable[[E2fsprogs, Path], None] = fsck,
) -> Digest | None:
    """``check`` (:func:`fsck`) and the sha256 of ``image``, side by side (two cores, 2x faster)."""
    if not compute_sha256:
        check(tools, image)
        return None
    with ThreadPoolExecutor(1, thread_name_prefix="e2fsck") as pool:
        checked = pool.submit(check, tools, image)
        try:
            digest = _sha256(image)
        finally:
            checked.result()  # e2fsck's verdict first: a bad disk is the error to report
    return digest


def _grow(layout: DiskLayout) -> DiskLayout:
    return DiskLayout(
        blocks=layout.blocks + layout.blocks // 4,
        inodes=layout.inodes + layout.inodes // 4,
        content_blocks=layout.content_blocks,
    )


@contextlib.contextmanager
def _temp_disk(dest: Path) -> Iterator[Path]:
    """A temp file beside ``dest``, removed if the block fails (OSError: StorageError)."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(dest.name), dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise _storage(exc, f"cannot create a temp file in {dest.parent}") from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _storage(exc, f"cannot write the disk {dest}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finish(
    tmp: Path,
    dest: Path,
    tools: E2fsprogs,
    layout: DiskLayout,
    compute_sha256: bool,
    prove: Callable[[], None] | None = None,
) -> DiskResult:
    """Check (and hash) the finished temp disk, ``prove()`` it, move it to ``dest``."""
    digest = check_and_hash(tools, tmp, compute_sha256)
    if prove is not None:
        prove()
    counts = superblock_counts(tmp)
    _commit(tmp, dest)
    blocks, free = counts.get("Block count", layout.blocks), counts.get("Free blocks", 0)
    return DiskResult(
        path=dest,
        size_bytes=blocks * BLOCK_SIZE,
        content_bytes=(blocks - free) * BLOCK_SIZE,
        sha256=digest,
        blocks=blocks,
        inodes=counts.get("Inode count", layout.inodes),
        free_blocks=free,
        free_inodes=counts.get("Free inodes", 0),
        tool_version=tools.version_text,
        fallback_used=not tools.tar_input,
    )


def build_disk(
    dest: Path,
    size_inputs: SizeInputs,
    write_stream: Callable[[BinaryIO], None],
    *,
    seed: Digest,
    free_space: int,
    mke2fs: E2fsprogs,
    xattr_fixups: Iterable[tuple[bytes, str, bytes]] = (),
    label: str | None = None,
    compute_sha256: bool = True,
) -> DiskResult:
    """Write the disk for the tar stream ``write_stream`` produces, atomically, at ``dest``.

    ``write_stream`` is called once (twice, if mke2fs ran out of room and the
    build is retried 25 % larger — logged as a warning, the sizing should
    make it never happen). Raises :class:`ToolError` (mke2fs, debugfs or
    e2fsck failed; the message has their output) or :class:`StorageError`.
    """
    layout = plan_disk(size_inputs, free_space)
    fixups = list(xattr_fixups)
    if not mke2fs.tar_input:
        log.warning("%s — using the slower fallback", mke2fs.why_no_tar)
    with _temp_disk(dest) as tmp:
        with debugfs.new_workdir(dest.parent) as work:
            workdir = Path(work)
            env = _mke2fs_env(mke2fs, _write_conf(workdir))
            for attempt in (1, 2):
                try:
                    tmp.write_bytes(b"")  # mke2fs extends the file to the size asked
                    batch = debugfs.Batch(workdir)
                    if mke2fs.tar_input:
                        argv = mke2fs_argv(mke2fs, tmp, layout, seed, label, "-")
                        with _early_writeback(tmp):
                            run_mke2fs_stream(argv, env, write_stream)
                        debugfs.xattr_batch(batch, fixups)
                    else:
                        _mke2fs_staged(
                            mke2fs, tmp, layout, seed, label, env, write_stream, batch, fixups
                        )
                    break
                except _TooSmall as exc:
                    if attempt == 2:
                        raise ToolError(f"mke2fs ran out of room twice: {exc}") from None
                    log.warning(
                        "disk estimate %s was too small (%s); retrying 25%% larger", layout, exc
                    )
                    layout = _grow(layout)
            debugfs.run_batch(mke2fs, tmp, batch, fake_time=FIXED_TIME)
        return _finish(tmp, dest, mke2fs, layout, compute_sha256)


class OutOfRoom(Exception):
    """The one-pass disk could not hold the tree, or not be shrunk to it."""


def build_disk_one_pass(
    dest: Path,
    uncompressed: int,
    write_stream: Callable[[BinaryIO], None],
    plan: Callable[[], tuple[SizeInputs, Sequence[tuple[bytes, str, bytes]]]],
    prove: Callable[[], None],
    *,
    seed: Digest,
    free_space: int,
    mke2fs: E2fsprogs,
    label: str | None = None,
    compute_sha256: bool = True,
) -> DiskResult:
    """Like :func:`build_disk`, for a stream whose tree is known only once it is written.

    The disk starts at :func:`one_pass_layout` for ``uncompressed``, the most
    tar the layers may hold; after the stream, ``plan()`` returns the tree's size inputs and
    xattr fixups, and ``resize2fs`` shrinks the disk to :func:`plan_disk` of
    them with the disk's own inodes per group; ``prove()`` runs once the disk
    is checked and hashed, before it is moved into place (either raising: the
    temp disk is removed and the error goes on). Raises :class:`OutOfRoom` if mke2fs ran out
    of blocks or inodes or the shrink failed: the caller builds the two-pass
    way then.
    """
    if mke2fs.resize2fs is None or not mke2fs.tar_input:
        raise OutOfRoom("this e2fsprogs cannot build a disk in one pass")
    layout = one_pass_layout(uncompressed, free_space)
    with _temp_disk(dest) as tmp:
        with debugfs.new_workdir(dest.parent) as work:
            workdir = Path(work)
            env = _mke2fs_env(mke2fs, _write_conf(workdir))
            argv = mke2fs_argv(mke2fs, tmp, layout, seed, label, "-", ONE_PASS_FEATURES)
            try:
                with _early_writeback(tmp):
                    run_mke2fs_stream(argv, env, write_stream)
            except _TooSmall as exc:
                raise OutOfRoom(f"the one-pass disk {layout} was too small: {exc}") from None
            inputs, fixups = plan()
            batch = debugfs.Batch(workdir)
            debugfs.xattr_batch(batch, fixups)
            debugfs.run_batch(mke2fs, tmp, batch, fake_time=FIXED_TIME)
        per_group = superblock_counts(tmp)["Inodes per group"]
        final = plan_disk(inputs, free_space, inodes_per_group=per_group)
        _resize(mke2fs, tmp, final.blocks)
        return _finish(tmp, dest, mke2fs, final, compute_sha256, prove)


def _resize(tools: E2fsprogs, image: Path, blocks: int) -> None:
    """``resize2fs -f`` to ``blocks``; :class:`OutOfRoom` if the tree does not fit in it.

    ``-f``: resize2fs's own minimum is an estimate with a wide margin (it
    refused 196k blocks for a tree that fits in them); with every group
    keeping its inode table and the data allocated from the start, the
    shrink is a truncation (~0.1 s from the 610 groups of the 300 MB image).
    """
    assert tools.resize2fs is not None
    proc = run_tool(
        tools, [str(tools.resize2fs), "-f", str(image), str(blocks)], what="resize2fs",
        fake_time=FIXED_TIME,
    )  # fmt: skip
    if proc.returncode != 0:
        raise OutOfRoom(f"resize2fs to {blocks} blocks failed: {tail(proc.stdout + proc.stderr)}")


def _write_conf(workdir: Path) -> Path:
    conf = workdir / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    return conf


def _mke2fs_staged(
    tools: E2fsprogs,
    image: Path,
    layout: DiskLayout,
    seed: Digest,
    label: str | None,
    env: dict[str, str],
    write_stream: Callable[[BinaryIO], None],
    batch: debugfs.Batch,
    fixups: list[tuple[bytes, str, bytes]],
) -> None:
    """The fallback: stage the stream's files, ``mke2fs -d DIR``, queue the metadata."""
    with ext4_fallback.staging_dir(image.parent) as stage:
        done = ext4_fallback.stage(write_stream, stage, batch, FIXED_TIME)
        argv = mke2fs_argv(tools, image, layout, seed, label, str(stage))
        try:
            proc = subprocess.run(argv, capture_output=True, env=env, check=False)
        except OSError as exc:
            raise ToolError(f"cannot run mke2fs ({argv[0]}): {exc.strerror}") from exc
        _check_mke2fs(proc.returncode, proc.stdout + proc.stderr)
    debugfs.xattr_batch(batch, [fix for fix in fixups if (fix[0].strip(b"/"), fix[1]) not in done])


def _commit(tmp: Path, dest: Path) -> None:
    """fsync the file, rename it into place, fsync the directory."""
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)

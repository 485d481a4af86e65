"""Make the ext4 disk: run mke2fs on the tar stream, finish, check, publish.

The fast path pipes the merged tar stream into ``mke2fs -d -`` (e2fsprogs
>= 1.47.1). mke2fs's tar reader keeps only ``security.capability`` of a
member's xattrs (misc/create_inode_libarchive.c, ``set_inode_xattr_tar``), so
the rest arrive afterwards as ``xattr_fixups`` through one debugfs batch.
With an older mke2fs, :mod:`hypeman_images.disk.fallback` stages the files
and replays ownership, modes, times, devices and xattrs with debugfs. The
size comes from :mod:`hypeman_images.disk.sizing`, the checks before the
disk is published from :mod:`hypeman_images.disk.check`.

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
import fcntl
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from hypeman_images.disk import debugfs
from hypeman_images.disk import fallback as ext4_fallback
from hypeman_images.disk.check import check_and_hash, superblock_counts
from hypeman_images.disk.e2fsprogs import E2fsprogs, run_tool, tail, tool_env
from hypeman_images.disk.publish import commit, temp_disk
from hypeman_images.disk.sizing import (
    BLOCK_SIZE,
    INODE_SIZE,
    DiskLayout,
    SizeInputs,
    grow,
    one_pass_layout,
    plan_disk,
)
from hypeman_images.errors import StorageError, ToolError
from hypeman_images.fsutil import start_writeback
from hypeman_images.oci.digest import Digest

log = logging.getLogger(__name__)

FIXED_TIME = 1  # E2FSPROGS_FAKE_TIME; 0 would mean "use the clock" to libext2fs.

# Features spelled out so that neither the host's /etc/mke2fs.conf nor a
# distribution default changes the layout. No journal, no resize_inode: the
# disk is a read-only lower layer, never grown online; dropping the reserved
# GDT blocks saves up to 1024 blocks per backup group.
#
# No metadata_csum: with it, libext2fs's software crc32c was mke2fs -d -'s
# hottest user-space code (linking each entry re-reads and re-checksums its
# directory's blocks) and the step much slower; README.md, "Performance",
# has the figures. The disk is a read-only lower layer: ``e2fsck -fn`` checks
# it before it is published, so per-block checksums would only catch
# corruption after that, which ``e2fsck -fn`` or the whole-file sha256
# (``disk_sha256`` in metadata.json) catch too, when a consumer cares to
# check. The result is plain ext4 (as mke2fs made it before 1.43), which
# every Linux mounts read-only. The sizing (``sizing._DIR_BLOCK_USABLE``)
# still reserves the 12-byte directory-block checksum tail: a little slack,
# and disks the same size as before.
FEATURES = (
    "none,ext_attr,dir_index,filetype,extent,64bit,flex_bg,sparse_super,"
    "large_file,huge_file,dir_nlink,extra_isize"
)
# The one-pass build sizes its disk before the stream and shrinks it after.
# Two changes make the shrink a mere truncation: without flex_bg each
# group keeps its inode table inside it, so the groups resize2fs drops take
# theirs along (with flex_bg the first group holds all of a flex group's
# tables and the data starts behind them: resize2fs then had to move blocks,
# and failed); uninit_bg (group descriptor checksums only) lets e2fsck skip
# the inode tables' unused parts, which a generous inode count makes large.
ONE_PASS_FEATURES = FEATURES.replace(",flex_bg,", ",") + ",uninit_bg"
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
    whole disk goes to the device only after the last tar byte, and the build
    waits for it (README.md, "Performance").
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
    commit(tmp, dest)
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
    with temp_disk(dest) as tmp:
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
                    layout = grow(layout)
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
    with temp_disk(dest) as tmp:
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
    shrink is a truncation.
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

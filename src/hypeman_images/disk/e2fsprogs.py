"""Find the e2fsprogs tools, learn their version, and run them in a pinned environment.

``mke2fs -d -`` (a tar stream on stdin) exists from e2fsprogs 1.47.1 on, and
only when libarchive can be ``dlopen``'d at run time (misc/create_inode_libarchive.c
prints "you need libarchive to be able to process tarballs" otherwise). An
older or libarchive-less mke2fs still works, through the slower staging
fallback in :mod:`hypeman_images.disk.fallback`; :class:`E2fsprogs` says which path a
build takes and why.

Every tool runs with an environment built from scratch (:func:`tool_env`):
nothing from the host but ``PATH`` reaches it, so ``SOURCE_DATE_EPOCH`` (which
mke2fs >= 1.47.1 uses to clamp the *files'* times), ``MKE2FS_SYNC``,
``E2FSPROGS_UNDO_DIR`` or a distribution's ``/etc/mke2fs.conf`` cannot change
the disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hypeman_images.errors import StorageError, ToolError
from hypeman_images.fsutil import write_atomic
from hypeman_images.oci.wire import load_json

log = logging.getLogger(__name__)

TAR_INPUT_VERSION = (1, 47, 1)
TOOLS_FILE = "e2fsprogs.json"  # in the blob cache's directory: the probe's answer, kept
_SEARCH_DIRS = ("/sbin", "/usr/sbin")
_VERSION = re.compile(rb"^mke2fs (\d+)\.(\d+)(?:\.(\d+))?\S* \(([^)]*)\)", re.MULTILINE)
_NO_LIBARCHIVE = b"you need libarchive"
_END_OF_TAR = bytes(1024)


@dataclass(frozen=True)
class E2fsprogs:
    """One installation of e2fsprogs: tool paths, version, and what its mke2fs can do.

    ``env`` holds extra environment variables every tool of this installation
    needs (``LD_LIBRARY_PATH`` for an unpacked copy). ``why_no_tar`` is the
    reason ``tar_input`` is false, written for the person reading the log.
    """

    mke2fs: Path
    debugfs: Path
    e2fsck: Path
    dumpe2fs: Path
    version: tuple[int, int, int]
    release: str
    tar_input: bool
    why_no_tar: str | None = None
    resize2fs: Path | None = None  # only the one-pass build needs it
    env: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def version_text(self) -> str:
        """``1.47.2`` — what the metadata records as the tool version."""
        return ".".join(str(part) for part in self.version)


def tool_env(tools: E2fsprogs, fake_time: int | None = None) -> dict[str, str]:
    """The whole environment a tool runs with; nothing else from the host leaks in.

    ``E2FSPROGS_FAKE_TIME`` pins every time libext2fs would take from the
    clock (superblock times, root and lost+found, debugfs's mknod). It must not
    be 0: libext2fs reads ``fs->now ? fs->now : time(0)``.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    env.update(tools.env)
    if fake_time is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(fake_time)
    return env


def _locate(name: str | Path, near: Path | None = None) -> Path:
    """A tool by explicit path, next to ``near``, on PATH, or in /sbin and /usr/sbin."""
    candidate = Path(name)
    if candidate.parent != Path("."):
        if os.access(candidate, os.X_OK):
            return candidate
        raise ToolError(f"{candidate} is not an executable file")
    if near is not None and os.access(near / candidate, os.X_OK):
        return near / candidate
    found = shutil.which(str(candidate))
    if found is not None:
        return Path(found)
    for directory in _SEARCH_DIRS:
        path = Path(directory) / candidate
        if os.access(path, os.X_OK):
            return path
    raise ToolError(
        f"{candidate} not found on PATH, /sbin or /usr/sbin: install e2fsprogs "
        "(Debian 12: e2fsprogs from bookworm-backports for `mke2fs -d -`)"
    )


def _run_version(mke2fs: Path, env: Mapping[str, str]) -> tuple[tuple[int, int, int], str]:
    try:
        proc = subprocess.run(
            [str(mke2fs), "-V"], capture_output=True, env=dict(env), timeout=30, check=False
        )
    except OSError as exc:
        raise ToolError(f"cannot run {mke2fs} -V: {exc.strerror}") from exc
    match = _VERSION.search(proc.stderr + proc.stdout)
    if match is None:
        text = (proc.stderr + proc.stdout).decode(errors="replace").strip()
        raise ToolError(f"cannot read the version of {mke2fs}: `mke2fs -V` said {text!r}")
    major, minor, patch, date = match.groups()
    version = (int(major), int(minor), int(patch or 0))
    return version, f"{'.'.join(map(str, version))} ({date.decode(errors='replace')})"


def _probe_tar_input(mke2fs: Path, env: Mapping[str, str]) -> str | None:
    """Run mke2fs on an empty tar from stdin; ``None`` when that works, else why not."""
    with tempfile.TemporaryDirectory(prefix="hypeman-probe-") as tmp:
        image = Path(tmp) / "probe.img"
        argv = [str(mke2fs), "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096"]
        try:
            proc = subprocess.run(
                [*argv, "-d", "-", str(image), "256"],
                input=_END_OF_TAR,
                capture_output=True,
                env=dict(env),
                timeout=60,
                check=False,
            )
        except OSError as exc:
            raise ToolError(f"cannot run {mke2fs}: {exc.strerror}") from exc
    if proc.returncode == 0:
        return None
    said = proc.stderr.decode(errors="replace").strip()
    if _NO_LIBARCHIVE in proc.stderr:
        return (
            f"{mke2fs} cannot load libarchive.so.13, which it dlopen()s to read tar "
            f"input (install libarchive13): {said}"
        )
    return f"{mke2fs} failed to read a tar from stdin: {said}"


# What find_e2fsprogs learnt, by installation: the probe costs two process
# runs, which every build would pay, and the one-pass build waits for it
# (docs/performance.md). The key includes the binary's inode, size and times,
# so an upgraded or replaced mke2fs is probed again; a mke2fs that cannot read
# tar is never remembered (installing libarchive fixes it without a restart).
_found: dict[tuple[object, ...], E2fsprogs] = {}
_found_lock = threading.Lock()
# One probe per installation at a time: a second caller waits for the first's
# answer instead of running mke2fs twice (warm_e2fsprogs starts one early).
_probing: dict[tuple[object, ...], threading.Lock] = {}


def find_e2fsprogs(
    mke2fs: str | Path = "mke2fs",
    *,
    env: Mapping[str, str] | None = None,
    remember: Path | None = None,
) -> E2fsprogs:
    """Locate mke2fs and its siblings, read its version, and test ``-d -``.

    ``debugfs``, ``e2fsck`` and ``dumpe2fs`` are taken from mke2fs's own
    directory first, so an unpacked copy of another release is used whole.
    Raises :class:`ToolError` when a tool is missing or does not run. The
    answer for an unchanged installation is remembered for the process, and
    in the file ``remember`` (if given) for the next ones: a CLI pull is a
    process of its own.
    """
    extra = dict(env or {})
    mke2fs_path = _locate(mke2fs)
    try:
        st = mke2fs_path.stat()
    except OSError as exc:
        raise ToolError(f"cannot run {mke2fs_path}: {exc.strerror}") from exc
    key = (
        mke2fs_path,
        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
        tuple(sorted(extra.items())),
        os.environ.get("PATH", ""),
    )
    with _found_lock:
        probing = _probing.setdefault(key, threading.Lock())
    with probing:
        with _found_lock:
            known = _found.get(key)
        if known is None and remember is not None:
            known = _recall(remember, key, mke2fs_path, extra)
        if known is not None:
            with _found_lock:
                _found[key] = known
            if remember is not None and not remember.exists():
                _keep(remember, key, known)  # a data dir new to this process gets it too
            return known
        tools = _probe(mke2fs_path, extra)
        if tools.tar_input:
            with _found_lock:
                _found[key] = tools
            if remember is not None:
                _keep(remember, key, tools)
        return tools


def warm_e2fsprogs(mke2fs: str | Path = "mke2fs", *, remember: Path | None = None) -> None:
    """Start :func:`find_e2fsprogs` on a thread of its own, for a caller that will need it.

    A pull that may take its disk from the disk cache needs the e2fsprogs
    release before its lookup; probed beside the image's resolving, the
    lookup does not wait for two runs of mke2fs. Errors are left to the real
    call, which probes again (and reports them). The thread is not a daemon:
    a process that ends meanwhile waits for the probe to clean up after itself.
    """

    def probe() -> None:
        try:
            find_e2fsprogs(mke2fs, remember=remember)
        except (ToolError, StorageError, OSError) as exc:
            log.debug("e2fsprogs probe ahead of the pull: %s", exc)

    threading.Thread(target=probe, name="e2fsprogs-probe").start()


def _key_text(key: tuple[object, ...]) -> str:
    return repr(tuple(str(part) if isinstance(part, Path) else part for part in key))


def _recall(
    path: Path, key: tuple[object, ...], mke2fs: Path, extra: dict[str, str]
) -> E2fsprogs | None:
    """The probe's answer kept in ``path`` for this installation, if any.

    Only what the probe learnt is read back (mke2fs's version, that it reads
    tar); the tools are located again, never taken from the file.
    """
    try:
        doc = load_json(path.read_text())
        if doc["key"] != _key_text(key):
            return None
        major, minor, patch = (int(part) for part in doc["version"])
        release = str(doc["release"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none kept, or torn, or from another version: probe again
    return _tools(mke2fs, (major, minor, patch), release, None, extra)


def _keep(path: Path, key: tuple[object, ...], tools: E2fsprogs) -> None:
    doc = {"key": _key_text(key), "version": list(tools.version), "release": tools.release}
    try:
        write_atomic(path, json.dumps(doc).encode() + b"\n", durable=False)
    except (OSError, StorageError) as exc:  # only a cache: the next process probes again
        log.debug("cannot keep the e2fsprogs probe in %s: %s", path, exc)


def _probe(mke2fs_path: Path, extra: dict[str, str]) -> E2fsprogs:
    probe_env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", **extra}
    version, release = _run_version(mke2fs_path, probe_env)
    why_not: str | None
    if version < TAR_INPUT_VERSION:
        why_not = (
            f"e2fsprogs {release} found at {mke2fs_path}; `mke2fs -d -` needs >= 1.47.1 "
            "(Debian 12: install e2fsprogs from bookworm-backports)"
        )
    else:
        why_not = _probe_tar_input(mke2fs_path, probe_env)
    return _tools(mke2fs_path, version, release, why_not, extra)


def _tools(
    mke2fs: Path,
    version: tuple[int, int, int],
    release: str,
    why_not: str | None,
    extra: dict[str, str],
) -> E2fsprogs:
    near = mke2fs.parent
    return E2fsprogs(
        mke2fs=mke2fs,
        debugfs=_locate("debugfs", near),
        e2fsck=_locate("e2fsck", near),
        dumpe2fs=_locate("dumpe2fs", near),
        version=version,
        release=release,
        tar_input=why_not is None,
        why_no_tar=why_not,
        resize2fs=_optional("resize2fs", near),
        env=extra,
    )


def _optional(name: str, near: Path) -> Path | None:
    try:
        return _locate(name, near)
    except ToolError:
        return None


def run_tool(
    tools: E2fsprogs, argv: list[str], *, what: str, fake_time: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run one e2fsprogs command to completion; :class:`ToolError` if it cannot start."""
    try:
        return subprocess.run(
            argv, capture_output=True, env=tool_env(tools, fake_time), check=False
        )
    except OSError as exc:
        raise ToolError(f"cannot run {what} ({argv[0]}): {exc.strerror}") from exc


def tail(data: bytes, lines: int = 15) -> str:
    """The last lines of a tool's output, decoded for an error message."""
    text = data.decode(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])

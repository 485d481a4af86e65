"""The boot initramfs: busybox, the kernel modules the init needs, and ``init.sh``.

The modules of an EROFS root (:func:`kernel.erofs_modules`) are in it too,
listed apart in ``/etc/hypeman/modules-erofs``: the init loads them only to
mount an EROFS disk.

Written as cpio "newc" archives (Documentation/driver-api/early-userspace/
buffer-format.rst) by Python, so entries have fixed owners, inodes and mtimes
and need no root for the ``/dev/console`` node. The archive is uncompressed:
it is ~3 MiB and decompressing under TCG costs more than loading it.

The base archive is built once per (kernel, init.sh, busybox) and cached; each
boot appends a tiny second archive with ``/etc/hypeman/run.conf``. Linux
unpacks concatenated archives in order into the same rootfs.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hypeman_images.boot.cache import write_atomic
from hypeman_images.boot.kernel import Kernel, Module, erofs_modules, read_module, resolve_modules
from hypeman_images.errors import BootError

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
# busybox's nsenter clears the supplementary groups and its setpriv cannot set
# them; util-linux's setpriv (Essential in Debian) sets gid and groups before
# nsenter drops to the uid. It runs from the initramfs root, with its loader
# and libraries at the paths ldd found them on the host.
SETPRIV = Path("/usr/bin/setpriv")
_DIRS = (
    *("bin", "dev", "etc", "etc/hypeman", "lib", "lib/modules"),
    *("lower", "newroot", "proc", "rw", "sys"),
)


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``data`` is the file content or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def cpio_newc(entries: Iterable[CpioEntry]) -> Iterator[bytes]:
    """Yield a newc archive of ``entries`` (owner root, mtime 0) with its trailer."""
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], 1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino if entry.name != "TRAILER!!!" else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,
            0,  # mtime
            len(entry.data),
            0,  # dev major
            0,  # dev minor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        yield header + name + _pad(len(header) + len(name))
        if entry.data:
            yield entry.data + _pad(len(entry.data))


def init_script() -> bytes:
    """Return the bytes of the packaged ``init.sh``."""
    return resources.files("hypeman_images.boot").joinpath("init.sh").read_bytes()


def program_files(program: Path) -> list[tuple[str, bytes]]:
    """``program`` and every shared object ``ldd`` lists for it: (path without "/", bytes).

    Symlinks are read through, so each file lands at the path the loader asks
    for (``/lib64/ld-linux-x86-64.so.2`` is a link on Debian).
    """
    try:
        proc = subprocess.run(
            ["ldd", str(program)], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BootError(f"cannot run ldd on {program}: {exc}") from exc
    paths = [program]
    for line in proc.stdout.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-... (0x...)"
        words = line.split()
        found = words[words.index("=>") + 1] if "=>" in words else words[0] if words else ""
        if found.startswith("/"):
            paths.append(Path(found))
    try:
        return [(str(path).lstrip("/"), path.read_bytes()) for path in paths]
    except OSError as exc:
        raise BootError(
            f"cannot read {exc.filename}: boot needs util-linux's setpriv and its libraries "
            f"(apt install util-linux) ({exc.strerror})"
        ) from exc


def _parents(names: list[str]) -> list[str]:
    """Every directory above ``names`` not in ``_DIRS``, parents first."""
    out: dict[str, None] = {}
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.setdefault("/".join(parts[:i]))
    return [d for d in out if d not in _DIRS]


def _erofs_modules(kernel: Kernel) -> list[Module]:
    """The EROFS root's modules; none if the kernel has no erofs (``boot`` refuses such a disk)."""
    try:
        return erofs_modules(kernel)
    except BootError:
        return []


def _base_entries(
    kernel: Kernel, busybox: bytes, programs: list[tuple[str, bytes]]
) -> list[CpioEntry]:
    modules, erofs = resolve_modules(kernel), _erofs_modules(kernel)
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in _DIRS]
    entries += [CpioEntry(d, stat.S_IFDIR | 0o755) for d in _parents([n for n, _ in programs])]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("init", stat.S_IFREG | 0o755, init_script()),
        CpioEntry(
            "etc/hypeman/modules",
            stat.S_IFREG | 0o644,
            "".join(f"{m.name}\n" for m in modules).encode(),
        ),
        CpioEntry(
            "etc/hypeman/modules-erofs",
            stat.S_IFREG | 0o644,
            "".join(f"{m.name}\n" for m in erofs).encode(),
        ),
    ]
    entries += [CpioEntry(name, stat.S_IFREG | 0o755, data) for name, data in programs]
    entries += [
        CpioEntry(f"lib/modules/{m.name}.ko", stat.S_IFREG | 0o644, read_module(m))
        for m in [*modules, *erofs]
    ]
    return entries


def base_initramfs(
    kernel: Kernel, cache_dir: Path, busybox: Path = BUSYBOX, setpriv: Path = SETPRIV
) -> Path:
    """Return the cached base initramfs for ``kernel``, building it on first use.

    The file name carries the kernel version and a hash of everything that goes
    in, so a changed ``init.sh``, busybox or setpriv gives a new file, never a
    stale one.
    """
    try:
        busybox_bytes = busybox.read_bytes()
    except OSError as exc:
        raise BootError(f"cannot read {busybox}: install busybox-static ({exc})") from exc
    programs = program_files(setpriv)
    key = hashlib.sha256()
    for part in (kernel.version.encode(), init_script(), busybox_bytes):
        key.update(hashlib.sha256(part).digest())
    for name, data in programs:
        key.update(name.encode() + hashlib.sha256(data).digest())
    for module in [*resolve_modules(kernel), *_erofs_modules(kernel)]:
        st = module.path.stat()
        key.update(f"{module.path}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = cache_dir / f"initramfs-{kernel.version}-{key.hexdigest()[:16]}.cpio"
    if target.exists():
        return target
    write_atomic(target, cpio_newc(_base_entries(kernel, busybox_bytes, programs)))
    log.info("built %s", target)
    return target


def run_archive(run_conf: bytes) -> bytes:
    """Return the per-boot archive holding ``/etc/hypeman/run.conf``."""
    entry = CpioEntry("etc/hypeman/run.conf", stat.S_IFREG | 0o644, run_conf)
    return b"".join(cpio_newc([entry]))


def boot_initramfs(base: Path, run_conf: bytes, target: Path) -> Path:
    """Write ``base`` followed by the run archive to ``target`` (a per-boot file)."""
    with base.open("rb") as src:
        write_atomic(target, [src.read(), run_archive(run_conf)])
    return target

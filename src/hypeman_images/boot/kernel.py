"""The host's Debian kernel, as a guest kernel: its image, vmlinux and modules.

QEMU boots the compressed ``vmlinuz`` (a bzImage) directly. Cloud Hypervisor
direct-boots an ELF ``vmlinux`` through its PVH entry point (the Xen
``XEN_ELFNOTE_PHYS32_ENTRY`` note, present because Debian builds with
``CONFIG_PVH=y``); bzImage support in Cloud Hypervisor has come and gone
(https://github.com/cloud-hypervisor/cloud-hypervisor/issues/5766), so we
unpack the vmlinux from the bzImage ourselves: the setup header's
``payload_offset``/``payload_length`` locate the compressed kernel
(Documentation/arch/x86/boot.rst, protocol 2.08+).
"""

from __future__ import annotations

import gzip
import logging
import lzma
import re
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from hypeman_images.boot.cache import write_atomic
from hypeman_images.errors import BootError

log = logging.getLogger(__name__)

#: What the init needs: virtio over MMIO (QEMU microvm) or PCI (Cloud
#: Hypervisor), the virtio block device, ext4 for the disk, overlay for writes.
#: Built-in ones are skipped; dependencies are added from modules.dep.
REQUIRED_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "ext4", "overlay")
#: What an EROFS root needs besides (Documentation/filesystems/erofs.rst): the
#: erofs module, a module in Debian's cloud kernel, with its dependencies
#: (libcrc32c on 6.1). Loaded only to boot an EROFS disk.
EROFS_MODULES = ("erofs",)

_XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class Kernel:
    """A kernel image with its version and module tree."""

    version: str
    image: Path
    modules_dir: Path


@dataclass(frozen=True)
class Module:
    """A loadable kernel module: its name (as insmod and the cmdline spell it) and file."""

    name: str
    path: Path


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_kernel(
    boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> Kernel:
    """Return the newest ``vmlinuz-*`` in ``boot_dir`` that has a module tree.

    ``-cloud-amd64`` flavours are preferred: they are built for VMs and boot fastest.
    """
    found: list[Kernel] = []
    for image in boot_dir.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if (modules_root / version / "modules.dep").is_file():
            found.append(Kernel(version, image, modules_root / version))
    if not found:
        raise BootError(
            f"no kernel found: need {boot_dir}/vmlinuz-<version> with {modules_root}/<version>; "
            "install linux-image-cloud-amd64"
        )
    found.sort(key=lambda k: (k.version.endswith("-cloud-amd64"), _version_key(k.version)))
    return found[-1]


def _module_name(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1].split(".ko", 1)[0]
    return name.replace("-", "_")


def resolve_modules(kernel: Kernel, wanted: tuple[str, ...] = REQUIRED_MODULES) -> list[Module]:
    """Return the modules to insmod for ``wanted``, dependencies first.

    Names that are built into the kernel (``modules.builtin``) need nothing.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[_module_name(target)] = (target, [_module_name(d) for d in rest.split()])
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = (
        {_module_name(x) for x in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    ordered: list[Module] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        if name not in deps:
            raise BootError(
                f"kernel {kernel.version} has no module {name!r} and does not build it in"
            )
        seen.add(name)
        target, requires = deps[name]
        # modules.dep lists dependencies so that loading them right to left works.
        for dep in reversed(requires):
            visit(dep)
        ordered.append(Module(name, kernel.modules_dir / target))

    for name in wanted:
        visit(name)
    return ordered


def erofs_modules(kernel: Kernel) -> list[Module]:
    """The modules an EROFS root adds to :func:`resolve_modules`'s, dependencies first.

    Raises :class:`BootError` when the kernel neither builds erofs in nor has it as a module.
    """
    base = {m.name for m in resolve_modules(kernel)}
    return [m for m in resolve_modules(kernel, EROFS_MODULES) if m.name not in base]


def read_module(module: Module) -> bytes:
    """Return the module's ELF bytes, decompressing ``.ko.xz``/``.ko.zst``/``.ko.gz``."""
    data = module.path.read_bytes()
    suffix = module.path.suffix
    if suffix == ".xz":
        return lzma.decompress(data)
    if suffix == ".zst":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if suffix == ".gz":
        return gzip.decompress(data)
    return data


def _lz4_decompress(payload: bytes) -> bytes:
    # The kernel's LZ4 payload is the legacy frame format with the
    # uncompressed size appended; the lz4 tool reads the former only.
    try:
        result = subprocess.run(["lz4", "-dc"], input=payload[:-4], capture_output=True, check=True)
    except FileNotFoundError as exc:
        raise BootError("the kernel is LZ4-compressed: install the lz4 package") from exc
    except subprocess.CalledProcessError as exc:
        raise BootError(f"lz4 could not unpack the kernel: {exc.stderr.decode().strip()}") from exc
    return result.stdout


def _decompress_payload(payload: bytes) -> bytes:
    # Decompressor objects stop at the end of the stream, so the size word
    # that kbuild appends after xz/zstd/lz4 payloads is ignored.
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if payload.startswith(b"\x02\x21\x4c\x18"):
        return _lz4_decompress(payload)
    raise BootError(f"unknown kernel compression (magic {payload[:4].hex()})")


def has_pvh_entry(elf: bytes) -> bool:
    """Tell whether an ELF64 kernel carries the PVH entry note Cloud Hypervisor boots through."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(kernel: Kernel, cache_dir: Path) -> Path:
    """Return the uncompressed ELF vmlinux of ``kernel``, unpacked once into ``cache_dir``.

    Raises :class:`BootError` if the image is not a bzImage or the ELF lacks a PVH entry.
    """
    target = cache_dir / f"vmlinux-{kernel.version}"
    if target.exists():
        return target
    image = kernel.image.read_bytes()
    if image[0x202:0x206] != b"HdrS":
        raise BootError(f"{kernel.image} is not a bzImage")
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    elf = _decompress_payload(image[start : start + payload_length])
    if not has_pvh_entry(elf):
        raise BootError(f"{kernel.image} has no PVH entry point: Cloud Hypervisor cannot boot it")
    write_atomic(target, [elf])
    log.info("unpacked %s to %s", kernel.image, target)
    return target

"""Boot a disk in a microVM, run the image's command in it, and report what happened."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypeman_images.boot.cache import write_atomic
from hypeman_images.boot.initramfs import base_initramfs, boot_initramfs
from hypeman_images.boot.kernel import Kernel, erofs_modules, extract_vmlinux, find_kernel
from hypeman_images.boot.runspec import RunSpec, render_run_conf
from hypeman_images.boot.vm import (
    CLOUD_HYPERVISOR,
    QEMU,
    VmRun,
    base_cmdline,
    cloud_hypervisor_command,
    qemu_command,
    run_vm,
)
from hypeman_images.errors import BootError, InvalidArgument

log = logging.getLogger(__name__)

#: How long a KVM probe boot may take; a working KVM reaches userspace in well under 1 s.
KVM_PROBE_TIMEOUT = 6.0
_TAIL = 600


@dataclass(frozen=True)
class BootResult:
    """The outcome of running an image's command in a VM.

    ``output`` is what the command wrote to stdout and stderr (the serial
    console), without kernel logs or markers. ``error`` is set when the init
    could not start the command (command not found, unknown user), with
    ``exit_code`` 127 or 126. Times are seconds since the hypervisor started;
    ``time_to_poweroff`` is None if the VM had to be killed after the command.
    """

    output: str
    exit_code: int
    error: str | None
    hypervisor: str
    accelerator: str
    time_to_first_output: float | None
    time_to_exit: float
    time_to_poweroff: float | None
    console: str


@dataclass(frozen=True)
class _Machine:
    hypervisor: str
    accelerator: str
    binary: str


def _tail(data: bytes) -> str:
    text = data.decode(errors="replace").replace("\r", "").strip()
    return text if len(text) <= _TAIL else "…" + text[-_TAIL:]


def _vm_argv(
    machine: _Machine,
    kernel: Kernel,
    initramfs: Path,
    disk: Path | None,
    cache_dir: Path,
    memory_mib: int,
) -> list[str]:
    cmdline = base_cmdline(tcg=machine.accelerator == "tcg")
    if machine.hypervisor == CLOUD_HYPERVISOR:
        vmlinux = extract_vmlinux(kernel, cache_dir)
        return cloud_hypervisor_command(
            disk, vmlinux, initramfs, cmdline=cmdline, memory_mib=memory_mib, binary=machine.binary
        )
    return qemu_command(
        disk,
        kernel.image,
        initramfs,
        cmdline=cmdline,
        accel=machine.accelerator,
        memory_mib=memory_mib,
        binary=machine.binary,
    )


def _probe_key(binary: str, kernel: Kernel) -> str:
    # The boot id changes with every host boot, so a cached verdict never
    # outlives the host (or nested hypervisor) it was measured on.
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return hashlib.sha256(f"{boot_id}\0{binary}\0{kernel.version}".encode()).hexdigest()[:16]


def kvm_works(
    hypervisor: str, binary: str, kernel: Kernel, base: Path, cache_dir: Path, work_dir: Path
) -> bool:
    """Tell whether ``hypervisor`` with KVM boots ``kernel`` to userspace; cached in ``cache_dir``.

    ``/dev/kvm`` existing is not enough: a nested hypervisor may expose it and
    still fail on instructions the stock kernel uses (cmpxchg16b, xrstor), in
    which case the guest hangs. So a short boot of the init in probe mode
    decides, once per host boot.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    verdict_file = cache_dir / f"kvm-probe-{_probe_key(binary, kernel)}"
    if verdict_file.exists():
        return verdict_file.read_text().strip() == "kvm"
    nonce = secrets.token_hex(8)
    initramfs = work_dir / f"probe-{nonce}.cpio"
    boot_initramfs(base, render_run_conf(RunSpec(), (), nonce, probe=True), initramfs)
    try:
        machine = _Machine(hypervisor, "kvm", binary)
        argv = _vm_argv(machine, kernel, initramfs, None, cache_dir, 128)
        run = run_vm(argv, nonce=nonce, timeout=KVM_PROBE_TIMEOUT)
    finally:
        initramfs.unlink(missing_ok=True)
    works = run.exit_seen is not None
    log.info("KVM probe with %s: %s", binary, "works" if works else "fails, using TCG")
    write_atomic(verdict_file, [b"kvm\n" if works else b"tcg\n"])
    return works


def _choose_machine(
    hypervisor: str | None,
    accel: str | None,
    kernel: Kernel,
    base: Path,
    cache_dir: Path,
    work_dir: Path,
) -> _Machine:
    if hypervisor not in (None, "qemu", CLOUD_HYPERVISOR):
        raise InvalidArgument(f"unknown hypervisor {hypervisor!r}: use qemu or cloud-hypervisor")
    if accel not in (None, "kvm", "tcg"):
        raise InvalidArgument(f"unknown accelerator {accel!r}: use kvm or tcg")
    ch = shutil.which(CLOUD_HYPERVISOR)
    if hypervisor == CLOUD_HYPERVISOR or (hypervisor is None and ch and accel != "tcg"):
        if ch is None:
            raise BootError("cloud-hypervisor is not installed (not on PATH)")
        if accel == "tcg":
            raise InvalidArgument("Cloud Hypervisor runs on KVM only; use qemu for tcg")
        if accel == "kvm" or kvm_works(CLOUD_HYPERVISOR, ch, kernel, base, cache_dir, work_dir):
            return _Machine(CLOUD_HYPERVISOR, "kvm", ch)
        if hypervisor == CLOUD_HYPERVISOR:
            raise BootError("KVM does not work on this host, and Cloud Hypervisor needs it")
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise BootError(f"{QEMU} is not installed: install the qemu-system-x86 package")
    if accel is None:
        accel = "kvm" if kvm_works("qemu", qemu, kernel, base, cache_dir, work_dir) else "tcg"
    return _Machine("qemu", accel, qemu)


def _failure(
    run: VmRun, machine: _Machine, timeout: float, nonce: str, streamed: bool
) -> BootError:
    """What went wrong, in words: no marker, nonce or kernel noise of the init's protocol.

    The output so far is added unless it was streamed already (``streamed``).
    """
    where = f"{machine.hypervisor}/{machine.accelerator}"
    if run.kvm_failed:
        return BootError(f"KVM cannot run this kernel ({where}): {_tail(run.stderr)}")
    if run.timed_out and run.begin_seen is not None:
        message = f"the command did not finish within {timeout:g} s; the VM was stopped ({where})"
        begin = f"HYPEMAN_BEGIN_{nonce}\n".encode()
        output = _without_markers(run.console.split(begin, 1)[-1], nonce)
        if not streamed and output.strip():
            message += f"; its output so far:\n{_tail(output)}"
        return BootError(message)
    if run.timed_out and not run.console.strip():
        return BootError(
            f"the VM printed nothing within {timeout:g} s: the kernel did not boot ({where})"
        )
    if run.timed_out:
        return BootError(
            f"the VM did not start the command within {timeout:g} s ({where}); "
            f"console:\n{_tail(_without_markers(run.console, nonce))}"
        )
    details = "".join(
        f"\n{label}:\n{_tail(data)}"
        for label, data in (
            ("console", _without_markers(run.console, nonce)),
            (f"{machine.binary} said", run.stderr),
        )
        if data.strip()
    )
    return BootError(
        f"the VM stopped before the command finished ({where}, status {run.returncode}){details}"
    )


def _without_markers(console: bytes, nonce: str) -> bytes:
    """``console`` without the init's marker lines (``HYPEMAN_<WHAT>_<nonce>…``)."""
    return re.sub(rb"HYPEMAN_[A-Z]+_" + nonce.encode() + rb"[^\n]*\n?", b"", console)


def _result(run: VmRun, machine: _Machine, nonce: str) -> BootResult:
    console = run.console.replace(b"\r\n", b"\n")
    exit_match = re.search(rb"HYPEMAN_EXIT_" + nonce.encode() + rb"=(\d+)\n", console)
    error_match = re.search(rb"\nHYPEMAN_ERROR_" + nonce.encode() + rb"=([^\n]*)\n", console)
    begin = f"HYPEMAN_BEGIN_{nonce}\n".encode()
    output = b""
    if begin in console and exit_match is not None:
        output = console[console.index(begin) + len(begin) : exit_match.start()]
    assert run.exit_seen is not None
    return BootResult(
        output=output.decode(errors="replace"),
        exit_code=int(exit_match.group(1)) if exit_match else 1,
        error=error_match.group(1).decode(errors="replace") if error_match else None,
        hypervisor=machine.hypervisor,
        accelerator=machine.accelerator,
        time_to_first_output=run.first_output,
        time_to_exit=run.exit_seen,
        time_to_poweroff=None if run.killed else run.ended,
        console=console.decode(errors="replace"),
    )


def _check_fstype(kernel: Kernel, fstype: str) -> None:
    """Refuse an EROFS disk here, not as a failed mount in the guest, if the kernel lacks erofs."""
    if fstype == "erofs":
        erofs_modules(kernel)


def boot_command(
    disk: Path,
    spec: RunSpec | Mapping[str, Any],
    *,
    command: Sequence[str] | None = None,
    hypervisor: str = CLOUD_HYPERVISOR,
    accel: str = "kvm",
    work_dir: Path,
    cache_dir: Path | None = None,
    kernel: Kernel | None = None,
    memory_mib: int = 256,
    fstype: str = "ext4",
) -> list[str]:
    """Return the hypervisor command that would boot ``disk``, for ``--print-command``.

    Nothing is probed or run. The kernel (a vmlinux for Cloud Hypervisor) and
    a per-boot initramfs carrying the run spec are written under ``cache_dir``
    and ``work_dir`` and kept, so the command can be run by hand. The console
    prints ``HYPEMAN_EXIT_<nonce>=<code>`` when the command ends. ``fstype``
    is the disk's filesystem, as for :func:`boot`.
    """
    if hypervisor not in ("qemu", CLOUD_HYPERVISOR):
        raise InvalidArgument(f"unknown hypervisor {hypervisor!r}: use qemu or cloud-hypervisor")
    run_spec = spec if isinstance(spec, RunSpec) else RunSpec.from_metadata(spec)
    cache_dir = cache_dir or work_dir
    kernel = kernel or find_kernel()
    base = base_initramfs(kernel, cache_dir)
    nonce = secrets.token_hex(8)
    initramfs = work_dir / f"initramfs-{nonce}.cpio"
    _check_fstype(kernel, fstype)
    run_conf = render_run_conf(run_spec, run_spec.argv(command), nonce, fstype=fstype)
    boot_initramfs(base, run_conf, initramfs)
    binary = CLOUD_HYPERVISOR if hypervisor == CLOUD_HYPERVISOR else QEMU
    machine = _Machine(hypervisor, accel, binary)
    return _vm_argv(machine, kernel, initramfs, disk.resolve(), cache_dir, memory_mib)


def boot(
    disk: Path,
    spec: RunSpec | Mapping[str, Any],
    *,
    command: Sequence[str] | None = None,
    timeout: float = 60.0,
    hypervisor: str | None = None,
    accel: str | None = None,
    work_dir: Path,
    cache_dir: Path | None = None,
    kernel: Kernel | None = None,
    memory_mib: int = 256,
    fstype: str = "ext4",
    output: Callable[[bytes], None] | None = None,
    stdin: int | None = None,
) -> BootResult:
    """Boot ``disk`` (an ext4 image, or an EROFS one with ``fstype="erofs"``) and run
    the image's command in it.

    ``spec`` is a :class:`RunSpec` or the image's ``metadata.json`` mapping;
    ``command`` replaces its cmd as ``docker run IMAGE ARGS...`` does. The
    hypervisor is Cloud Hypervisor when on PATH and KVM works, else QEMU
    microvm on KVM or TCG (``hypervisor``/``accel`` force a choice). The
    initramfs and KVM verdict are cached in ``cache_dir`` (default
    ``work_dir``); per-boot files go to ``work_dir`` and are removed.

    ``output`` is given the command's output as the VM prints it (the result
    has it all too); with ``stdin`` (a file descriptor) the command reads what
    it gives, to its end, instead of /dev/null, as with ``docker run -i``.

    Returns a :class:`BootResult` whenever the init reports an exit code,
    including a non-zero one. Raises :class:`BootError` when the VM does not
    boot, stops early, or the command outlives ``timeout`` seconds (the VM's
    process group is killed: never a hang).
    """
    if not disk.is_file():
        raise BootError(f"disk {disk} does not exist")
    run_spec = spec if isinstance(spec, RunSpec) else RunSpec.from_metadata(spec)
    cache_dir = cache_dir or work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    kernel = kernel or find_kernel()
    base = base_initramfs(kernel, cache_dir)
    machine = _choose_machine(hypervisor, accel, kernel, base, cache_dir, work_dir)
    nonce = secrets.token_hex(8)
    initramfs = work_dir / f"initramfs-{nonce}.cpio"
    _check_fstype(kernel, fstype)
    run_conf = render_run_conf(
        run_spec, run_spec.argv(command), nonce, fstype=fstype, stdin=stdin is not None
    )
    boot_initramfs(base, run_conf, initramfs)
    try:
        argv = _vm_argv(machine, kernel, initramfs, disk.resolve(), cache_dir, memory_mib)
        log.debug("starting VM: %s", argv)
        run = run_vm(argv, nonce=nonce, timeout=timeout, output=output, stdin=stdin)
    finally:
        initramfs.unlink(missing_ok=True)
    if run.exit_seen is None:
        raise _failure(run, machine, timeout, nonce, streamed=output is not None)
    return _result(run, machine, nonce)

"""Hypervisor command lines, and running a VM under a deadline while reading its serial console.

QEMU uses ``-M microvm`` (virtio-mmio, no PCI, no firmware) and is the only
one that can fall back to TCG; Cloud Hypervisor needs KVM and boots the ELF
vmlinux through PVH. Either way the guest's serial console is the VMM's
stdout, and the VM runs in its own process group so a timeout kills it whole.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hypeman_images.errors import BootError

QEMU = "qemu-system-x86_64"
CLOUD_HYPERVISOR = "cloud-hypervisor"

#: After the exit marker the VM should power off at once; past this we kill it.
POWEROFF_GRACE = 5.0

# Messages that mean KVM cannot run this guest: QEMU then stops the vCPU and
# waits forever, so they must end the run at once rather than at the timeout.
_KVM_FAILURES = (b"KVM internal error", b"emulation failure", b"failed to initialize kvm")


def base_cmdline(*, tcg: bool) -> str:
    """Kernel cmdline shared by all hypervisors.

    ``loglevel=1`` keeps only KERN_EMERG (panics) on the console, so the
    command's output is not interleaved with kernel logs. Under TCG on a
    busy host the TSC calibration against the PIT can hang (microvm has no
    HPET or PM timer); ``tsc_early_khz`` skips it.
    """
    words = ["console=ttyS0", "loglevel=1", "edd=off"]
    if tcg:
        khz = host_tsc_khz()
        if khz:
            words.append(f"tsc_early_khz={khz}")
    return " ".join(words)


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """Return the host CPU clock in kHz from ``/proc/cpuinfo``, or None if absent."""
    try:
        match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(float(match.group(1)) * 1000) if match else None


def qemu_command(
    disk: Path | None,
    kernel: Path,
    initramfs: Path,
    *,
    cmdline: str,
    accel: str,
    memory_mib: int = 256,
    cpus: int = 1,
    binary: str = QEMU,
) -> list[str]:
    """Return the QEMU microvm command line that boots ``kernel`` with ``disk`` as /dev/vda.

    ``reboot=t`` with ``-no-reboot`` makes any reboot or panic end QEMU, a
    fallback for when ACPI power-off does not.
    """
    argv = [
        *(binary, "-M", "microvm", "-accel", accel),
        *("-cpu", "host" if accel == "kvm" else "max"),
        *("-m", str(memory_mib), "-smp", str(cpus)),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", "stdio"),
        *("-kernel", str(kernel), "-initrd", str(initramfs)),
        *("-append", f"{cmdline} reboot=t panic=-1"),
    ]
    if disk is not None:
        argv += [
            *("-drive", f"id=root,file={disk},format=raw,if=none,readonly=on"),
            *("-device", "virtio-blk-device,drive=root"),
        ]
    return argv


def cloud_hypervisor_command(
    disk: Path | None,
    kernel: Path,
    initramfs: Path,
    *,
    cmdline: str | None = None,
    memory_mib: int = 256,
    cpus: int = 1,
    binary: str = CLOUD_HYPERVISOR,
) -> list[str]:
    """Return the Cloud Hypervisor command line that boots ``kernel`` with ``disk`` as /dev/vda.

    ``kernel`` must be an ELF vmlinux with a PVH entry
    (:func:`hypeman_images.boot.kernel.extract_vmlinux`). Cloud Hypervisor
    resets the VM on a guest reboot, so the init powers off through ACPI.
    """
    argv = [
        *(binary, "--kernel", str(kernel), "--initramfs", str(initramfs)),
        *("--cmdline", cmdline if cmdline is not None else base_cmdline(tcg=False)),
        *("--serial", "tty", "--console", "off"),
        *("--cpus", f"boot={cpus}", "--memory", f"size={memory_mib}M"),
    ]
    if disk is not None:
        argv += ["--disk", f"path={disk},readonly=on"]
    return argv


@dataclass(frozen=True)
class VmRun:
    """What a VM run printed and when. Times are seconds since the VMM started."""

    console: bytes
    stderr: bytes
    returncode: int | None
    killed: bool
    exit_seen: float | None
    ended: float
    timed_out: bool
    begin_seen: float | None
    first_output: float | None
    kvm_failed: bool


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _start(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """The VMM in its own session (and process group), its stdout and stderr piped."""
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise BootError(f"cannot start {argv[0]}: {exc}") from exc


@dataclass
class _Markers:
    """When the init's markers showed on the console (seconds since the VMM started)."""

    begin: bytes
    exit_marker: bytes
    begin_seen: float | None = None
    first_output: float | None = None
    exit_seen: float | None = None

    def watch(self, console: bytearray, now: float) -> None:
        """Note the markers (and the command's first output) ``console`` shows by ``now``."""
        if self.begin_seen is None and self.begin in console:
            self.begin_seen = now
        if self.begin_seen is not None and self.first_output is None:
            after = console[console.index(self.begin) + len(self.begin) :]
            # The init prints "\n" before the exit marker; anything else is output.
            head = bytes(after[: len(self.exit_marker) + 1])
            if head and not (b"\n" + self.exit_marker).startswith(head):
                self.first_output = now
        if self.exit_seen is None and self.exit_marker in console:
            self.exit_seen = now


def run_vm(argv: Sequence[str], *, nonce: str, timeout: float) -> VmRun:
    """Run the VMM ``argv`` until it exits, or kill its process group at ``timeout``.

    The console is watched for the init's markers (``HYPEMAN_BEGIN_<nonce>``,
    ``HYPEMAN_EXIT_<nonce>=``): once the exit marker is seen the VM gets
    :data:`POWEROFF_GRACE` seconds to power off before it is killed.
    """
    markers = _Markers(f"HYPEMAN_BEGIN_{nonce}\n".encode(), f"HYPEMAN_EXIT_{nonce}=".encode())
    start = time.monotonic()
    proc = _start(argv)
    assert proc.stdout is not None and proc.stderr is not None
    console = bytearray()
    stderr = bytearray()
    kvm_failed = False
    timed_out = False
    killed = False
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, console)
    selector.register(proc.stderr, selectors.EVENT_READ, stderr)
    try:
        while selector.get_map():
            now = time.monotonic() - start
            exit_seen = markers.exit_seen
            deadline = timeout if exit_seen is None else min(timeout, exit_seen + POWEROFF_GRACE)
            if now >= deadline or kvm_failed:
                timed_out = exit_seen is None and not kvm_failed
                _kill_group(proc)
                killed = True
                break
            for key, _ in selector.select(deadline - now):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer: bytearray = key.data
                buffer += chunk
                if buffer is stderr:
                    kvm_failed = any(m in stderr for m in _KVM_FAILURES)
                    continue
                markers.watch(console, time.monotonic() - start)
        if not killed:
            try:
                proc.wait(timeout=POWEROFF_GRACE)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                killed = True
    finally:
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
        if proc.poll() is None:
            _kill_group(proc)
            killed = True
    return VmRun(
        console=bytes(console),
        stderr=bytes(stderr),
        returncode=proc.returncode,
        killed=killed,
        exit_seen=markers.exit_seen,
        ended=time.monotonic() - start,
        timed_out=timed_out,
        begin_seen=markers.begin_seen,
        first_output=markers.first_output,
        kvm_failed=kvm_failed,
    )

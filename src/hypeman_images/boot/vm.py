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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


def _start(argv: Sequence[str], *, stdin: bool) -> subprocess.Popen[bytes]:
    """The VMM in its own session (and process group), its stdout and stderr piped.

    Its stdin is a pipe when the guest's command gets ours (:class:`_Relay`), else /dev/null.
    """
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
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
            # Anything before the exit marker is output.
            head = bytes(after[: len(self.exit_marker)])
            if head and not self.exit_marker.startswith(head):
                self.first_output = now
        if self.exit_seen is None and self.exit_marker in console:
            self.exit_seen = now


class _OutputStream:
    """Hands the command's output on as the console shows it: after the begin marker,
    up to the exit marker, holding back what may be the start of that marker.

    ``on_begin`` is called once, when the begin marker shows: the command runs.
    """

    def __init__(
        self,
        begin: bytes,
        end: bytes,
        emit: Callable[[bytes], None] | None,
        *,
        on_begin: Callable[[], None],
    ) -> None:
        self._begin = begin
        self._end = end
        self._emit = emit
        self._on_begin = on_begin
        self._sent: int | None = None  # console offset handed on so far
        self._done = False

    def feed(self, console: bytearray) -> None:
        """Hand on what ``console`` (the whole console so far) adds to the output."""
        if self._done:
            return
        if self._sent is None:
            found = console.find(self._begin)
            if found < 0:
                return
            self._sent = found + len(self._begin)
            self._on_begin()
        if self._emit is None:
            self._done = True
            return
        end = console.find(self._end, max(self._sent - len(self._end), 0))
        if end >= self._sent:
            limit, self._done = end, True
        else:
            limit = len(console) - _partial_suffix(console, self._end)
        if limit > self._sent:
            self._emit(bytes(console[self._sent : limit]))
            self._sent = limit


def _partial_suffix(data: bytearray, marker: bytes) -> int:
    """The length of the longest end of ``data`` that begins ``marker`` (0 if none)."""
    for length in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:length]):
            return length
    return 0


class _Relay:
    """The host's stdin to the command's, over the serial console, as printable lines.

    A serial line has no end of file and the guest's tty would read control
    characters as signals or line editing, so each chunk goes as one line,
    ``D`` and the bytes with all but plain printable ASCII as ``\\ooo`` octal
    escapes (what the init's ``printf`` turns back into the bytes), and the
    end of the input as ``E``. It starts once the command runs (the init has
    its reader ready and the echo off by then) and stops with the VM.
    """

    def __init__(self, source: int | None, sink: IO[bytes] | None) -> None:
        """Nothing is relayed without both a ``source`` and a ``sink``."""
        self._source = source
        self._sink = sink
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start copying (once)."""
        if self._thread is None and self._source is not None:
            self._thread = threading.Thread(target=self._copy, name="stdin-relay", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Close the VMM's stdin; a read blocked on a terminal ends with the process."""
        if self._sink is not None:
            with contextlib.suppress(OSError):
                self._sink.close()

    def _copy(self) -> None:
        assert self._source is not None and self._sink is not None
        try:
            while chunk := os.read(self._source, RELAY_CHUNK):
                self._sink.write(relay_line(chunk))
                self._sink.flush()
            self._sink.write(b"E\n")
            self._sink.flush()
        except (OSError, ValueError):  # the VM is gone (broken pipe, closed file)
            return


def relay_line(chunk: bytes) -> bytes:
    """One line of :class:`_Relay`'s framing: ``D``, the bytes escaped, a newline."""
    return b"D" + b"".join(_ESCAPED[byte] for byte in chunk) + b"\n"


# Plain printable ASCII passes; the tty's control characters, the printf
# format's "%" and "\\", and every byte above 0x7e become octal escapes.
_ESCAPED = [
    bytes([b]) if 0x20 <= b < 0x7F and b not in b"%\\" else b"\\%03o" % b for b in range(256)
]
#: Bytes of stdin a relay line carries: escaped, a line stays well under the
#: 4095 characters a tty line in canonical mode may hold.
RELAY_CHUNK = 512


def run_vm(
    argv: Sequence[str],
    *,
    nonce: str,
    timeout: float,
    output: Callable[[bytes], None] | None = None,
    stdin: int | None = None,
) -> VmRun:
    """Run the VMM ``argv`` until it exits, or kill its process group at ``timeout``.

    The console is watched for the init's markers (``HYPEMAN_BEGIN_<nonce>``,
    ``HYPEMAN_EXIT_<nonce>=``): once the exit marker is seen the VM gets
    :data:`POWEROFF_GRACE` seconds to power off before it is killed.
    ``output`` is given the command's output as it arrives (markers left out);
    from the begin marker on, what can be read from the file descriptor
    ``stdin`` goes to the command's stdin (:class:`_Relay`).
    """
    markers = _Markers(f"HYPEMAN_BEGIN_{nonce}\n".encode(), f"HYPEMAN_EXIT_{nonce}=".encode())
    start = time.monotonic()
    proc = _start(argv, stdin=stdin is not None)
    relay = _Relay(stdin, proc.stdin)
    stream = _OutputStream(markers.begin, markers.exit_marker, output, on_begin=relay.start)
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
                stream.feed(console)
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
        relay.stop()
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

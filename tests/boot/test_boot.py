"""Tests for hypeman_images.boot: the initramfs, the command lines, and real VM boots.

Boots use real disks made with mke2fs from the Alpine minirootfs and the
official busybox glibc image, and run on KVM where it works, TCG otherwise.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.images import IMAGES_DIR
from support.vm import needs_vm

from hypeman_images.boot import (
    BootResult,
    RunSpec,
    boot,
    boot_command,
    cloud_hypervisor_command,
    extract_vmlinux,
    find_kernel,
    kvm_works,
    qemu_command,
    runner,
)
from hypeman_images.boot.initramfs import CpioEntry, base_initramfs, cpio_newc
from hypeman_images.boot.kernel import Kernel, has_pvh_entry, resolve_modules
from hypeman_images.boot.runspec import render_run_conf
from hypeman_images.boot.vm import host_tsc_khz, run_vm
from hypeman_images.errors import BootError, InvalidArgument

IMAGES = IMAGES_DIR
ALPINE = IMAGES / "alpine-minirootfs-3.20.3-x86_64.tar.gz"
BUSYBOX_OCI = IMAGES / "busybox-1.38.0-glibc-oci"
ALPINE_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- run spec ----------------------------------------------------------------------------------


def test_runspec_from_metadata_reads_the_process_keys() -> None:
    spec = RunSpec.from_metadata(
        {
            "entrypoint": ["/docker-entrypoint.sh"],
            "cmd": ["nginx", "-g", "daemon off;"],
            "env": ["PATH=/bin", "A=b=c"],
            "working_dir": "/srv",
            "user": "101:101",
            "digest": "sha256:…",
        }
    )
    assert spec == RunSpec(
        ("/docker-entrypoint.sh",),
        ("nginx", "-g", "daemon off;"),
        ("PATH=/bin", "A=b=c"),
        "/srv",
        "101:101",
    )


def test_runspec_from_metadata_defaults_nulls() -> None:
    spec = RunSpec.from_metadata({"entrypoint": None, "cmd": None, "env": None})
    assert spec == RunSpec()


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "command", "argv"),
    [
        (None, ("sh",), None, ("sh",)),
        (None, ("sh",), ("cat", "/x"), ("cat", "/x")),
        (("/e",), ("a",), None, ("/e", "a")),
        (("/e",), ("a",), ("b", "c"), ("/e", "b", "c")),
        (("/e",), ("a",), (), ("/e",)),
        (None, None, None, ()),
    ],
    ids=[
        "cmd",
        "command-replaces-cmd",
        "entrypoint+cmd",
        "command-keeps-entrypoint",
        "empty-args",
        "nothing",
    ],
)
def test_argv_follows_docker_run(
    entrypoint: tuple[str, ...] | None,
    cmd: tuple[str, ...] | None,
    command: tuple[str, ...] | None,
    argv: tuple[str, ...],
) -> None:
    assert RunSpec(entrypoint=entrypoint, cmd=cmd).argv(command) == argv


@pytest.mark.parametrize(
    "metadata",
    [{"env": ["NOEQUALS"]}, {"env": "PATH=/bin"}, {"cmd": "sh"}, {"working_dir": "relative"}],
    ids=["env-without-equals", "env-not-list", "cmd-not-list", "relative-workdir"],
)
def test_runspec_rejects_malformed_metadata(metadata: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        RunSpec.from_metadata(metadata)


def test_run_conf_survives_the_shell(tmp_path: Path) -> None:
    tricky = ["it's", 'say "hi"', "$HOME `id` \\n", "two\nlines", "", " spaced "]
    spec = RunSpec(env=(f"V={tricky[0]}", "W=a b"), working_dir="/a dir", user="nobody")
    conf = tmp_path / "run.conf"
    conf.write_bytes(render_run_conf(spec, tricky, "n0nce"))
    script = (
        '. "$1"; printf "%s\\0" "$HM_NONCE" "$HM_WORKDIR" "$HM_USER" "$HM_ENV_1" "$HM_ENV_2";'
        " i=1; while [ $i -le $HM_ARGC ]; do"
        ' eval "printf \'%s\\0\' \\"\\$HM_ARG_$i\\""; i=$((i+1)); done'
    )
    out = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(conf)], capture_output=True, check=True
    ).stdout
    assert out.split(b"\0")[:-1] == [
        b"n0nce",
        b"/a dir",
        b"nobody",
        b"V=it's",
        b"W=a b",
        *(t.encode() for t in tricky),
    ]


# --- kernel and initramfs ----------------------------------------------------------------------


def test_cpio_newc_is_read_by_cpio(tmp_path: Path) -> None:
    archive = b"".join(
        cpio_newc(
            [
                CpioEntry("dir", 0o040755),
                CpioEntry("dir/file", 0o100644, b"hello"),
                CpioEntry("link", 0o120777, b"dir/file"),
                CpioEntry("console", 0o020600, rdev=(5, 1)),
            ]
        )
    )
    assert len(archive) % 4 == 0
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names == ["dir", "dir/file", "dir/file", "console"]  # "link -> dir/file"
    assert listing.splitlines()[3].startswith("crw-------")
    assert "5,   1" in listing.splitlines()[3] or "5, 1" in listing.splitlines()[3]


@needs_vm
def test_modules_come_with_their_dependencies_first() -> None:
    kernel = find_kernel()
    names = [m.name for m in resolve_modules(kernel)]
    assert "virtio_blk" in names
    for module, dep in [
        ("virtio_blk", "virtio"),
        ("virtio", "virtio_ring"),
        ("virtio_mmio", "virtio"),
    ]:
        if dep in names:
            assert names.index(dep) < names.index(module)


@needs_vm
def test_base_initramfs_is_cached_and_complete(tmp_path: Path) -> None:
    kernel = find_kernel()
    first = base_initramfs(kernel, tmp_path)
    stamp = first.stat().st_mtime_ns
    t0 = time.monotonic()
    assert base_initramfs(kernel, tmp_path) == first
    assert time.monotonic() - t0 < 0.5
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=first.open("rb"), capture_output=True, check=True
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "dev/console", "etc/hypeman/modules"} <= names
    assert "lib/modules/virtio_blk.ko" in names


@needs_vm
def test_vmlinux_for_cloud_hypervisor_has_a_pvh_entry(tmp_path: Path) -> None:
    vmlinux = extract_vmlinux(find_kernel(), tmp_path)
    assert has_pvh_entry(vmlinux.read_bytes())
    assert extract_vmlinux(find_kernel(), tmp_path) == vmlinux


def test_cloud_hypervisor_command_line() -> None:
    argv = cloud_hypervisor_command(
        Path("/d/rootfs.ext4"), Path("/k/vmlinux"), Path("/k/initramfs"), cmdline="console=ttyS0"
    )
    assert argv == [
        "cloud-hypervisor",
        *("--kernel", "/k/vmlinux", "--initramfs", "/k/initramfs"),
        *("--cmdline", "console=ttyS0"),
        *("--serial", "tty", "--console", "off"),
        *("--cpus", "boot=1", "--memory", "size=256M"),
        *("--disk", "path=/d/rootfs.ext4,readonly=on"),
    ]


@needs_vm
def test_boot_command_for_cloud_hypervisor_keeps_its_files(tmp_path: Path) -> None:
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"")
    argv = boot_command(disk, {"cmd": ["sh"]}, work_dir=tmp_path / "w", cache_dir=tmp_path / "c")
    assert argv[0] == "cloud-hypervisor"
    kernel = Path(argv[argv.index("--kernel") + 1])
    initramfs = Path(argv[argv.index("--initramfs") + 1])
    assert kernel.name.startswith("vmlinux-") and kernel.is_file()
    assert initramfs.parent == tmp_path / "w" and initramfs.is_file()
    assert f"path={disk},readonly=on" in argv


def test_qemu_command_line_uses_microvm_and_a_readonly_disk() -> None:
    argv = qemu_command(Path("/d/r.ext4"), Path("/k/bz"), Path("/k/i"), cmdline="c", accel="tcg")
    assert argv[:5] == ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg"]
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert "id=root,file=/d/r.ext4,format=raw,if=none,readonly=on" in argv
    assert "virtio-blk-device,drive=root" in argv


def test_host_tsc_khz(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2600.123\n")
    assert host_tsc_khz(cpuinfo) == 2600123
    assert host_tsc_khz(tmp_path / "missing") is None


# --- the VM runner, with a fake VMM --------------------------------------------------------------


def _fake_vmm(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_run_vm_kills_a_hung_vmm_at_the_timeout() -> None:
    t0 = time.monotonic()
    # The child shell shares the process group and must die too.
    run = run_vm(["sh", "-c", "sleep 100 & sleep 100"], nonce="x", timeout=0.5)
    assert run.timed_out and run.killed
    assert time.monotonic() - t0 < 3


def test_run_vm_reads_markers_and_times() -> None:
    script = (
        "import sys, time\n"
        "w = sys.stdout.buffer.write\n"
        "w(b'kernel noise\\nHYPEMAN_BEGIN_n\\n'); sys.stdout.flush(); time.sleep(0.2)\n"
        "w(b'out\\n'); sys.stdout.flush(); time.sleep(0.2)\n"
        "w(b'\\nHYPEMAN_EXIT_n=3\\n')\n"
    )
    run = run_vm(_fake_vmm(script), nonce="n", timeout=10)
    assert not run.timed_out and not run.killed
    assert run.begin_seen is not None and run.first_output is not None
    assert run.exit_seen is not None
    assert run.begin_seen < run.first_output < run.exit_seen <= run.ended


def test_run_vm_streams_the_output_as_it_comes_and_never_a_marker() -> None:
    script = (
        "import sys, time\n"
        "def w(b): sys.stdout.buffer.write(b); sys.stdout.flush(); time.sleep(0.3)\n"
        "w(b'noise\\nHYPEMAN_BEGIN_n\\nfirst\\n')\n"
        "w(b'second')\n"
        "w(b'\\nHYPEMAN_EX')\n"  # a newline of the output, then the exit marker, split
        "w(b'IT_n=0\\n')\n"
    )
    chunks: list[tuple[float, bytes]] = []
    t0 = time.monotonic()
    run = run_vm(
        _fake_vmm(script),
        nonce="n",
        timeout=10,
        output=lambda data: chunks.append((time.monotonic() - t0, data)),
    )
    assert b"".join(data for _, data in chunks) == b"first\nsecond\n"
    assert chunks[0][1] == b"first\n"
    # The first line came as soon as it was printed, long before the VM ended.
    assert run.exit_seen is not None and chunks[0][0] < run.exit_seen - 0.5


def _init_relay() -> str:
    """The stdin relay of init.sh: the shell function the guest runs."""
    init = (Path(runner.__file__).parent / "init.sh").read_text()
    match = re.search(r"^relay\(\) \{\n.*?^\}\n", init, re.S | re.M)
    assert match is not None
    return match[0]


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox")
def test_stdin_reaches_the_command_byte_for_byte_through_the_relay() -> None:
    """Every byte value, a long line and a partial last line, through init.sh's own relay."""
    data = bytes(range(256)) * 9 + b"x" * 3000 + b"\nno newline at the end"
    script = (
        f"{_init_relay()}"
        "echo HYPEMAN_BEGIN_n\n"
        "relay | od -An -tx1 -v | tr -d ' \\n'\n"  # hex: the console is not 8-bit clean
        "printf 'HYPEMAN_EXIT_n=0\\n'\n"
    )
    read, write = os.pipe()
    with os.fdopen(write, "wb") as feed:
        feed.write(data)  # fits the pipe buffer; then EOF
    try:
        run = run_vm(["/bin/busybox", "sh", "-c", script], nonce="n", timeout=20, stdin=read)
    finally:
        os.close(read)
    assert run.exit_seen is not None, run.console[-500:]
    output = run.console.split(b"HYPEMAN_BEGIN_n\n", 1)[1].split(b"HYPEMAN_EXIT_n")[0]
    assert bytes.fromhex(output.decode()) == data


def test_the_timeout_message_says_what_happened_without_markers() -> None:
    script = "echo noise; echo HYPEMAN_BEGIN_0123abcd; echo started; exec sleep 60"
    run = run_vm(["sh", "-c", script], nonce="0123abcd", timeout=1)
    machine = runner._Machine("qemu", "tcg", "qemu-system-x86_64")
    error = runner._failure(run, machine, 1, "0123abcd", streamed=False)
    assert str(error).startswith("the command did not finish within 1 s; the VM was stopped")
    assert "started" in str(error)
    streamed = runner._failure(run, machine, 1, "0123abcd", streamed=True)
    assert str(streamed) == "the command did not finish within 1 s; the VM was stopped (qemu/tcg)"
    for message in (str(error), str(streamed)):
        assert "HYPEMAN" not in message and "0123abcd" not in message


# --- real boots ----------------------------------------------------------------------------------


def _make_disk(tar: bytes, path: Path) -> Path:
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-b", "4096", "-d", "-", str(path)],
        input=tar,
        check=True,
    )
    return path


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


@pytest.fixture(scope="session")
def boot_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tmp_path_factory.mktemp("boot-cache"), tmp_path_factory.mktemp("boot-work")


@pytest.fixture(scope="session")
def alpine_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tar = gzip.decompress(ALPINE.read_bytes())
    return _make_disk(tar, tmp_path_factory.mktemp("alpine") / "rootfs.ext4")


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    index = json.loads((BUSYBOX_OCI / "index.json").read_text())
    manifest = json.loads(_blob(BUSYBOX_OCI, index["manifests"][0]["digest"]))
    config = json.loads(_blob(BUSYBOX_OCI, manifest["config"]["digest"]))["config"]
    (layer,) = manifest["layers"]
    tar = gzip.decompress(_blob(BUSYBOX_OCI, layer["digest"]))
    disk = _make_disk(tar, tmp_path_factory.mktemp("busybox") / "rootfs.ext4")
    metadata = {"cmd": config.get("Cmd"), "env": config.get("Env"), "entrypoint": None}
    return disk, metadata


Runner = Callable[..., BootResult]


@pytest.fixture
def run_alpine(alpine_disk: Path, boot_dirs: tuple[Path, Path]) -> Runner:
    """Boot the Alpine disk with ``command`` and RunSpec fields overridden by keywords."""
    cache, work = boot_dirs

    def run(command: list[str] | None, timeout: float = 60, **fields: Any) -> BootResult:
        spec = replace(RunSpec(env=(ALPINE_PATH,), cmd=("/bin/sh",)), **fields)
        return boot(
            alpine_disk, spec, command=command, timeout=timeout, work_dir=work, cache_dir=cache
        )

    return run


@pytest.mark.slow
@needs_vm
def test_alpine_runs_its_command(run_alpine: Runner, boot_dirs: tuple[Path, Path]) -> None:
    result = run_alpine(["cat", "/etc/alpine-release"])
    assert result.output == "3.20.3\n"
    assert result.exit_code == 0 and result.error is None
    assert result.hypervisor in ("qemu", "cloud-hypervisor")
    assert result.accelerator in ("kvm", "tcg")
    assert result.time_to_first_output is not None
    assert result.time_to_first_output <= result.time_to_exit
    assert result.time_to_poweroff is not None  # it powered off by itself
    assert "HYPEMAN" not in result.output
    assert list(boot_dirs[1].iterdir()) == []  # per-boot files are removed


@pytest.mark.slow
@needs_vm
def test_exit_code_propagates(run_alpine: Runner) -> None:
    result = run_alpine(["sh", "-c", "echo -n partial; exit 7"])
    assert (result.exit_code, result.output, result.error) == (7, "partial", None)


@pytest.mark.slow
@needs_vm
@pytest.mark.parametrize(
    ("user", "expected"),
    [
        # What `docker run --user U alpine:3.20.3 id` prints: the gid, then, with no
        # group given, every group of the image's /etc/group that lists the user.
        (
            "",
            "uid=0(root) gid=0(root) groups=0(root),1(bin),2(daemon),3(sys),4(adm),6(disk),"
            "10(wheel),11(floppy),20(dialout),26(tape),27(video)",
        ),
        ("1000:1000", "uid=1000 gid=1000 groups=1000"),
        ("1000", "uid=1000 gid=0(root) groups=0(root)"),
        ("nobody", "uid=65534(nobody) gid=65534(nobody) groups=65534(nobody)"),
        ("daemon", "uid=2(daemon) gid=2(daemon) groups=1(bin),2(daemon),4(adm)"),
        ("2", "uid=2(daemon) gid=2(daemon) groups=1(bin),2(daemon),4(adm)"),
        ("guest:wheel", "uid=405(guest) gid=10(wheel) groups=10(wheel)"),
        ("daemon:0", "uid=2(daemon) gid=0(root) groups=0(root)"),
    ],
    ids=["root", "uid-gid", "uid-only", "name", "member", "uid-member", "name-group", "no-sgids"],
)
def test_user_is_applied(run_alpine: Runner, user: str, expected: str) -> None:
    result = run_alpine(["id"], user=user)
    assert result.exit_code == 0
    assert result.output.strip() == expected


@pytest.mark.slow
@needs_vm
def test_every_id_of_the_process_is_dropped(run_alpine: Runner) -> None:
    # Real, effective, saved and filesystem ids alike, and the capabilities with them.
    result = run_alpine(
        ["grep", "-E", "^(Uid|Gid|Groups|CapEff|CapPrm):", "/proc/self/status"], user="daemon"
    )
    assert result.exit_code == 0, result.output
    fields = dict(line.split(":", 1) for line in result.output.splitlines())
    assert fields["Uid"].split() == ["2"] * 4
    assert fields["Gid"].split() == ["2"] * 4
    assert fields["Groups"].split() == ["1", "2", "4"]
    assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 0


@pytest.mark.slow
@needs_vm
def test_unknown_user_is_a_clear_error(run_alpine: Runner) -> None:
    result = run_alpine(["id"], user="nosuchuser")
    assert result.exit_code == 126
    assert result.error is not None and "nosuchuser" in result.error


@pytest.mark.slow
@needs_vm
def test_env_and_working_dir_are_applied(run_alpine: Runner) -> None:
    env = (ALPINE_PATH, "GREETING=hello 'world' \"x\"", "EMPTY=")
    result = run_alpine(["sh", "-c", "pwd; env | sort"], env=env, working_dir="/srv/my app")
    lines = result.output.splitlines()
    assert lines[0] == "/srv/my app"
    assert "GREETING=hello 'world' \"x\"" in lines
    assert "EMPTY=" in lines
    assert "HOME=/root" in lines  # from /etc/passwd, as Docker sets it
    assert ALPINE_PATH in lines
    # The init's own variables do not leak into the image's process.
    assert not any(line.startswith("HM_") for line in lines)


@pytest.mark.slow
@needs_vm
def test_working_dir_symlinks_resolve_inside_the_image(run_alpine: Runner) -> None:
    # Alpine's /var/run -> /run is absolute: it must not resolve in the initramfs.
    result = run_alpine(["sh", "-c", "pwd -P; touch here && ls /run"], working_dir="/var/run")
    assert result.output.split() == ["/run", "here"]


@pytest.mark.slow
@needs_vm
def test_path_defaults_when_the_image_sets_none(run_alpine: Runner) -> None:
    result = run_alpine(["sh", "-c", "echo $PATH"], env=())
    assert result.output.strip() == ALPINE_PATH.removeprefix("PATH=")


@pytest.mark.slow
@needs_vm
def test_missing_entrypoint_is_a_clear_error(run_alpine: Runner) -> None:
    result = run_alpine(None, entrypoint=("/no/such/binary",))
    assert result.exit_code == 127
    assert result.error is not None and "/no/such/binary" in result.error
    assert result.output == ""


@pytest.mark.slow
@needs_vm
def test_hanging_command_ends_at_the_timeout(run_alpine: Runner) -> None:
    t0 = time.monotonic()
    with pytest.raises(BootError, match="did not finish within 12 s") as info:
        run_alpine(["sh", "-c", "echo started; sleep 600"], timeout=12)
    assert time.monotonic() - t0 < 20
    assert "started" in str(info.value)


@needs_vm
def test_a_kernel_that_does_not_boot_is_a_clear_error(
    alpine_disk: Path, boot_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    real = find_kernel()
    junk = tmp_path / "vmlinuz-junk"
    junk.write_bytes(b"\0" * 4096)
    kernel = replace(real, image=junk)
    with pytest.raises(BootError, match=r"stopped before the command finished|did not boot"):
        _boot_true_with(kernel, alpine_disk, boot_dirs, timeout=20)


def _boot_true_with(
    kernel: Kernel, disk: Path, boot_dirs: tuple[Path, Path], *, timeout: float
) -> None:
    """Boot ``disk`` with ``kernel`` under QEMU/TCG to run ``true``."""
    cache, work = boot_dirs
    boot(
        disk,
        RunSpec(cmd=("true",)),
        hypervisor="qemu",
        accel="tcg",
        timeout=timeout,
        work_dir=work,
        cache_dir=cache,
        kernel=kernel,
    )


def _halting_pvh_kernel(path: Path) -> Path:
    """A real kernel of four bytes: an ELF whose PVH entry (Xen ELF note 18, which QEMU
    and Cloud Hypervisor boot) is ``cli; hlt; jmp .-1``. It runs, prints nothing, and
    never powers off: a kernel that hangs before its console comes up."""
    load = 0x100000
    code = bytes([0xFA, 0xF4, 0xEB, 0xFD])
    name = b"Xen\0"
    note = struct.pack("<III", len(name), 4, 18) + name + struct.pack("<I", load)
    header_size, ph_size = 52, 32
    note_at = header_size + 2 * ph_size
    code_at = note_at + len(note)
    header = b"\x7fELF\x01\x01\x01" + bytes(9)  # ELF32, little-endian, SysV
    header += struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, load, header_size, 0, 0, header_size, ph_size, 2, 40, 0, 0
    )
    load_ph = struct.pack("<8I", 1, code_at, load, load, len(code), len(code), 5, 0x1000)
    note_ph = struct.pack("<8I", 4, note_at, 0, 0, len(note), len(note), 4, 4)
    path.write_bytes(header + load_ph + note_ph + note + code)
    return path


@pytest.mark.slow
@needs_vm
def test_a_kernel_that_hangs_silently_ends_at_the_timeout(
    alpine_disk: Path, boot_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    # A real QEMU running that kernel: the VM is alive, its console stays empty.
    kernel = replace(find_kernel(), image=_halting_pvh_kernel(tmp_path / "vmlinux-halts"))
    started = time.monotonic()
    with pytest.raises(BootError) as info:
        _boot_true_with(kernel, alpine_disk, boot_dirs, timeout=4)
    assert 4 <= time.monotonic() - started < 12
    assert str(info.value) == (
        "the VM printed nothing within 4 s: the kernel did not boot (qemu/tcg)"
    )
    assert list(boot_dirs[1].iterdir()) == []  # nothing of the boot is left behind


@pytest.mark.slow
@needs_vm
def test_disk_is_read_only_and_writes_go_to_the_overlay(
    run_alpine: Runner, alpine_disk: Path
) -> None:
    before = hashlib.sha256(alpine_disk.read_bytes()).hexdigest()
    result = run_alpine(
        [
            "sh",
            "-c",
            "touch /x && ls /x && echo data > /etc/new && cat /etc/new; "
            # The command's own view, then the init's (pid 1, outside the chroot).
            "echo ---; cat /proc/mounts; echo ---; cat /proc/1/mounts",
        ]
    )
    assert result.exit_code == 0, result.output
    writes, own, init = result.output.split("---\n")
    assert writes.splitlines() == ["/x", "data"]
    assert hashlib.sha256(alpine_disk.read_bytes()).hexdigest() == before
    mounts = {fields[1]: fields for fields in (line.split() for line in own.splitlines())}
    # / is the overlay: the disk below, a tmpfs on top for the writes.
    assert mounts["/"][0] == mounts["/"][2] == "overlay"
    assert "lowerdir=/lower" in mounts["/"][3] and "upperdir=/rw/upper" in mounts["/"][3]
    for point, kind in [("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "devtmpfs")]:
        assert mounts[point][2] == kind, own
    below = {fields[1]: fields for fields in (line.split() for line in init.splitlines())}
    assert below["/lower"][:3] == ["/dev/vda", "/lower", "ext4"]
    assert "ro" in below["/lower"][3].split(","), below["/lower"]
    assert below["/rw"][2] == "tmpfs"


@pytest.mark.slow
@needs_vm
def test_busybox_image_runs_from_its_metadata(
    busybox_image: tuple[Path, dict[str, Any]], boot_dirs: tuple[Path, Path]
) -> None:
    disk, metadata = busybox_image
    cache, work = boot_dirs
    # cmd ["sh"] with stdin at /dev/null exits 0, as `docker run busybox` does.
    assert boot(disk, metadata, work_dir=work, cache_dir=cache).exit_code == 0
    result = boot(
        disk,
        metadata,
        command=["sh", "-c", "busybox | head -1; id"],
        work_dir=work,
        cache_dir=cache,
    )
    assert result.output.startswith("BusyBox v1.38.0")
    assert "uid=0(root)" in result.output


@pytest.mark.slow
@needs_vm
def test_kvm_probe_verdict_is_cached(boot_dirs: tuple[Path, Path]) -> None:
    cache, work = boot_dirs
    kernel = find_kernel()
    base = base_initramfs(kernel, cache)
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    first = kvm_works("qemu", qemu, kernel, base, cache, work)
    t0 = time.monotonic()
    assert kvm_works("qemu", qemu, kernel, base, cache, work) == first
    assert time.monotonic() - t0 < 0.5


# --- choosing the hypervisor -------------------------------------------------------------------
#
# Cloud Hypervisor is not packaged in Debian bookworm and cannot be installed here, so a
# fake ``cloud-hypervisor`` script on PATH stands for it, and the KVM probe's verdict is
# monkeypatched (on these machines /dev/kvm exists but cannot run the stock kernel).


@pytest.fixture
def fake_cloud_hypervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "cloud-hypervisor"
    fake.write_text("#!/bin/sh\necho 'fake cloud-hypervisor' >&2\nexit 99\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return fake


def _kvm_verdict(monkeypatch: pytest.MonkeyPatch, works: bool) -> list[tuple[str, str]]:
    """Make the KVM probe answer ``works``; returns the (hypervisor, binary) it was asked for."""
    asked: list[tuple[str, str]] = []

    def probe(hypervisor: str, binary: str, *_: object) -> bool:
        asked.append((hypervisor, binary))
        return works

    monkeypatch.setattr(runner, "kvm_works", probe)
    return asked


def _choose(tmp_path: Path, hypervisor: str | None = None, accel: str | None = None) -> Any:
    kernel = Kernel("0-test", tmp_path / "vmlinuz", tmp_path / "modules")  # the probe is faked
    return runner._choose_machine(hypervisor, accel, kernel, tmp_path, tmp_path, tmp_path)


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs QEMU")
@pytest.mark.parametrize(
    ("kvm", "hypervisor", "accel", "chosen", "probed"),
    [
        (True, None, None, ("cloud-hypervisor", "kvm"), ["cloud-hypervisor"]),
        (False, None, None, ("qemu", "tcg"), ["cloud-hypervisor", "qemu"]),
        (True, None, "tcg", ("qemu", "tcg"), []),
        (True, "qemu", None, ("qemu", "kvm"), ["qemu"]),
        (False, "cloud-hypervisor", "kvm", ("cloud-hypervisor", "kvm"), []),
    ],
    ids=["kvm-works", "kvm-fails", "tcg-asked", "qemu-asked", "kvm-forced"],
)
def test_the_machine_is_chosen_by_the_kvm_probe(
    fake_cloud_hypervisor: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    kvm: bool,
    hypervisor: str | None,
    accel: str | None,
    chosen: tuple[str, str],
    probed: list[str],
) -> None:
    asked = _kvm_verdict(monkeypatch, kvm)
    machine = _choose(tmp_path, hypervisor, accel)
    assert (machine.hypervisor, machine.accelerator) == chosen
    qemu = shutil.which("qemu-system-x86_64")
    fake = str(fake_cloud_hypervisor)
    assert machine.binary == (fake if chosen[0] == "cloud-hypervisor" else qemu)
    assert [h for h, _ in asked] == probed
    assert all(b == fake for h, b in asked if h == "cloud-hypervisor")


def test_cloud_hypervisor_without_kvm_is_a_clear_error(
    fake_cloud_hypervisor: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _kvm_verdict(monkeypatch, False)
    with pytest.raises(BootError, match="KVM does not work on this host, and Cloud Hypervisor"):
        _choose(tmp_path, "cloud-hypervisor")
    with pytest.raises(InvalidArgument, match="Cloud Hypervisor runs on KVM only"):
        _choose(tmp_path, "cloud-hypervisor", "tcg")


def test_cloud_hypervisor_not_installed_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    _kvm_verdict(monkeypatch, True)
    with pytest.raises(BootError, match=r"cloud-hypervisor is not installed \(not on PATH\)"):
        _choose(tmp_path, "cloud-hypervisor")


@needs_vm
def test_when_chosen_cloud_hypervisor_gets_the_vmlinux_and_the_disk(
    fake_cloud_hypervisor: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _kvm_verdict(monkeypatch, True)
    kernel = find_kernel()
    machine = runner._choose_machine(None, None, kernel, tmp_path, tmp_path, tmp_path)
    disk, initramfs = tmp_path / "rootfs.ext4", tmp_path / "initramfs.cpio"
    argv = runner._vm_argv(machine, kernel, initramfs, disk, tmp_path, 256)
    assert argv[0] == str(fake_cloud_hypervisor)
    vmlinux = Path(argv[argv.index("--kernel") + 1])
    assert has_pvh_entry(vmlinux.read_bytes())  # the ELF vmlinux, not the bzImage
    assert argv[argv.index("--initramfs") + 1] == str(initramfs)
    assert f"path={disk},readonly=on" in argv
    assert "tsc_early_khz" not in argv[argv.index("--cmdline") + 1]  # KVM: no TCG workaround

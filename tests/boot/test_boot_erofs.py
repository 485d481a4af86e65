"""Booting an EROFS disk: the initramfs carries the erofs module, the init mounts it.

Debian's cloud kernel builds erofs as a module (with libcrc32c); the initramfs
lists it apart, in ``/etc/hypeman/modules-erofs``, and the init loads it only
when ``run.conf`` says ``HM_FSTYPE=erofs`` (docs/design.md, "EROFS disks").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.pushed import PushedImage
from support.vm import needs_vm

from hypeman_images.boot import RunSpec, find_kernel
from hypeman_images.boot.initramfs import base_initramfs
from hypeman_images.boot.kernel import Kernel, erofs_modules
from hypeman_images.boot.runspec import render_run_conf
from hypeman_images.errors import BootError, InvalidArgument

CLI = str(Path(sys.executable).with_name("hypeman-images"))


def test_run_conf_names_the_filesystem() -> None:
    conf = render_run_conf(RunSpec(), ["true"], "n", fstype="erofs").decode()
    assert "HM_FSTYPE=erofs\n" in conf
    assert "HM_FSTYPE=ext4\n" in render_run_conf(RunSpec(), ["true"], "n").decode()
    with pytest.raises(InvalidArgument, match="xfs"):
        render_run_conf(RunSpec(), ["true"], "n", fstype="xfs")


@needs_vm
def test_the_initramfs_carries_erofs_apart(tmp_path: Path) -> None:
    kernel = find_kernel()
    extra = [m.name for m in erofs_modules(kernel)]
    assert extra[-1] == "erofs"  # its dependencies (libcrc32c) first
    archive = base_initramfs(kernel, tmp_path)
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=archive.open("rb"), capture_output=True, check=True
    ).stdout.decode()
    names = set(listing.split())
    assert "etc/hypeman/modules-erofs" in names
    assert {f"lib/modules/{name}.ko" for name in extra} <= names
    unpacked = subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", "etc/hypeman/modules-erofs"],
        stdin=archive.open("rb"),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert unpacked.split() == extra


def test_a_kernel_without_erofs_is_refused_before_booting(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "modules.dep").write_text("kernel/fs/overlayfs/overlay.ko:\n")
    (modules / "modules.builtin").write_text(
        "".join(f"kernel/{n}.ko\n" for n in ("virtio_mmio", "virtio_pci", "virtio_blk", "ext4"))
    )
    with pytest.raises(BootError, match="no module 'erofs'"):
        erofs_modules(Kernel("0-test", tmp_path / "vmlinuz", modules))


@pytest.mark.slow
@needs_vm
def test_an_erofs_disk_boots_and_runs_its_command(alpine_ref: PushedImage, data_dir: Path) -> None:
    pulled = subprocess.run(
        [CLI, "pull", "--data-dir", str(data_dir), "--format", "erofs", alpine_ref.ref],
        capture_output=True,
        text=True,
    )
    assert pulled.returncode == 0, pulled.stderr
    # No --format: the image's own disk, the only one it has.
    script = "cat /etc/alpine-release; echo data > /etc/new && cat /etc/new; cat /proc/1/mounts"
    argv = [CLI, "boot", "--data-dir", str(data_dir), "--timeout", "120", alpine_ref.ref]
    result = subprocess.run(
        [*argv, "--", "sh", "-c", script], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    release, written, *mounts = result.stdout.splitlines()
    assert (release, written) == ("3.20.3", "data")
    lower = next(line.split() for line in mounts if " /lower " in line)
    assert lower[:3] == ["/dev/vda", "/lower", "erofs"] and "ro" in lower[3].split(",")

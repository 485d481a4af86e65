"""Proof that a disk boots: run an image's command in a microVM.

The host's Debian kernel boots with a small initramfs (static busybox, the
virtio/overlay modules, ``init.sh``) whose init mounts the disk read-only as
``/dev/vda`` under a tmpfs overlay and runs the image's entrypoint + cmd with
its env, working dir and user, then prints the exit code and powers off.

    boot(disk, RunSpec.from_metadata(meta), work_dir=tmp) -> BootResult
"""

from hypeman_images.boot.kernel import Kernel, extract_vmlinux, find_kernel
from hypeman_images.boot.runner import BootResult, boot, boot_command, kvm_works
from hypeman_images.boot.runspec import RunSpec
from hypeman_images.boot.vm import cloud_hypervisor_command, qemu_command

__all__ = [
    "BootResult",
    "Kernel",
    "RunSpec",
    "boot",
    "boot_command",
    "cloud_hypervisor_command",
    "extract_vmlinux",
    "find_kernel",
    "kvm_works",
    "qemu_command",
]

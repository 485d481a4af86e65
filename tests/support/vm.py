"""Whether this machine can boot a VM: a kernel, QEMU and a busybox for the initramfs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hypeman_images.boot import find_kernel
from hypeman_images.errors import BootError


def have_vm_tools() -> bool:
    """A kernel ``boot`` can use, ``qemu-system-x86_64`` and ``/bin/busybox``."""
    try:
        find_kernel()
    except BootError:
        return False
    return bool(shutil.which("qemu-system-x86_64") and Path("/bin/busybox").exists())


needs_vm = pytest.mark.skipif(not have_vm_tools(), reason="needs a kernel, QEMU and busybox")

"""hypeman-images: OCI container images to bootable ext4 disks for microVMs."""

from __future__ import annotations

__version__ = "0.1.0"

"""hypeman-images: OCI container images to bootable ext4 disks for microVMs.

The public facade is :class:`ImageManager` (create / pull / get / list /
delete / gc / recover) and the :class:`Image` it returns; errors derive from
:class:`HypemanError` (see :mod:`hypeman_images.errors`).
"""

from __future__ import annotations

from .errors import HypemanError
from .image import Image
from .manager import GcReport, ImageManager, RecoveryReport
from .store import ImageStatus

__version__ = "0.1.0"

__all__ = [
    "GcReport",
    "HypemanError",
    "Image",
    "ImageManager",
    "ImageStatus",
    "RecoveryReport",
    "__version__",
]

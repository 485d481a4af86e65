"""hypeman-images: OCI container images to bootable ext4 disks for microVMs.

The public facade is :class:`ImageManager` (create / pull / get / list /
delete / gc / recover) and the :class:`Image` it returns; errors derive from
:class:`HypemanError` (see :mod:`hypeman_images.errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypeman_images.build.image import Image
    from hypeman_images.build.maintenance import GcReport, RecoveryReport
    from hypeman_images.build.manager import ImageManager
    from hypeman_images.errors import HypemanError
    from hypeman_images.store.images import ImageStatus

__version__ = "0.1.0"

# The facade's names load on first use (PEP 562): ``import hypeman_images`` (and
# every submodule import, which runs this file first) then costs nothing, so the
# CLI loads only what its command needs (start-up time; docs/performance.md).
_LAZY = {
    "HypemanError": "errors",
    "Image": "build.image",
    "GcReport": "build.maintenance",
    "ImageManager": "build.manager",
    "RecoveryReport": "build.maintenance",
    "ImageStatus": "store.images",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "GcReport",
    "HypemanError",
    "Image",
    "ImageManager",
    "ImageStatus",
    "RecoveryReport",
    "__version__",
]

"""hypeman-images: OCI container images to bootable ext4 disks for microVMs.

The public facade is :class:`ImageManager` (create / pull / get / list /
delete / gc / recover) and the :class:`Image` it returns; what configures a
build (:class:`BuildOptions`, its :class:`Limits` and :class:`Platform`) and
how a name is read (:func:`parse_reference`, :class:`Reference`) come with it.
Errors derive from :class:`HypemanError` (see :mod:`hypeman_images.errors`).
Every name README.md and docs/api.md use is here (tests/test_readme.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypeman_images.build.image import Image
    from hypeman_images.build.maintenance import GcReport, RecoveryReport
    from hypeman_images.build.manager import ImageManager
    from hypeman_images.build.options import BuildOptions
    from hypeman_images.errors import HypemanError
    from hypeman_images.layers.limits import Limits
    from hypeman_images.oci.reference import Reference, parse_reference
    from hypeman_images.oci.spec import Platform
    from hypeman_images.store.images import ImageStatus, StoredImage

__version__ = "0.1.0"

# The facade's names load on first use (PEP 562): ``import hypeman_images`` (and
# every submodule import, which runs this file first) then costs nothing, so the
# CLI loads only what its command needs (start-up time; docs/performance.md).
_LAZY = {
    "BuildOptions": "build.options",
    "HypemanError": "errors",
    "Image": "build.image",
    "GcReport": "build.maintenance",
    "ImageManager": "build.manager",
    "Limits": "layers.limits",
    "Platform": "oci.spec",
    "RecoveryReport": "build.maintenance",
    "Reference": "oci.reference",
    "ImageStatus": "store.images",
    "StoredImage": "store.images",
    "parse_reference": "oci.reference",
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
    "BuildOptions",
    "GcReport",
    "HypemanError",
    "Image",
    "ImageManager",
    "ImageStatus",
    "Limits",
    "Platform",
    "RecoveryReport",
    "Reference",
    "StoredImage",
    "__version__",
    "parse_reference",
]

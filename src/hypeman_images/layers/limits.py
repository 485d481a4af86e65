"""The limits every image is held to (:class:`Limits`), and the image-wide check.

Each limit guards a resource against hostile or broken images; scanning
(:mod:`scan`), merging (:mod:`merge`) and the one pass (:mod:`onepass`) all
check against the same :class:`Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypeman_images.errors import LimitExceeded

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Safety limits against hostile or broken images; all configurable.

    Each guards a resource: ``max_entries`` memory for the scans and the tree,
    the byte limits CPU and disk against decompression bombs, the header and
    path limits memory per entry, ``max_layers`` the work per layer.
    """

    max_entries: int = 2_000_000  # per image, all layers together
    # The byte limits fit the biggest images people run (CUDA/ML images reach
    # ~20 GB uncompressed, their biggest layers ~10 GB) with room to spare, and
    # stop a bomb after a bounded amount of work. The pipeline lowers both to
    # what the data dir has room for at the start of a build (:meth:`within`).
    max_layer_bytes: int = 32 * GiB  # uncompressed
    max_image_bytes: int = 64 * GiB  # uncompressed, all layers together
    max_header_bytes: int = 1 << 20  # one PAX extended header or GNU long name
    max_path_bytes: int = 4096  # Linux PATH_MAX
    max_link_bytes: int = 4096  # symlink targets and hard-link names
    # Each layer costs a request, a blob file and a scan. Docker stacks at most
    # 128 layers (moby's overlay2 driver, maxDepth), so no image it built has
    # more; containerd sets no cap. Far above real images, this one bounds what
    # a hostile manifest can ask for (docs/security.md, "Layer count and open files").
    max_layers: int = 1000

    def within(self, budget: int) -> Limits:
        """These limits with both byte limits lowered to ``budget`` where they are above it."""
        return replace(
            self,
            max_layer_bytes=min(self.max_layer_bytes, budget),
            max_image_bytes=min(self.max_image_bytes, budget),
        )


def check_layer_count(layers: int, limits: Limits) -> None:
    """Raise :class:`LimitExceeded` if an image of ``layers`` layers has too many."""
    if layers > limits.max_layers:
        raise LimitExceeded(
            f"image has {layers} layers, over Limits.max_layers={limits.max_layers} (docker "
            "builds at most 128); raise that limit if the image is trusted"
        )


def check_image_limits(entries: int, size: int, layer: int, limits: Limits) -> None:
    """Raise :class:`LimitExceeded` if the layers counted so far are over an image-wide limit.

    ``layer``: the index of the last layer counted, so the image has at least ``layer + 1``.
    """
    check_layer_count(layer + 1, limits)
    if entries > limits.max_entries:
        raise LimitExceeded(
            f"image has at least {entries} entries (counted up to layer "
            f"{layer}), over Limits.max_entries={limits.max_entries}"
        )
    if size > limits.max_image_bytes:
        raise LimitExceeded(
            f"image is at least {size} bytes uncompressed (counted up to layer "
            f"{layer}), over Limits.max_image_bytes={limits.max_image_bytes}"
        )

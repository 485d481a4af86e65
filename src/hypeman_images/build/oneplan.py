"""Whether a build tries the one pass, and the disk it sizes for it: from the manifest alone.

Known before any layer is read, so both the conversion (:mod:`.convert`,
which runs :class:`onepass.OnePass`) and the disk cache (:mod:`.diskcache`,
which predicts the recipe a local build would use) decide it the same way.
Kept apart from :mod:`.onepass`, which needs the layer and disk machinery: a
build that fetches its disk from the cache never loads those.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypeman_images.build.options import BuildOptions
from hypeman_images.layers.limits import Limits
from hypeman_images.oci.spec import LAYER_COMPRESSION, Descriptor

# The one-pass disk is sized before any layer is read, from the manifest: a gzip
# layer is taken to hold at most this many times its compressed size of tar.
# Debian's layers inflate ~3x, text-heavy ones ~10x; one past it (a big file of
# zeros, a decompression bomb) stops the pass and is built the two-pass way.
ONE_PASS_MAX_RATIO = 32


def one_pass_candidate(layers: Sequence[Descriptor], options: BuildOptions, limits: Limits) -> bool:
    """Will this image try the one-pass way? Known before the pull, from the manifest.

    Every layer type we read (gzip, zstd, plain): the disk is sized from the
    manifest (:func:`one_pass_sizes`), never from what the layers say of
    themselves. The one pass writes each layer as it reads it, up to that
    size: it is taken only when all of it fits within ``limits`` (which a
    build lowers to its disk's room); else pass 1 counts the layers, writing
    nothing, before mke2fs starts.
    """
    return (
        options.one_pass
        and all(
            LAYER_COMPRESSION.get(layer.media_type) in ("gzip", "zstd", "none") for layer in layers
        )
        and sum(one_pass_sizes(layers, limits)) <= limits.max_image_bytes
    )


def one_pass_sizes(layers: Sequence[Descriptor], limits: Limits) -> list[int]:
    """The most tar each layer may inflate to in the one pass: the disk is sized for it.

    From the manifest alone, so the disk is the same whatever the cache held
    and the pass can start before the layers are downloaded: a plain layer's
    own size, a gzip layer's times :data:`ONE_PASS_MAX_RATIO`, each within
    ``limits.max_layer_bytes`` (past those, the limits speak anyway).
    """

    def bound(layer: Descriptor) -> int:
        ratio = 1 if LAYER_COMPRESSION.get(layer.media_type) == "none" else ONE_PASS_MAX_RATIO
        return min(layer.size * ratio, limits.max_layer_bytes)

    return [bound(layer) for layer in layers]


__all__ = ["ONE_PASS_MAX_RATIO", "one_pass_candidate", "one_pass_sizes"]

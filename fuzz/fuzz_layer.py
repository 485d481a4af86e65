"""atheris: a layer blob through decompression, the tar reader and the flattener."""

from __future__ import annotations

import io

import atheris
from _common import run

with atheris.instrument_imports():
    from hypeman_images.layers.compression import open_decompressed
    from hypeman_images.layers.limits import Limits
    from hypeman_images.layers.merge import merge
    from hypeman_images.layers.scan import scan_layer

LIMITS = Limits(max_entries=10_000, max_layer_bytes=16 << 20, max_header_bytes=64 << 10)
TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
)


def check(data: bytes) -> None:
    if not data:
        return
    media_type, blob = TYPES[data[0] % 3], data[1:]
    with open_decompressed(io.BytesIO(blob), media_type, name="fuzz") as stream:
        scan = scan_layer(stream, 0, limits=LIMITS)
    tree = merge([scan], LIMITS)
    for path in tree.nodes():
        assert not path.startswith(b"/") and b".." not in path.split(b"/")


if __name__ == "__main__":
    run(check)

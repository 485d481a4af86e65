"""Layer semantics: from compressed layer blobs to one merged, checked tree.

Owns tar reading and writing (``tarfmt``), decompression (``compression``),
path safety, scanning, merging whiteouts, planning and emitting the merged
tree as one tar stream (``flatten``), the one-pass reader that writes the
newest layer first while the download runs (``onepass``), the scan cache
(``scancache``) and the limits every layer is held to — umoci's
``oci/layer``: layer semantics and path safety in one place.

May import: ``errors``, ``fsutil``, ``oci``, ``store``.
"""

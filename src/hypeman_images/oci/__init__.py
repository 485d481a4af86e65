"""The OCI vocabulary: names, digests and the typed documents of the image spec.

Owns parsing image references (``reference``), content digests (``digest``)
and the manifest/index/config models and media types (``spec``), the way
go-containerregistry's ``name`` and ``v1`` packages do. Strings from users and
registries become these types once, at the boundary.

May import: ``hypeman_images.errors`` only.
"""

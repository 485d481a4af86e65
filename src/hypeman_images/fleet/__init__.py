"""Built disks shared through an OCI registry (docs/disk-artifacts.md).

Owns the disk artifact: an OCI image manifest attached (``subject``) to the
platform manifest a disk was built from, whose config records how it was
built (``recipe``, ``config``, ``artifact``) and whose layers are the disk in
zstd chunks (``pack``); pushing it with its own tag and a referrers entry
(``push``), finding one by recipe (``lookup``) and fetching one, verified
chunk by chunk and whole, into a temp file the caller renames (``fetch``),
the whole disk hashed in order as its chunks land (``diskhash``).
Registry writes and the referrers listing live in ``registry.push`` and
``registry.referrers``; this package decides what is written and trusted.

May import: ``errors``, ``fsutil``, ``oci``, ``registry``, ``store``, ``disk``.
"""

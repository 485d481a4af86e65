"""What is kept on disk: the blob cache, the image store and their housekeeping.

Owns the content-addressed blob cache in OCI image-layout form (``blobs``,
written temp -> hash -> fsync -> rename), readers that follow a blob while it
is still being written (``feeds``), the image records, tag links and locks
under ``images/`` (``images``) and recovery/garbage collection
(``housekeeping``) — umoci's ``oci/cas``.

May import: ``errors``, ``fsutil``, ``oci``.
"""

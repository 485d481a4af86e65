"""Making and checking disk images from a merged tree.

Owns ext4 sizing (``sizing``), running ``mke2fs -d -`` (``mke2fs``), finding
a usable e2fsprogs (``e2fsprogs``), the ``debugfs`` fix-ups (``debugfs``), the
staged fallback for e2fsprogs older than 1.47.1 (``fallback``), checking a
finished disk (``check``; again later: ``verify``), putting it in place whole
(``publish``), writing EROFS images itself, without an external tool
(``erofs``), checking them (``fsck_erofs``) and hashing a disk while its
writer finishes it (``filehash``). It knows nothing of registries or layers: it takes a tar stream
and the numbers to size the disk by, or (EROFS) entries in its own model,
``erofs.Entry``.

May import: ``errors``, ``fsutil``, ``oci``.
"""

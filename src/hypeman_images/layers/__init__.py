"""Layer semantics: from compressed layer blobs to one merged, checked tree.

umoci's ``oci/layer``: layer semantics and path safety in one place. The
modules, in the order a layer meets them:

- ``tar`` the format's shared vocabulary; ``tarheader`` one entry's header
  decoded; ``tarsparse`` GNU sparse maps; ``tarread`` the reader that walks
  and hashes a stream; ``tarwrite`` the header encoder.
- ``compression`` decompression; ``limits`` the limits every layer and image
  is held to; ``paths`` path safety, the one chokepoint.
- ``entries`` what a scan records (``Entry``, ``LayerScan``); ``scan`` pass 1,
  a layer's headers; ``scancache`` scans kept by blob digest.
- ``merge`` pass 2, whiteouts and the in-memory tree; ``plan`` the merged
  tree in output order and its counts; ``xattrs`` the xattr policy table.
- ``emit`` pass 3, the merged tree as one tar stream for ``mke2fs -d -``;
  ``onepass`` the one-pass reader that writes the newest layer first while
  the download runs; ``survivors`` where it writes (mke2fs's tar stream, or
  a disk writer's data area).

May import: ``errors``, ``fsutil``, ``oci``, ``store``.
"""

"""One image from name to disk, and the machinery that runs many of them.

Owns resolving and pulling (``pull``, which reports to one ``PullObserver``,
``observer``), converting layers into a disk (``convert``: the ``Conversion``
that owns one build's scans, feeds and threads and decides one pass or two,
as ``oneplan`` says from the manifest alone; ``onepass`` for the pass that
follows the download, ``stream`` for what both ways share; ``erofs`` for an
EROFS disk, ``onepass_erofs`` for its one pass), the
end-to-end build of one image and its record (``pipeline``), the disk cache
in a build: a disk fetched instead of built (``diskcache``) and one built here
pushed (``diskpush``), the build queue (``queue``), the :class:`ImageManager`
facade (``manager``) with the records of its requests (``records``), its
shared name resolution (``resolving``) and the data dir's upkeep: gc,
recovery, verification (``maintenance``), the build options and data dir
(``options``), progress reporting (``progress``), metrics (``metrics``), the
facade's ``Image`` view (``image``) and the collector settings builds run
under (``collector``).

May import: ``errors``, ``fsutil``, ``oci``, ``registry``, ``store``,
``layers``, ``disk``, ``fleet``.
"""

"""What one pull reports, blob by blob, and who reads its layers beside it.

:class:`PullObserver` is the seam between :func:`pull.pull` and whoever
watches it: the progress shown (``progress.Reporter``) and a conversion that
reads the layers beside the download (``convert``). It lives apart from the
pull so that a progress reporter can be made, and ``list`` or ``inspect``
can run, without loading the registry client the pull needs (httpx;
tests/cli/test_cli_startup.py).
"""

from __future__ import annotations

from typing import BinaryIO

from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import Descriptor
from hypeman_images.store.feeds import LayerFeeds


class PullObserver:
    """What one pull reports, blob by blob, and who reads its layers beside it.

    Every part is optional: each event is a no-op here, and nothing is tapped
    or followed. The events come from the pull's download threads, several
    blobs at once.

    ``feeds``: told where each layer's bytes are as they land in the blob
    cache (:mod:`store.feeds`), for a build that follows the downloads; the
    layers then download top layer first, :data:`pull.FOLLOWED_DOWNLOAD_WORKERS`
    at once.
    """

    feeds: LayerFeeds | None = None

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        """A blob download begins (or is skipped because ``cached``)."""

    def advance(self, digest: Digest, nbytes: int) -> None:
        """``nbytes`` more of the blob arrived."""

    def done(self, digest: Digest) -> None:
        """The blob is verified and in the cache."""

    def wants(self, index: int, layer: Descriptor) -> bool:
        """Should :meth:`tap` read this layer? Asked once per distinct layer, before its download.

        A cached blob that no tap reads is re-hashed by the pull instead
        (``pull._intact``): nothing else may read it whole.
        """
        return False

    def tap(self, index: int, layer: Descriptor, stream: BinaryIO) -> None:
        """Read a wanted layer's compressed bytes, in a thread of its own, while they are pulled.

        ``stream`` ends at the blob's end; reading it fails if the download
        does. The tap must close it (closing early is fine: the download goes
        on). Its exceptions are logged, never raised: the pull's own errors are
        the ones that count.
        """
        stream.close()


__all__ = ["PullObserver"]

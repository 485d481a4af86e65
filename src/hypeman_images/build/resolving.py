"""Names to digests for the manager: one manifest GET per name however many ask at once.

Requests for the same name and platform that arrive while it is being
resolved wait for that answer (or its error) rather than asking the
registry again (:class:`SharedResolver`, used by
:class:`~hypeman_images.build.manager.ImageManager`); a recovered build's
manifest is fetched again by its digest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from hypeman_images.build.queue import Job, PauseHook
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import Platform

if TYPE_CHECKING:
    from hypeman_images.build.pull import ResolvedImage
    from hypeman_images.registry.client import RegistryClient


class SharedResolver:
    """Resolves a name once for everyone asking at the same time. Thread-safe.

    ``client`` gives the registry client (made on first use by the manager);
    ``pause`` is the crash tests' hook, reached at ``resolving``.
    """

    def __init__(self, client: Callable[[], RegistryClient], pause: PauseHook) -> None:
        self._client = client
        self._pause = pause
        self._lock = threading.Lock()  # a leaf: nothing is called while it is held
        self._resolving: dict[tuple[str, Platform, bytes], Future[ResolvedImage]] = {}

    def resolve(
        self,
        ref: Reference,
        platform: Platform,
        client: RegistryClient | None = None,
        fingerprint: bytes = b"",
    ) -> ResolvedImage:
        """``ref`` resolved for ``platform``: asked here, or waited for if another asks.

        ``client``: a request's own (borrowed credentials, ``build.request``), shared
        only with requests of the same credentials (``fingerprint``).
        """
        key = (str(ref), platform, fingerprint)
        with self._lock:
            future = self._resolving.get(key)
            owner = future is None
            if future is None:
                future = self._resolving[key] = Future()
        if owner:
            try:
                self._pause.reached("resolving")
                future.set_result(_resolve(client or self._client(), ref, platform))
            except BaseException as exc:  # handed to every waiter, re-raised below
                future.set_exception(exc)
            finally:
                with self._lock:
                    del self._resolving[key]
        return future.result()

    def again(self, job: Job) -> ResolvedImage:
        """A recovered build's manifest, fetched by digest (verified against it), kept in
        ``job``; not shared: one job per digest."""
        self._pause.reached("resolving")
        resolved = _resolve(self._client(), job.ref, job.options.platform)
        job.resolved = resolved
        return resolved


def _resolve(client: RegistryClient, ref: Reference, platform: Platform) -> ResolvedImage:
    """:func:`pull.resolve`, imported on the first call: it needs the registry client
    (httpx), which a manager that only reads the store never loads
    (tests/cli/test_cli_startup.py)."""
    from hypeman_images.build.pull import resolve

    return resolve(client, ref, platform)


__all__ = ["SharedResolver"]

"""Where a request for an image goes: the registry's mirrors in order, then the registry.

containers-registries.conf(5): the ``[[registry.mirror]]`` entries of a
registry are asked first, in order, and the registry itself last. A mirror
that lacks the image, or fails, is passed over with a log line, as containerd
passes to its next host; the registry's own answer, an error included, is the
result. :class:`Send` is one GET to an endpoint as the registry client sends
it (auth, scheme, error translation): the manifest and blob readers
(:mod:`.manifests`, :mod:`.download`) are handed it, and so need not import
the client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import httpx

from hypeman_images.errors import HypemanError, NotFound
from hypeman_images.oci.reference import Reference
from hypeman_images.registry.config import RegistryConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """Where requests for a registry go: the registry itself or one of its mirrors.

    ``registry`` is the name credentials are looked up under; ``host`` the API
    host, whose scheme the client decides when it first sends there.
    """

    registry: str
    host: str
    mirror: bool = False

    def path(self, repository: str, rest: str) -> str:
        """The API path of ``rest`` (``manifests/<tag>``, ``blobs/<digest>``) in ``repository``."""
        return f"/v2/{repository}/{rest}"


def endpoints_for(config: RegistryConfig, ref: Reference) -> list[Endpoint]:
    """The mirrors configured for ``ref``'s registry, then the registry itself."""
    out = [Endpoint(m.location, m.location, mirror=True) for m in config.mirrors_for(ref.registry)]
    out.append(Endpoint(ref.registry, ref.api_host))
    return out


def first_success(
    endpoints: Sequence[Endpoint], ref: Reference, fetch: Callable[[Endpoint], T]
) -> T:
    """``fetch`` from each endpoint in turn: the first answer, else the last endpoint's error."""
    for endpoint in endpoints[:-1]:
        try:
            return fetch(endpoint)
        except NotFound as exc:
            # A mirror that lacks an image is normal (containerd logs "trying next
            # host - response was http.StatusNotFound" at info level too).
            log.info("mirror %s lacks it, trying the next: %s", endpoint.host, exc)
        except HypemanError as exc:
            log.warning("mirror %s failed for %s, trying the next: %s", endpoint.host, ref, exc)
    return fetch(endpoints[-1])


class Send(Protocol):
    """One GET, auth included: a 2xx response (open, streaming) or an error of the tree.

    ``url`` is absolute (a foreign layer's) or an API path on ``endpoint``'s
    host; without ``ref``, no credentials are sent. ``timeout`` replaces the
    client's for this request. :meth:`.client.RegistryClient._send` is one.
    """

    def __call__(
        self,
        endpoint: Endpoint,
        ref: Reference | None,
        url: str,
        headers: dict[str, str],
        subject: str,
        *,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response: ...

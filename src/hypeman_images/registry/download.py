"""A blob's download: where it comes from, and resuming it after dropped connections.

:func:`open_download` (behind :meth:`RegistryClient.open_blob`) opens a
blob on the first endpoint that has it (:mod:`.endpoints`: the mirrors, then
the registry); a foreign (non-distributable) layer is asked of the URLs its
descriptor names first, if ``allow_foreign_layers`` is set. The bytes are
streamed raw, as stored; the caller checks them (a ``VerifyingStream``).

A registry (or the storage it redirects to) may cut a long download; it is
resumed with ``Range: bytes=N-`` (RFC 9110 §14.2) so that the caller sees
every byte exactly once and its digest check still holds. A server that
ignores Range answers 200: the bytes already delivered are then skipped.
Resumptions are bounded by ``RegistryConfig.resume_attempts``; a connection
slower than the low-speed limit (:mod:`.speed`) counts as dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import httpx

from hypeman_images.errors import HypemanError, NotFound, RegistryError, TransientError
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import Descriptor
from hypeman_images.oci.wire import decimal
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.registry.endpoints import Endpoint, Send, first_success
from hypeman_images.registry.retry import retrying
from hypeman_images.registry.speed import TooSlow

log = logging.getLogger(__name__)
_SLOW_HINT = " (too slow: --low-speed-limit BYTES and --low-speed-time S set the limit)"
# Non-distributable ("foreign") layers: the registry may lack them, and their
# descriptor's urls say where they are (image-spec layer.md, descriptor.md "urls").
_FOREIGN_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)


def open_download(
    ref: Reference,
    descriptor: Descriptor,
    *,
    endpoints: Sequence[Endpoint],
    send: Send,
    config: RegistryConfig,
) -> Download:
    """The download of a blob of ``ref``'s repository, its first response open.

    A foreign layer comes from its ``urls`` only if ``config.allow_foreign_layers``,
    and from ``endpoints`` when none of them answers; any other blob from the
    first of ``endpoints`` that has it. ``send`` sends each GET.
    """
    subject = f"blob {descriptor.digest} of {ref.name}"
    if config.allow_foreign_layers and descriptor.media_type in _FOREIGN_TYPES:
        download = _open_foreign(descriptor, subject, send, config)
        if download is not None:
            return download
    return first_success(
        endpoints,
        ref,
        lambda endpoint: _open_blob(endpoint, ref, descriptor, subject, send, config),
    )


def _open_blob(
    endpoint: Endpoint,
    ref: Reference,
    descriptor: Descriptor,
    subject: str,
    send: Send,
    config: RegistryConfig,
) -> Download:
    path = endpoint.path(ref.repository, f"blobs/{descriptor.digest}")
    opener = _ranged_opener(send, endpoint, ref, path, subject, config)
    try:
        return Download(opener, descriptor.size, config, subject)
    except NotFound as exc:
        if descriptor.media_type in _FOREIGN_TYPES and descriptor.urls:
            raise NotFound(
                f"{exc.detail}; it is a foreign (non-distributable) layer, which its image "
                f"says to fetch from {descriptor.urls[0]}",
                hint="allow that with --allow-foreign-layers "
                "(allow-foreign-layers = true in registries.conf)",
                api_hint="the server's registries.conf can allow that "
                "(allow-foreign-layers = true)",
            ) from exc
        raise


def _open_foreign(
    descriptor: Descriptor, subject: str, send: Send, config: RegistryConfig
) -> Download | None:
    for url in descriptor.urls:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            parsed = httpx.URL()  # a manifest's garbage: no scheme, passed over below
        if parsed.scheme not in ("http", "https"):
            continue
        host = parsed.netloc.decode("ascii")
        endpoint = Endpoint(host, host)
        opener = _ranged_opener(send, endpoint, None, url, subject, config)
        try:
            return Download(opener, descriptor.size, config, subject)
        except HypemanError as exc:
            log.warning("foreign layer URL %s failed: %s", url, exc)
    return None


def _ranged_opener(
    send: Send,
    endpoint: Endpoint,
    ref: Reference | None,
    url: str,
    subject: str,
    config: RegistryConfig,
) -> Callable[[int], httpx.Response]:
    """A function that (re)opens ``url`` (or API path) from a byte offset, for resuming."""

    def opener(offset: int) -> httpx.Response:
        # Identity encoding: the digest covers the bytes as stored, not a re-encoding.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return retrying(lambda: send(endpoint, ref, url, headers, subject), config)

    return opener


class Download:
    """A blob download that resumes with ``Range`` after a dropped connection."""

    def __init__(
        self,
        opener: Callable[[int], httpx.Response],
        size: int | None,
        config: RegistryConfig,
        subject: str,
    ) -> None:
        self._opener = opener
        self._size = size
        self._config = config
        self._subject = subject
        self._response: httpx.Response | None = opener(0)

    def close(self) -> None:
        """Release the current response's connection."""
        if self._response is not None:
            self._response.close()
            self._response = None

    def chunks(self) -> Iterator[bytes]:
        """The blob's raw bytes, resuming after drops; each byte exactly once."""
        offset = 0
        resumes = 0
        while True:
            response = self._response
            assert response is not None
            try:
                for chunk in _raw_chunks(response, self._config.chunk_size):
                    offset += len(chunk)
                    yield chunk
                if self._size is None or offset >= self._size:
                    return
                cause: Exception = TransientError(f"connection closed after {offset} bytes")
            except (httpx.TransportError, httpx.StreamError) as exc:
                cause = exc
            self.close()
            resumes += 1
            if resumes > self._config.resume_attempts:
                hint = _SLOW_HINT if isinstance(cause, TooSlow) else ""
                raise TransientError(
                    f"{self._subject}: download kept failing, gave up after "
                    f"{self._config.resume_attempts} resumptions: {cause}{hint}"
                ) from cause
            log.info("%s: resuming at byte %d after: %s", self._subject, offset, cause)
            self._response = self._resume(offset)

    def _resume(self, offset: int) -> httpx.Response:
        response = self._opener(offset)
        if response.status_code == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                response.close()
                raise RegistryError(
                    f"{self._subject}: asked to resume at byte {offset}, got a range starting "
                    f"at {start}"
                )
            return response
        # 200: the server ignored Range; skip what was already delivered.
        skip = offset
        stream = _raw_chunks(response, self._config.chunk_size)
        rest = b""
        try:
            while skip > 0:
                chunk = next(stream)
                if len(chunk) > skip:
                    rest = chunk[skip:]
                skip -= min(skip, len(chunk))
        except StopIteration:
            response.close()
            raise TransientError(f"{self._subject}: shorter on retry than before") from None
        return _prepend(response, rest, stream)


def _raw_chunks(response: httpx.Response, size: int) -> Iterator[bytes]:
    """The body undecoded (a blob's bytes are what its digest names, whatever
    ``Content-Encoding`` says); a transport may hand over a response already read."""
    if response.is_stream_consumed:
        content = response.content
        return iter([content[i : i + size] for i in range(0, len(content), size)])
    return _coalesce(response.iter_raw(), size)


def _coalesce(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """The network's (<= 64 KiB) reads joined into chunks of at least ``size`` bytes.

    One copy per byte; httpx's own ``iter_raw(size)`` copies each byte about
    three times, holding the GIL that the layer scans need (the cost on a large
    image is in docs/performance.md).
    """
    parts: list[bytes] = []
    have = 0
    for chunk in chunks:
        parts.append(chunk)
        have += len(chunk)
        if have >= size:
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            parts, have = [], 0
    if parts:
        yield b"".join(parts)


def _prepend(response: httpx.Response, head: bytes, rest: Iterator[bytes]) -> httpx.Response:
    """A response whose ``iter_raw`` yields ``head`` then the remainder of ``rest``."""

    class _Stream(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            if head:
                yield head
            yield from rest

        def close(self) -> None:
            response.close()

    return httpx.Response(response.status_code, headers=response.headers, stream=_Stream())


def _content_range_start(value: str) -> int | None:
    # "bytes 100-999/1000" (RFC 9110 §14.4)
    unit, _, spec = value.partition(" ")
    if unit != "bytes":
        return None
    start = spec.split("-", 1)[0]
    return decimal(start)

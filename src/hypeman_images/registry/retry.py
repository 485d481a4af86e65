"""Which transport failures are transient, and how the transient ones are retried.

httpx's exceptions become the exception tree here (``raise … from``): an
untrusted certificate, or a plain-HTTP answer to our TLS hello, is a
:class:`RegistryError` that names the option to fix it (retrying cannot
help); timeouts and dropped or refused connections are a
:class:`TransientError`. Only :class:`TransientError` is retried (5xx
responses become one in :mod:`.responses`; 429 is ``RateLimited``, never
retried), up to ``config.max_attempts`` times with full-jitter exponential
backoff, and never past a caller's deadline. A body slower than the
low-speed limit (:class:`.speed.TooSlow`) is a read timeout that names its flags.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx

from hypeman_images.errors import RegistryError, TransientError
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.registry.schemes import Schemes
from hypeman_images.registry.speed import TooSlow

log = logging.getLogger(__name__)

T = TypeVar("T")
# What an API caller is told of a fix that only the server's operator can make.
_SERVER_SETTING = "a setting of the server's registries.conf"
E = TypeVar("E", bound=BaseException)


@contextmanager
def translating(
    host: str, subject: str, config: RegistryConfig, schemes: Schemes
) -> Iterator[None]:
    """Turn httpx's exceptions, raised fetching ``subject`` from ``host``, into ours.

    A connection that could not be made also makes ``schemes`` forget the
    host's scheme, so that the retry decides it again.
    """
    try:
        yield
    except httpx.TooManyRedirects as exc:
        raise RegistryError(f"{host}: too many redirects fetching {subject}") from exc
    except httpx.TransportError as exc:
        untrusted = _cause(exc, ssl.SSLCertVerificationError)
        if untrusted is not None:
            raise RegistryError(
                f"{host}: TLS certificate not trusted ({untrusted.verify_message})",
                hint=f"trust its CA with --certs-dir DIR (DIR/{host}/ca.crt, as in "
                f"certs.d) or --ca-bundle FILE, or mark the registry insecure "
                f"(--insecure-registry {host}) to skip verification",
                api_hint=_SERVER_SETTING,
            ) from exc
        plain = _cause(exc, ssl.SSLError)
        reason = getattr(plain, "reason", None)
        if reason == "WRONG_VERSION_NUMBER" and config.verifies_tls(host):
            # It answered our TLS hello in plain text: a plain-HTTP registry. (An
            # insecure host's decision is forgotten below, and the retry probes.)
            raise RegistryError(
                f"{host}: does not speak TLS ({reason}); plain HTTP is used "
                f"only for insecure registries",
                hint=f"mark it with --insecure-registry {host} if that is what it is",
                api_hint=_SERVER_SETTING,
            ) from exc
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            schemes.forget(host)
        if isinstance(exc, httpx.ConnectTimeout):
            raise TransientError(
                f"{host}: connect timed out after {config.connect_timeout:g} s "
                f"while fetching {subject}",
                hint="--connect-timeout S to wait longer",
            ) from exc
        if isinstance(exc, TooSlow):
            raise TransientError(
                f"{host}: too slow: {exc} while fetching {subject} "
                f"(--low-speed-limit BYTES and --low-speed-time S set the limit)"
            ) from exc
        if isinstance(exc, httpx.ReadTimeout):
            raise TransientError(
                f"{host}: read timed out: nothing received for "
                f"{config.read_timeout:g} s while fetching {subject}",
                hint="--read-timeout S to wait longer",
            ) from exc
        what = type(exc).__name__
        raise TransientError(
            f"{host}: {what} while fetching {subject}: {exc or 'no detail'}"
        ) from exc


def retrying(call: Callable[[], T], config: RegistryConfig, deadline: float | None = None) -> T:
    """Run ``call``, retrying ``TransientError`` with backoff; nothing else is retried.

    No attempt starts after ``deadline`` (``time.monotonic()``), if given.
    """
    attempts = max(1, config.max_attempts)
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except TransientError as exc:
            delay = backoff(attempt, config)
            if attempt == attempts or (
                deadline is not None and time.monotonic() + delay >= deadline
            ):
                raise TransientError(
                    f"{exc.detail} (gave up after {attempt} attempts)",
                    exc.status,
                    exc.codes,
                    hint=exc.hint,
                    api_hint=exc.api_hint,
                ) from exc
            log.info("%s; retrying in %.1f s (%d/%d)", exc, delay, attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def backoff(attempt: int, config: RegistryConfig) -> float:
    """Full-jitter exponential backoff (the AWS architecture blog's variant)."""
    ceiling = min(config.backoff_max, config.backoff_base * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``'s cause/context chain (httpx wraps httpcore)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None

"""A registry's HTTP error responses, turned into the exception tree; what its answers name.

The Distribution spec (``spec.md#error-codes``) sends failures as
``{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "...", "detail": ...}]}``;
the class is chosen by status and code, never by the message text.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time

import httpx

from hypeman_images.errors import (
    HypemanError,
    NotFound,
    RateLimited,
    RegistryError,
    TransientError,
)
from hypeman_images.oci.wire import load_json

log = logging.getLogger(__name__)

# Error bodies are small; don't let a hostile one fill memory.
MAX_ERROR_BODY = 64 * 1024
NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})


def read_capped(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
    """Up to ``limit`` bytes of the body; the connection is released after."""
    data = bytearray()
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= limit:
                break
    except httpx.HTTPError:
        pass  # the status already says what happened; the body is a courtesy
    finally:
        response.close()
    return bytes(data[:limit])


def error_details(body: bytes) -> tuple[tuple[str, ...], str]:
    """The ``errors[].code`` values and a joined human message from an error body."""
    try:
        doc = load_json(body)
        errors = doc.get("errors") if isinstance(doc, dict) else None
    except ValueError:
        errors = None
    if not isinstance(errors, list):
        return (), _printable(body.decode("utf-8", "replace"))
    codes: list[str] = []
    messages: list[str] = []
    for item in errors:
        if not isinstance(item, dict):
            continue
        code = str(item.get("code") or "")
        if code:
            codes.append(code)
        message = str(item.get("message") or code)
        if message:
            messages.append(message)
    return tuple(codes[:MAX_CODES]), _printable("; ".join(messages))


# A registry's error text ends up in metadata.json, API answers and terminals:
# keep it short and free of control characters (an untrusted registry writes it).
MAX_MESSAGE = 200
MAX_CODES = 8


def _printable(text: str) -> str:
    clean = "".join(c if c.isprintable() else " " for c in text.strip())
    return clean if len(clean) <= MAX_MESSAGE else clean[: MAX_MESSAGE - 1] + "…"


def named_url(value: str, what: str, base: httpx.URL | None = None) -> httpx.URL:
    """A URL a registry's answer names (an upload's ``Location``, a ``Link``, an auth
    challenge's realm), resolved against ``base``; :class:`RegistryError` if it is none."""
    try:
        return base.join(value) if base is not None else httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise RegistryError(f"{what} is {value[:200]!r}, which is not a URL ({exc})") from None


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), if present."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "1e999", "inf" and "nan" are floats too, and no delay to wait or repeat
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def log_rate_limit(response: httpx.Response, host: str) -> None:
    """Log Docker Hub's ``RateLimit-Limit``/``RateLimit-Remaining`` at debug level."""
    limit = response.headers.get("RateLimit-Limit")
    remaining = response.headers.get("RateLimit-Remaining")
    if limit or remaining:
        log.debug("%s rate limit: limit=%s remaining=%s", host, limit, remaining)


def error_for(response: httpx.Response, *, host: str, subject: str) -> HypemanError:
    """The exception for a failed response (not 401/403: auth decides those).

    ``subject`` names what was asked for ("manifest docker.io/library/alpine:3.20").
    The body is read (capped) and the response closed.
    """
    status = response.status_code
    body = read_capped(response)
    codes, message = error_details(body)
    detail = f": {message}" if message else ""
    if status == 404 or NOT_FOUND_CODES.intersection(codes):
        return NotFound(f"{subject} not found on {host}{detail}")
    if status == 429:
        wait = retry_after(response)
        hint = f"retry after {wait:.0f} s" if wait is not None else "retry later"
        return RateLimited(
            f"{host} is rate limiting requests (HTTP 429) while fetching {subject}; {hint}"
            f"{detail.rstrip('.')}",
            retry_after=wait,
            hint="log in with hypeman-images login, or use a mirror, to raise the limit",
            api_hint="credentials in the request, or a mirror in the server's registries.conf, "
            "raise the limit",
        )
    if status >= 500:
        return TransientError(
            f"{host} failed with HTTP {status} while fetching {subject}{detail}", status, codes
        )
    return RegistryError(
        f"{host} answered HTTP {status} while fetching {subject}{detail}", status, codes
    )

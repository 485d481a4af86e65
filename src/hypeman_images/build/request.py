"""What one ``create``/``pull`` asks for besides the name: platform, labels, credentials.

hypeman's ``CreateImageRequest`` (its OpenAPI document, ``Tags`` and
``PushCredentials``) fixes the shapes:

* **labels** (hypeman calls them ``tags``): at most 50 pairs, keys of 1 to
  128 and values of up to 256 characters from ``A-Za-z0-9 _.:/=+@-``; they
  are stored in the image's record, and given again they replace it.
* **credentials**: borrowed for this one pull. They stay in memory (the
  :class:`ImageRequest` and the registry client made for the build, which is
  dropped when the build ends), never in a record, a log line or an error
  message; an empty set means "none", and the server's own sources answer.
* **platform**: ``os/arch[/variant]`` or another form docker accepts
  (:meth:`Platform.parse`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from hypeman_images.build.options import BuildOptions
from hypeman_images.errors import InvalidArgument
from hypeman_images.oci.spec import Platform

if TYPE_CHECKING:
    from hypeman_images.registry.credentials import Credential

MAX_LABELS = 50
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256
_LABEL_TEXT = re.compile(r"[A-Za-z0-9 _.:/=+@-]*")


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` as a plain dict if hypeman's ``Tags`` schema admits them; else InvalidArgument."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} tags: at most {MAX_LABELS} are allowed")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument("tag keys and values must be strings")
        if not 1 <= len(key) <= MAX_KEY_CHARS or not _LABEL_TEXT.fullmatch(key):
            raise InvalidArgument(
                f"invalid tag key {key!r}: 1 to {MAX_KEY_CHARS} characters of "
                "letters, digits, space and _.:/=+@-"
            )
        if len(value) > MAX_VALUE_CHARS or not _LABEL_TEXT.fullmatch(value):
            raise InvalidArgument(
                f"invalid value for tag {key!r}: up to {MAX_VALUE_CHARS} characters of "
                "letters, digits, space and _.:/=+@-"
            )
    return dict(labels)


def labels_match(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """True if every wanted pair is among ``labels`` (hypeman's filter: all must match)."""
    return all(labels.get(key) == value for key, value in wanted.items())


@dataclass(frozen=True)
class ImageRequest:
    """One request's build options, labels (None: leave them) and borrowed credential."""

    options: BuildOptions
    labels: dict[str, str] | None = None
    credential: Credential | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> bytes:
        """Tells two requests' credentials apart without keeping them in a readable form.

        Requests for one digest share one build only if their fingerprints are
        equal (hypeman answers 409 to a second pull "in flight with different
        credentials"); b"" for none.
        """
        credential = self.credential
        if credential is None:
            return b""
        parts = (credential.username, credential.password, credential.registry_token)
        return hashlib.sha256("\0".join(parts).encode()).digest()


def image_request(
    options: BuildOptions,
    *,
    platform: Platform | str | None = None,
    labels: Mapping[str, str] | None = None,
    credentials: Credential | None = None,
) -> ImageRequest:
    """Check what a caller gave and make the :class:`ImageRequest` of it.

    A platform given as text is parsed as docker parses ``--platform``
    (:class:`InvalidPlatform` if it does not parse); it replaces the options'.
    """
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    if platform is not None:
        options = replace(options, platform=platform)
    checked = check_labels(labels) if labels is not None else None
    if credentials is not None and credentials.empty:
        credentials = None
    if credentials is not None and not credentials.borrowed:
        credentials = replace(credentials, borrowed=True, origin="")
    return ImageRequest(options, checked, credentials)


__all__ = [
    "MAX_LABELS",
    "ImageRequest",
    "check_labels",
    "image_request",
    "labels_match",
]

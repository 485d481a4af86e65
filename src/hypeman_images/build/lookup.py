"""Naming a local image by its ID: a digest, or a unique prefix of one.

Besides a reference (``alpine:3.20``, ``repo@sha256:…``), a local image may
be named as docker names one:

* ``sha256:<64 hex>``: the image whose platform manifest has that digest;
* ``<hex>`` or ``sha256:<hex>`` of at least :data:`MIN_ID_CHARS` digits: the
  image whose digest starts so (the ID ``list`` shows is the first 12).

A bare hex string is also a valid repository name; as docker does, a local
reference of that name wins, and the ID is tried only when there is none.
A prefix that several images share is refused with the matches named;
one digest stored in several repositories (:meth:`ImageManager.tag` across
repositories) is several images.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

from hypeman_images.build.records import find_image
from hypeman_images.errors import HypemanError, InvalidArgument, NotFound
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.store.images import ImageStore, StoredImage

MIN_ID_CHARS = 12
_ID = re.compile(rf"(sha256:)?([0-9a-f]{{{MIN_ID_CHARS},64}})")


def image_id(text: str) -> tuple[str, bool] | None:
    """``(hex prefix, explicit)`` if ``text`` can name an image by ID, else None.

    ``explicit``: it says ``sha256:``, so it is not a repository name too.
    """
    match = _ID.fullmatch(text)
    if match is None:
        return None
    return match[2], match[1] is not None


def local_reference(
    store: ImageStore, name: str | Reference, building: Callable[[Reference], bool]
) -> Reference:
    """The reference ``name`` gives: parsed, or the image whose ID it is.

    ``building`` says whether a build in progress answers a reference (a local
    image as much as a stored one).
    """
    if isinstance(name, Reference):
        return name
    found = image_id(name)
    if found is None:
        return parse_reference(name)
    prefix, explicit = found
    if not explicit:
        # A bare hex string is a repository name too; as docker, a local one wins.
        with contextlib.suppress(HypemanError):
            ref = parse_reference(name)
            if not building(ref):
                find_image(store, ref)
            return ref
    return find_by_id(store, prefix)


def find_by_id(store: ImageStore, prefix: str) -> Reference:
    """The ``repository@digest`` reference of the one image whose digest starts with ``prefix``.

    :class:`NotFound` if none does; :class:`InvalidArgument` naming the
    matches if several do.
    """
    matches: dict[str, StoredImage] = {}
    for stored in store.scan():
        digest = stored.record.digest
        if stored.directory.name.startswith(prefix) and digest.startswith("sha256:"):
            matches.setdefault(f"{stored.repository}@{digest}", stored)
    if not matches:
        raise NotFound(
            f"no local image has an ID starting with {prefix}",
            hint="hypeman-images list shows them",
            api_hint="GET /images lists them",
        )
    if len(matches) > 1:
        names = ", ".join(sorted(matches))
        digests = {name.partition("@")[2] for name in matches}
        advice = "name one of them" if len(digests) == 1 else "give more of it or a name"
        raise InvalidArgument(f"image ID {prefix} is ambiguous: it names {names}; {advice}")
    return parse_reference(next(iter(matches)))


__all__ = ["MIN_ID_CHARS", "find_by_id", "image_id", "local_reference"]

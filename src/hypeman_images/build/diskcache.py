"""The disk cache in a build: a verified disk fetched instead of built.

Before its pull, under the digest's build lock (:func:`pipeline.build_resolved`),
a build whose options name a disk cache looks there (:func:`fetch_cached`) for
an artifact of the recipe a local build would use (:func:`planned_recipes`):
the same source, builder, free space and e2fsprogs release, and the build path
predicted from the manifest and the tools as :class:`convert.Conversion` will
choose it. A found artifact is fetched beside the disk's destination and
verified there (:func:`fleet.fetch.fetch_disk`: every digest, the bomb bound,
the disk's sha256, ``e2fsck -fn``); its run-time fields must be the image
config's own, read from the registry as for a build (a few KiB; no layer is
downloaded). The disk is then renamed into place as a built one is, and the
record returned says where it came from (``source: disk-cache``).

Any failure (a registry that refuses or is down, an artifact that fails a
check) is one warning line and a local build, counted by its error's code in
:class:`BuildStats`; only ``disk pull`` (a cache ``required``) fails instead.
A disk built here records its recipe (:func:`built_fields`), which is what
:mod:`.diskpush` pushes it under (:func:`recorded_recipe`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypeman_images import __version__
from hypeman_images.build.oneplan import one_pass_candidate
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats, with_config
from hypeman_images.build.progress import Reporter
from hypeman_images.build.pull import PulledImage, ResolvedImage, fetch_config
from hypeman_images.disk.check import superblock_counts
from hypeman_images.disk.e2fsprogs import TOOLS_FILE, E2fsprogs, find_e2fsprogs
from hypeman_images.disk.fsck_erofs import FsckErofs, find_fsck_erofs
from hypeman_images.disk.sizing import BLOCK_SIZE
from hypeman_images.errors import (
    DiskArtifactInvalid,
    HypemanError,
    InvalidArgument,
    NotFound,
    ToolError,
)
from hypeman_images.fleet.cache import DiskCache
from hypeman_images.fleet.config import Runtime
from hypeman_images.fleet.fetch import FetchedDisk, fetch_disk
from hypeman_images.fleet.lookup import FoundDisk, find_disk
from hypeman_images.fleet.recipe import DiskFormat, Recipe
from hypeman_images.fsutil import TEMP_PREFIX, storage_error, writer_alive
from hypeman_images.layers.limits import Limits
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import Descriptor
from hypeman_images.registry.client import RegistryClient
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.record import ImageRecord, ImageStatus

log = logging.getLogger(__name__)

# The code that flattens layers: a disk of another release is another recipe.
BUILDER = f"hypeman-images {__version__}"
# mke2fs without `-d -` stages the tree (disk/fallback.py): other bytes, same tree.
STAGED = {"fallback": "staged"}
# A disk holds its content, mke2fs's metadata (under a sixteenth: pipeline.py)
# and the free space asked for; a fetched one may be no larger.
_METADATA_SHARE = 16
SOURCE_BUILD = "build"
SOURCE_CACHE = "disk-cache"


def built_fields(one_pass: bool, fallback_used: bool) -> dict[str, Any]:
    """The ready record's fields for a disk built here: its recipe (with the digest, the
    tools and the free space recorded already) and its source."""
    return {
        "builder": BUILDER,
        "one_pass": one_pass,
        "disk_options": dict(STAGED) if fallback_used else {},
        "source": SOURCE_BUILD,
        "source_artifact": None,
        "source_repository": None,
    }


def erofs_recipe(source: Digest, builder: str = BUILDER) -> Recipe:
    """The recipe of an EROFS disk of ``source``: our writer alone decides its bytes.

    The writer (``builder``) lays the tree out seeded by the image digest, so
    the same image and release give the same disk; no e2fsprogs release, build
    path, free space (a read-only image has none) or option enters it, and
    those fields are fixed (``""``, two passes, 0, none) so that every host
    asks for the same recipe.
    """
    return Recipe(
        source=source,
        format=DiskFormat.EROFS,
        builder=builder,
        e2fsprogs="",
        one_pass=False,
        free_space=0,
        options={},
    )


def recorded_recipe(record: ImageRecord) -> Recipe:
    """The recipe a ready record says its disk was made by.

    :class:`InvalidArgument` for a record that does not say (one written
    before disks were shared): its disk is not pushed under a guessed recipe.
    """
    e2fsprogs = record.tool_versions.get("e2fsprogs")
    free_space = record.free_space_bytes
    ext4 = record.format is DiskFormat.EXT4
    if record.builder is None or (ext4 and (record.one_pass is None or e2fsprogs is None)):
        raise InvalidArgument(
            f"the record of {record.name} does not say how its disk was built (it predates "
            "the disk cache); remove the image and pull it again to share it"
        )
    if not ext4:
        return erofs_recipe(Digest.parse(record.digest), record.builder)
    assert record.one_pass is not None and e2fsprogs is not None
    return Recipe(
        source=Digest.parse(record.digest),
        format=DiskFormat.EXT4,
        builder=record.builder,
        e2fsprogs=e2fsprogs,
        one_pass=record.one_pass,
        free_space=free_space if free_space is not None else 0,
        options=dict(record.disk_options),
    )


def planned_recipes(
    resolved: ResolvedImage, options: BuildOptions, limits: Limits, tools: E2fsprogs | None
) -> list[Recipe]:
    """The recipes whose disk this build takes, best first.

    EROFS: :func:`erofs_recipe`. ext4: first the one a local build would use:
    the way :class:`convert.Conversion` picks (:func:`one_pass_candidate` on
    the manifest and ``limits``, an mke2fs that reads tar and a resize2fs). A
    one pass that cannot prove its tree falls back to the two passes, so their
    disk comes second.
    """
    if options.format is DiskFormat.EROFS:
        return [erofs_recipe(resolved.digest)]
    assert tools is not None
    one_pass = bool(
        one_pass_candidate(resolved.manifest.layers, options, limits)
        and tools.tar_input
        and tools.resize2fs
    )
    planned = Recipe(
        source=resolved.digest,
        format=DiskFormat.EXT4,
        builder=BUILDER,
        e2fsprogs=tools.version_text,
        one_pass=one_pass,
        free_space=options.free_space,
        options={} if tools.tar_input else dict(STAGED),
    )
    return [planned, replace(planned, one_pass=False)] if one_pass else [planned]


def subject_of(resolved: ResolvedImage) -> Descriptor:
    """The platform manifest a disk of ``resolved`` is attached to."""
    return Descriptor(resolved.media_type, resolved.digest, len(resolved.manifest_bytes))


def fetch_cached(
    resolved: ResolvedImage,
    *,
    client: RegistryClient,
    blobs: BlobStore,
    dest: Path,
    options: BuildOptions,
    limits: Limits,
    record: ImageRecord,
    publish: Callable[[ImageRecord], None],
    reporter: Reporter,
    stats: BuildStats,
) -> ImageRecord | None:
    """Put the cached disk of ``resolved`` at ``dest``; its ready record, or None to build.

    Call with the digest's build lock held and ``options.disk_cache`` set.
    ``record`` is the build's current one; ``publish`` writes the record that
    says where the disk comes from, before the disk is renamed into place (as
    a build's says ``converting`` before its disk is). Never leaves a temp
    file; raises only for a ``required`` cache (or a bug).
    """
    cache = options.disk_cache
    assert cache is not None and cache.looks
    try:
        found = _fetch(
            resolved, cache, client, blobs, dest, options, limits, record, reporter, stats
        )
        if found is None:
            return None
        fetched, arriving = found
        with fetched:
            blobs.put(subject_of(resolved), resolved.manifest_bytes)
            publish(arriving)
            fetched.commit()
        return arriving.evolve(status=ImageStatus.READY)
    except HypemanError as exc:
        if cache.required:
            raise
        stats.disk_cache, stats.disk_cache_reason = "fallback", exc.code
        log.warning(
            "disk cache %s: %s; building %s here", cache, exc.message, resolved.ref.familiar()
        )
        return None


def _fetch(
    resolved: ResolvedImage,
    cache: DiskCache,
    client: RegistryClient,
    blobs: BlobStore,
    dest: Path,
    options: BuildOptions,
    limits: Limits,
    record: ImageRecord,
    reporter: Reporter,
    stats: BuildStats,
) -> tuple[FetchedDisk, ImageRecord] | None:
    """The verified disk in its temp file, and its record (``converting``, from the cache)."""
    erofs = options.format is DiskFormat.EROFS
    with ThreadPoolExecutor(1, thread_name_prefix="fsck.erofs-probe") as probe:
        # Looked for beside the lookup, as a build looks for it beside the writing
        # (build/erofs.py): a PATH search and `fsck.erofs -V`, tens of ms on a cold host.
        erofs_tool = probe.submit(find_fsck_erofs) if erofs else None
        tools = (
            None
            if erofs
            else find_e2fsprogs(options.mke2fs or "mke2fs", remember=blobs.root / TOOLS_FILE)
        )
        _sweep_temp_disks(dest)
        # The image config, read as a build reads it: the record's run-time fields
        # come from it, never from the artifact, which must agree with it.
        config, config_bytes = fetch_config(client, blobs, resolved)
        expected = with_config(record, PulledImage(resolved, config, config_bytes, 0, 0))
        found = _find(client, cache, planned_recipes(resolved, options, limits, tools))
        checker = _erofs_checker(erofs_tool.result()) if erofs_tool is not None else tools
    assert checker is not None
    if found is None:
        stats.disk_cache = "miss"
        if cache.required:
            raise NotFound(f"{cache} holds no disk of {resolved.ref.familiar()} for this build")
        log.info("disk cache %s: no disk of %s", cache, resolved.ref.familiar())
        return None
    artifact = found.artifact
    if artifact.config.runtime != Runtime.from_record(expected):
        raise DiskArtifactInvalid(
            f"disk artifact {artifact.digest}: its run-time fields contradict the image config"
        )
    reporter.stage("fetching", f"disk {artifact.digest.short} from {cache}")
    bound = limits.max_image_bytes + limits.max_image_bytes // _METADATA_SHARE + options.free_space
    fetched = fetch_disk(client, cache.repository, artifact, dest, checker, max_disk_bytes=bound)
    content_bytes = artifact.config.disk_size  # EROFS: a read-only image has no free space
    if not erofs:
        try:
            counts = superblock_counts(fetched.path)
        except OSError as exc:
            fetched.discard()
            raise storage_error(exc, f"cannot read the fetched disk {fetched.path}") from exc
        content_bytes = (counts["Block count"] - counts["Free blocks"]) * BLOCK_SIZE
    stats.disk_cache = "hit"
    stats.fetched_bytes = sum(chunk.blob.size for chunk in artifact.chunks)
    recipe = artifact.config.recipe
    return fetched, expected.evolve(
        status=ImageStatus.CONVERTING,
        error=None,
        size_bytes=artifact.config.disk_size,
        content_bytes=content_bytes,
        disk_sha256=str(fetched.sha256),
        tool_versions=_tool_versions(recipe),
        builder=recipe.builder,
        one_pass=recipe.one_pass,
        disk_options=dict(recipe.options),
        source=SOURCE_CACHE,
        source_artifact=str(artifact.digest),
        source_repository=cache.repository.name,
    )


def _erofs_checker(tool: FsckErofs | None) -> FsckErofs:
    """``fsck.erofs`` (``tool``, as found), without which an EROFS disk from the cache is
    not taken."""
    if tool is None:
        raise ToolError(
            "fsck.erofs not found: an EROFS disk from the disk cache is checked with it "
            "before use; install erofs-utils"
        )
    return tool


def _tool_versions(recipe: Recipe) -> dict[str, str]:
    """What the record of a fetched disk says made it, as a build's record would."""
    if recipe.format is DiskFormat.EXT4:
        return {"e2fsprogs": recipe.e2fsprogs}
    name, _, version = recipe.builder.partition(" ")
    return {"hypeman-images": version} if name == "hypeman-images" else {"builder": recipe.builder}


def _find(client: RegistryClient, cache: DiskCache, recipes: list[Recipe]) -> FoundDisk | None:
    for recipe in recipes:
        found = find_disk(client, cache.repository, recipe)
        if found is not None:
            return found
    return None


def _sweep_temp_disks(dest: Path) -> None:
    """Remove the temp disks dead fetches left beside ``dest`` (its build lock is ours)."""
    try:
        for entry in dest.parent.glob(f"{TEMP_PREFIX}{dest.name}.*"):
            if not writer_alive(entry.name):
                entry.unlink(missing_ok=True)
    except OSError as exc:
        raise storage_error(exc, f"cannot clean {dest.parent}") from exc


__all__ = [
    "BUILDER",
    "SOURCE_BUILD",
    "SOURCE_CACHE",
    "built_fields",
    "erofs_recipe",
    "fetch_cached",
    "planned_recipes",
    "recorded_recipe",
    "subject_of",
]

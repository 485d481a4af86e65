"""The image store: built disks and their metadata, on disk, no database.

Layout under the data dir (docs/design.md, "On-disk layout")::

    images/<registry>/<repository>/<digest-hex>/rootfs.ext4
    images/<registry>/<repository>/<digest-hex>/metadata.json
    images/<registry>/<repository>/<tag> -> <digest-hex>

``metadata.json`` is the record of a build at every stage; it says ``ready``
only after ``rootfs.ext4`` has been renamed into place. An EROFS disk of the
same digest has its own pair, ``rootfs.erofs`` and ``metadata.erofs.json``
(:mod:`~hypeman_images.store.formats`). A tag link is swapped
by rename, and only ever points at a ready build. State is rebuilt by
scanning, so a crash leaves nothing that the next start cannot understand.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from hypeman_images.errors import InvalidReference, NotFound, StorageError
from hypeman_images.fsutil import (
    FILE_MODE,
    TEMP_PREFIX,
    atomic_writer,
    discard,
    own_directory,
    process_id,
    replace_symlink,
    storage_error,
    temp_name,
    writer_alive,
)
from hypeman_images.oci.digest import SHA256_HEX, Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import Platform
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.record import ImageRecord, ImageStatus, now

log = logging.getLogger(__name__)

DISK_NAME = DiskFormat.EXT4.disk_name
METADATA_NAME = DiskFormat.EXT4.metadata_name
LOCK_NAME = ".lock"
DELETING_PREFIX = ".deleting-"
# Beside ``images/`` in the data dir: what recovery could neither use nor remove.
QUARANTINE_NAME = "quarantine"


@dataclass(frozen=True)
class StoredImage:
    """A record found on disk, with where it lives and which tags point at it."""

    record: ImageRecord
    repository: str
    directory: Path
    tags: tuple[str, ...]

    @property
    def disk(self) -> Path:
        """The record's disk (exists only when the record is ready)."""
        return self.directory / self.record.format.disk_name


class ImageStore:
    """Image records under ``<data>/images``."""

    def __init__(
        self, root: Path, *, on_temp_written: Callable[[ImageRecord], None] | None = None
    ) -> None:
        """``on_temp_written`` is called with each record once its temp file is written
        and flushed, before the rename that publishes it (the crash tests' hook)."""
        self.root = root
        self.quarantine = root.parent / QUARANTINE_NAME
        self._on_temp_written = on_temp_written
        self._records = threading.Lock()  # record writes of this process, one at a time
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"cannot create the image store at {root}") from exc
        own_directory(root)  # never a symlink: disks would be written through it

    # Paths. Registry and repository come from a parsed Reference, whose grammar
    # admits no '..', no empty component and no absolute path, so joining is safe.

    def repo_dir(self, ref: Reference) -> Path:
        """``images/<registry>/<repository>``.

        Tags, digest directories and nested repositories share one namespace in
        this layout (``a:b``'s tag link is where repository ``a/b`` would live),
        so a repository whose path runs through a tag link or a digest directory
        is refused rather than stored inside another image (where deleting one
        would delete the other).
        """
        path = self.root / ref.registry
        _not_a_link(path)
        for component in ref.repository.split("/"):
            if SHA256_HEX.fullmatch(component):
                raise InvalidReference(
                    f"repository {ref.name}: a 64-hex-digit path component cannot be stored "
                    "beside digest directories"
                )
            path = path / component
            if path.is_symlink() and SHA256_HEX.fullmatch(os.readlink(path)):
                raise InvalidReference(
                    f"repository {ref.name} collides with the local tag {path.name!r} of "
                    f"{path.parent.relative_to(self.root).as_posix()}; remove that tag first"
                )
            _not_a_link(path)
        return path

    def digest_dir(self, ref: Reference, digest: Digest) -> Path:
        """``images/<registry>/<repository>/<digest-hex>``."""
        path = self.repo_dir(ref) / digest.encoded
        _not_a_link(path)
        return path

    def _tag_link(self, ref: Reference) -> Path:
        assert ref.tag is not None
        if SHA256_HEX.fullmatch(ref.tag):
            raise InvalidReference(
                f"tag {ref.tag!r} looks like a digest; the store cannot tell them apart"
            )
        link = self.repo_dir(ref) / ref.tag
        if link.is_dir() and not link.is_symlink():
            raise InvalidReference(
                f"tag {ref.tag!r} of {ref.name} collides with the local repository "
                f"{ref.name}/{ref.tag}; remove that repository's images first"
            )
        return link

    def validate(self, ref: Reference) -> None:
        """Refuse, before any network call, a name this layout cannot store."""
        self.repo_dir(ref)
        if ref.tag is not None:
            self._tag_link(ref)

    # Records.

    def read(
        self, ref: Reference, digest: Digest, fmt: DiskFormat = DiskFormat.EXT4
    ) -> ImageRecord | None:
        """The record of ``digest``'s ``fmt`` disk in ``ref``'s repository, if any."""
        return read_record(self.digest_dir(ref, digest), fmt)

    def write(
        self, ref: Reference, digest: Digest, record: ImageRecord, *, keep_pending: bool = True
    ) -> ImageRecord:
        """Publish ``record`` atomically (temp + fsync + rename).

        What requests own is kept from the record on disk (unless not
        ``keep_pending``): the tags it lists in ``pending_tags`` and its labels
        (``tags``), which :meth:`update` may have changed while the writer's
        copy (a build's) was being made. Returns the record written.
        """
        with self._records:
            current = self.read(ref, digest, record.format) if keep_pending else None
            if current is not None:
                extra = [t for t in current.pending_tags if t not in record.pending_tags]
                if extra:
                    record = record.evolve(pending_tags=[*record.pending_tags, *extra])
                if current.tags != record.tags:
                    record = replace(record, tags=current.tags)
            self._publish(ref, digest, record)
            return record

    def update(
        self,
        ref: Reference,
        digest: Digest,
        change: Callable[[ImageRecord], ImageRecord],
        fmt: DiskFormat = DiskFormat.EXT4,
    ) -> ImageRecord | None:
        """Rewrite the record as ``change`` makes it, none writing between; None if absent."""
        with self._records:
            current = self.read(ref, digest, fmt)
            if current is None:
                return None
            record = change(current)
            if record != current:
                self._publish(ref, digest, record)
            return record

    def _publish(self, ref: Reference, digest: Digest, record: ImageRecord) -> None:
        directory = self.digest_dir(ref, digest)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"cannot create {directory}") from exc
        writer = process_id() if record.status.active else None
        if record.writer != writer:
            record = replace(record, writer=writer)
        with atomic_writer(directory / record.format.metadata_name) as handle:
            handle.write(record.to_json())
            if self._on_temp_written is not None:
                handle.flush()
                self._on_temp_written(record)

    @contextlib.contextmanager
    def lock(self, ref: Reference, digest: Digest) -> Iterator[None]:
        """Hold the build lock of one digest: one build per digest across processes."""
        directory = self.digest_dir(ref, digest)
        while True:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(
                    directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
                )
            except OSError as exc:
                raise storage_error(exc, f"cannot lock {directory}") from exc
            with open(fd, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                # A delete or gc may have renamed the directory away while we waited:
                # then we hold a lock nobody else can see; take the new one instead.
                if not _same_file(handle.fileno(), directory / LOCK_NAME):
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                return

    # Tags.

    def set_tag(self, ref: Reference, digest: Digest) -> None:
        """Point ``ref``'s tag at a ready digest, by rename."""
        if ref.tag is None:
            return
        replace_symlink(self._tag_link(ref), digest.encoded)

    def tag_target(self, ref: Reference) -> Digest | None:
        """The digest a local tag points at."""
        if ref.tag is None:
            return None
        try:
            target = os.readlink(self._tag_link(ref))
        except (FileNotFoundError, OSError):
            return None
        return Digest("sha256", target) if SHA256_HEX.fullmatch(target) else None

    # Lookup.

    def locate(self, ref: Reference, digest: Digest) -> Digest:
        """The build directory's digest for ``digest``, which may name an image index.

        Users pin images by whatever digest ``docker pull`` printed, often an
        index's; builds are keyed by the platform manifest's. Among builds of
        that index, the host platform's wins.
        """
        if read_records(self.digest_dir(ref, digest)):
            return digest
        repo, host = self.repo_dir(ref), str(Platform.host())
        names: list[str] = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            names = os.listdir(repo)
        matches = []
        for name in names:
            for record in read_records(repo / name) if SHA256_HEX.fullmatch(name) else []:
                if record.index_digest == str(digest):
                    matches.append((record.platform != host, name))
        return Digest("sha256", min(matches)[1]) if matches else digest

    def find(self, ref: Reference, fmt: DiskFormat | None = None) -> StoredImage:
        """The image a reference names (by digest, else tag), ``fmt``'s record (None:
        :func:`preferred`); NotFound otherwise."""
        digest = self.locate(ref, ref.digest) if ref.digest else self.tag_target(ref)
        if digest is not None:
            directory = self.digest_dir(ref, digest)
            record = read_record(directory, fmt) if fmt else preferred(read_records(directory))
            if record is not None:
                return self._stored(ref, digest, record)
        name = ref.familiar() + (f" as {fmt}" if fmt else "")
        raise NotFound(
            f"no local image {name}",
            hint="pull it first: hypeman-images pull",
            api_hint="create it first: POST /images",
        )

    def _stored(self, ref: Reference, digest: Digest, record: ImageRecord) -> StoredImage:
        directory = self.digest_dir(ref, digest)
        return StoredImage(record, ref.name, directory, self._tags_of(directory))

    def _tags_of(self, directory: Path) -> tuple[str, ...]:
        tags = []
        for entry in directory.parent.iterdir():
            if entry.is_symlink() and os.readlink(entry) == directory.name:
                tags.append(entry.name)
        return tuple(sorted(tags))

    def scan(self) -> Iterator[StoredImage]:
        """Every record in the store, found by walking the digest directories."""
        for directory in digest_dirs(self.root):
            repository = directory.parent.relative_to(self.root).as_posix()
            # One per disk format; none if no record yet (a build just started), just
            # deleted, or unreadable.
            for record in read_records(directory):
                yield StoredImage(record, repository, directory, self._tags_of(directory))

    # Removal.

    def remove(self, ref: Reference) -> list[str]:
        """Delete by tag (the digest goes when no tag is left) or by digest (all its tags).

        Returns the names removed. Directories vanish by rename before deletion,
        so a reader never sees a half-deleted build.
        """
        stored = self.find(ref)
        removed: list[str] = []
        if ref.digest is None:
            link = self._tag_link(ref)
            link.unlink(missing_ok=True)
            removed.append(str(ref.with_tag(ref.tag)))
            if self._tags_of(stored.directory):
                return removed
        else:
            for tag in stored.tags:
                (stored.directory.parent / tag).unlink(missing_ok=True)
                removed.append(f"{stored.repository}:{tag}")
        self.remove_directory(stored.directory)
        removed.append(f"{stored.repository}@{stored.record.digest}")
        return removed

    def remove_directory(self, directory: Path) -> int:
        """Make a digest directory vanish atomically, then delete it; return bytes freed.

        What cannot be deleted is logged and left under its ``.deleting-`` name
        for the next :meth:`sweep`.
        """
        doomed = directory.with_name(f"{DELETING_PREFIX}{temp_name(directory).name}")
        try:
            os.replace(directory, doomed)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise storage_error(exc, f"cannot remove {directory}") from exc
        return discard(doomed, None, "")

    def sweep(self) -> int:
        """Remove leftovers of interrupted work: temp files, half-deleted directories.

        Returns bytes freed. Only files whose writer is gone are touched; one
        that cannot be removed goes to the quarantine. The walk never enters a
        leftover or a digest directory's subdirectories: a leftover may be a
        staged tree of any depth (docs/security.md, "Deep trees and leftovers").
        """
        freed = 0
        for top, dirs, files in os.walk(self.root):
            for name in [*dirs, *files]:
                if not name.startswith((TEMP_PREFIX, DELETING_PREFIX)) or writer_alive(name):
                    continue
                path = Path(top) / name
                freed += discard(path, self.quarantine, path.relative_to(self.root).as_posix())
            inside_build = SHA256_HEX.fullmatch(os.path.basename(top)) is not None
            dirs[:] = [
                d
                for d in dirs
                if not inside_build and not d.startswith((TEMP_PREFIX, DELETING_PREFIX))
            ]
        return freed


def read_record(directory: Path, fmt: DiskFormat = DiskFormat.EXT4) -> ImageRecord | None:
    """The ``fmt`` record in a digest directory; None when there is none or it is unreadable."""
    path = directory / fmt.metadata_name
    try:
        return ImageRecord.from_json(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def read_records(directory: Path) -> list[ImageRecord]:
    """Every readable record in a digest directory, one per disk format, ext4 first."""
    return [r for f in DiskFormat if (r := read_record(directory, f)) is not None]


def preferred(records: list[ImageRecord]) -> ImageRecord | None:
    """The record a name without a format means: the first ready one, else the first."""
    candidates = [r for r in records if r.status is ImageStatus.READY] or records
    return candidates[0] if candidates else None


def digest_dirs(root: Path) -> Iterator[Path]:
    """Every build directory under the image store ``root``, in sorted order.

    ``os.walk`` skips what vanishes mid-walk (a delete or gc running beside
    it), and never descends into temp, half-deleted or digest directories.
    """
    for top, dirs, _ in os.walk(root):
        dirs.sort()
        keep = []
        for name in dirs:
            if name.startswith((TEMP_PREFIX, DELETING_PREFIX)):
                continue
            path = Path(top) / name
            if path.is_symlink():
                continue
            if SHA256_HEX.fullmatch(name):
                yield path
            else:
                keep.append(name)
        dirs[:] = keep


def _not_a_link(path: Path) -> None:
    """Refuse a symlink where the layout has a directory (docs/security.md, "Symlinks in the
    data dir"); a missing one is made later, by ``mkdir``, as a real directory."""
    if path.is_symlink():
        raise StorageError(
            f"{path} is a symlink; the image store does not follow links in its own "
            "directories (disks would land outside the data dir): replace it with a directory"
        )


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


__all__ = [
    "ImageRecord",
    "ImageStatus",
    "ImageStore",
    "StoredImage",
    "digest_dirs",
    "now",
    "preferred",
    "read_record",
    "read_records",
]

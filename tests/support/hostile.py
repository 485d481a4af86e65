"""The hostile image corpus, and the checks that a data dir survived it.

Each :class:`HostileCase` is a real image (blobs and manifest) meant for the
test registry, built to attack one part of the pipeline: path traversal in
names and link targets, symlinks that point outside, decompression bombs,
entry floods, tar headers that lie, corrupt compressed streams, oversized or
malformed manifests and configs. A case either names the error the build must
fail with (class and a pattern its message must match) or, for attacks the
flattener neutralises by design (``..`` is clamped at the image root, as
umoci and containerd do), expects a successful build that stays contained.

Documents a real registry refuses to store (malformed digests, oversized
manifests) are served by the fault proxy in front of it (``served``).

The second half holds the checks: :func:`store_problems` (every ready image
has a valid disk, tags point only at ready builds, no temp files, every cached
blob matches its digest) and :func:`unexpected_paths` (the data dir holds only
the layout docs/design.md describes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zstandard

from hypeman_images.errors import DigestMismatch, HypemanError, LayerError, LimitExceeded
from hypeman_images.layers.limits import Limits

from .images import OCI_MANIFEST, Image, Layer, make_image, make_layer, sha256_digest
from .push import push_blob, push_image
from .tar import BLOCK, TarEntry, build_tar, directory, file, hardlink, symlink

MiB = 1 << 20
HEX64 = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class HostileCase:
    """One attack: the image, and what the pipeline must do with it.

    ``error`` is ``None`` when the build must succeed, contained. ``stage`` is
    ``"build"`` when the failure comes after the manifest is resolved (so the
    digest's metadata.json must say failed), ``"resolve"`` when the manifest
    itself is refused (nothing may be recorded). ``served`` maps a path
    fragment of a request to a raw body the fault proxy answers instead of the
    registry (manifests a registry would not store).
    """

    name: str
    image: Image
    error: type[HypemanError] | None
    says: str
    stage: str = "build"
    limits: Limits = field(default_factory=Limits)
    served: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)
    check: Callable[[Path], None] | None = None  # extra check of a successful disk

    @property
    def manifest_digest(self) -> str:
        """The digest of the manifest the client gets (the served one, if any)."""
        served = self.served.get("/manifests/")
        return sha256_digest(served[0]) if served else self.image.manifest_digest

    def push(self, registry_url: str, repo: str, tag: str) -> None:
        """Put the image in the registry (blobs only, if the proxy serves its manifest)."""
        if self.served:
            for blob in self.image.blobs.values():
                push_blob(registry_url, repo, blob)
        else:
            push_image(registry_url, repo, tag, self.image)


# -- raw tar surgery ---------------------------------------------------------------------


def _checksum(header: bytes) -> bytes:
    blank = header[:148] + b" " * 8 + header[156:]
    return header[:148] + b"%06o\0 " % sum(blank) + header[156:]


def lie_about_size(tar: bytes, member: int, size_field: bytes) -> bytes:
    """Rewrite the size field of the ``member``-th header (0-based, data-less tar walk)."""
    offset, seen = 0, 0
    while offset < len(tar):
        header = tar[offset : offset + BLOCK]
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        if seen == member:
            patched = header[:124] + size_field.ljust(12, b"\0")[:12] + header[136:]
            return tar[:offset] + _checksum(patched) + tar[offset + BLOCK :]
        seen += 1
        offset += BLOCK + size + (-size % BLOCK)
    raise ValueError(f"no member {member}")


def _layer_of(tar: bytes, blob: bytes, media_type: str) -> Layer:
    return Layer(blob, tar, media_type)


def _gzip(tar: bytes) -> bytes:
    return gzip.compress(tar, compresslevel=6, mtime=0)


def _zstd(tar: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(tar)


GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def _base_files() -> list[TarEntry]:
    return [directory("etc"), file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")]


def _zeros_tar(name: str, size: int) -> bytes:
    """A tar of one file of ``size`` zero bytes, built without holding tar + copy twice."""
    entry = file(name, b"")
    header = build_tar([entry])[:BLOCK]
    patched = _checksum(header[:124] + b"%011o\0" % size + header[136:])
    return patched + bytes(size + (-size % BLOCK)) + bytes(2 * BLOCK)


# -- the corpus ----------------------------------------------------------------------------


def traversal_names(canary: Path) -> HostileCase:
    """``../`` and absolute names aimed at a canary dir on the host: clamped inside the disk."""
    rel = str(canary).lstrip("/")
    entries = [
        *_base_files(),
        file("../../../../../../../../../../" + rel + "/pwned-relative", b"x"),
        file("/" + rel + "/pwned-absolute", b"x"),
        file("etc/../../../../../../../../" + rel + "/pwned-dotdot", b"x"),
        file("./../.././" + rel + "/../" + canary.name + "/pwned-dot", b"x"),
        directory("../../../../"),  # the root itself, from outside
    ]

    def check(tree: Path) -> None:
        from .disk import read_disk_tree

        nodes = read_disk_tree(tree)
        for leaf in ("pwned-relative", "pwned-absolute", "pwned-dotdot", "pwned-dot"):
            assert f"/{rel}/{leaf}" in nodes, f"{leaf} should be clamped inside the disk"

    return HostileCase("traversal-names", make_image([make_layer(entries)]), None, "", check=check)


def hardlink_clamped(canary: Path) -> HostileCase:
    """A hard link to ``../../etc/passwd`` links to the *image's* /etc/passwd, never the host's."""
    entries = [*_base_files(), hardlink("evil", "../../../../../../../../etc/passwd")]

    def check(disk: Path) -> None:
        from .disk import read_disk_tree

        nodes = read_disk_tree(disk)
        assert nodes["/evil"].sha256 == nodes["/etc/passwd"].sha256
        assert nodes["/evil"].sha256 == hashlib.sha256(entries[1].content).hexdigest()

    return HostileCase("hardlink-clamped", make_image([make_layer(entries)]), None, "", check=check)


def hardlink_outside(canary: Path) -> HostileCase:
    """A hard link whose target exists only on the host (the canary): refused."""
    target = "../../../../../../../../" + str(canary).lstrip("/") + "/secret"
    entries = [*_base_files(), hardlink("stolen", target)]
    return HostileCase(
        "hardlink-outside",
        make_image([make_layer(entries)]),
        LayerError,
        r"layer 0 \(sha256:[0-9a-f]{64}\), entry \d+ \(b'stolen'\): hard link.*no such",
    )


def _lands_inside(path: str) -> Callable[[Path], None]:
    def check(disk: Path) -> None:
        from .disk import read_disk_tree

        nodes = read_disk_tree(disk)
        assert path in nodes, f"{path} should have landed inside the disk"

    return check


def symlink_write_through(canary: Path) -> HostileCase:
    """``escape -> /canary``, then ``escape/pwned``: resolved in the image (securejoin)."""
    entries = [*_base_files(), symlink("escape", str(canary)), file("escape/pwned", b"x")]
    return HostileCase(
        "symlink-write-through",
        make_image([make_layer(entries)]),
        None,
        "",
        check=_lands_inside(f"{canary}/pwned"),
    )


def symlink_chain_across_layers(canary: Path) -> HostileCase:
    """A chain ``a -> b -> ../../canary`` in one layer, a write via ``a/`` in the next."""
    rel = "../../../../../../../../" + str(canary).lstrip("/")
    lower = make_layer([*_base_files(), symlink("a", "b"), symlink("b", rel)])
    upper = make_layer([file("a/pwned", b"x")])
    return HostileCase(
        "symlink-chain-write",
        make_image([lower, upper]),
        None,
        "",
        check=_lands_inside(f"{canary}/pwned"),
    )


def symlink_loop_write(canary: Path) -> HostileCase:
    """``loop1 -> loop2 -> loop1`` and a file under ``loop1/``: ELOOP, refused."""
    entries = [*_base_files(), symlink("loop1", "loop2"), symlink("loop2", "loop1")]
    upper = make_layer([file("loop1/x", b"x")])
    return HostileCase(
        "symlink-loop-write",
        make_image([make_layer(entries), upper]),
        LayerError,
        r"layer 1 \(sha256:[0-9a-f]{64}\), entry 0 \(b'loop1/x'\).*too many levels of symbolic",
    )


def hardlink_through_symlink(canary: Path) -> HostileCase:
    """A hard link whose target goes through ``escape -> /``: resolves to the image's file."""
    entries = [
        *_base_files(),
        symlink("escape", "../../../../../../"),
        hardlink("evil", "escape/etc/passwd"),
    ]

    def check(disk: Path) -> None:
        from .disk import read_disk_tree

        nodes = read_disk_tree(disk)
        assert nodes["/evil"].sha256 == nodes["/etc/passwd"].sha256

    return HostileCase(
        "hardlink-through-symlink", make_image([make_layer(entries)]), None, "", check=check
    )


def symlink_chain_stored(canary: Path) -> HostileCase:
    """Symlinks pointing outside are data in the disk, kept verbatim, never followed."""
    rel = "../../../../../../../../" + str(canary).lstrip("/")
    entries = [
        *_base_files(),
        symlink("a", "b"),
        symlink("b", "c"),
        symlink("c", rel),
        symlink("abs", str(canary)),
        symlink("loop1", "loop2"),
        symlink("loop2", "loop1"),
    ]

    def check(disk: Path) -> None:
        from .disk import read_disk_tree

        nodes = read_disk_tree(disk)
        assert nodes["/c"].target == rel and nodes["/abs"].target == str(canary)
        assert nodes["/loop1"].target == "loop2"

    return HostileCase(
        "symlink-chain-stored", make_image([make_layer(entries)]), None, "", check=check
    )


def _bomb(name: str, compress: Callable[[bytes], bytes], media_type: str) -> HostileCase:
    """64 MiB of zeros in a layer of a few KiB, against max_layer_bytes = 8 MiB."""
    tar = _zeros_tar("bomb", 64 * MiB)
    layer = _layer_of(tar, compress(tar), media_type)
    return HostileCase(
        name,
        make_image([layer]),
        LimitExceeded,
        r"max_layer_bytes=8388608",
        limits=Limits(max_layer_bytes=8 * MiB),
    )


def gzip_bomb(canary: Path) -> HostileCase:
    """The bomb as gzip (~64 KiB)."""
    return _bomb("gzip-bomb", _gzip, GZIP)


def zstd_bomb(canary: Path) -> HostileCase:
    """The same bomb as zstd (a few KiB)."""
    return _bomb("zstd-bomb", _zstd, ZSTD)


def image_bomb(canary: Path) -> HostileCase:
    """Three layers of 6 MiB each: every layer within its limit, the image over its own."""
    layers = [
        _layer_of(t, _gzip(t), GZIP) for t in (_zeros_tar(f"bomb{i}", 6 * MiB) for i in range(3))
    ]
    return HostileCase(
        "image-bomb",
        make_image(layers),
        LimitExceeded,
        r"max_image_bytes=16777216",
        limits=Limits(max_layer_bytes=8 * MiB, max_image_bytes=16 * MiB),
    )


def entry_flood(canary: Path, count: int = 5000, limit: int = 1000) -> HostileCase:
    """Many tiny entries against a low max_entries."""
    entries = [directory("d")] + [file(f"d/{i}") for i in range(count)]
    return HostileCase(
        "entry-flood",
        make_image([make_layer(entries)]),
        LimitExceeded,
        rf"max_entries={limit}",
        limits=Limits(max_entries=limit),
    )


def pax_flood(canary: Path) -> HostileCase:
    """One PAX header of 2 MiB of xattrs: over max_header_bytes (1 MiB)."""
    xattrs = {f"user.x{i}": b"v" * 1000 for i in range(2048)}
    entries = [*_base_files(), TarEntry("file", b"fat", xattrs=xattrs)]
    return HostileCase(
        "pax-flood",
        make_image([make_layer(entries)]),
        LimitExceeded,
        r"layer 0 \(sha256:[0-9a-f]{64}\), entry \d+: .*max_header_bytes",
    )


def long_path(canary: Path) -> HostileCase:
    """A 6000-byte path (components of 200 bytes), over max_path_bytes (4096)."""
    name = "/".join(["p" * 200] * 30) + "/f"
    entries = [*_base_files(), file(name, b"x")]
    return HostileCase(
        "long-path",
        make_image([make_layer(entries)]),
        LimitExceeded,
        r"layer 0 \(sha256:[0-9a-f]{64}\), entry \d+: .*max_path_bytes",
    )


def _lying(canary: Path, name: str, size_field: bytes, says: str, cut: int = 0) -> HostileCase:
    tar = build_tar([*_base_files(), file("victim", b"A" * 3000), file("after", b"B" * 10)])
    tar = lie_about_size(tar, 2, size_field)
    if cut:
        tar = tar[:cut]
    return HostileCase(name, make_image([_layer_of(tar, _gzip(tar), GZIP)]), LayerError, says)


def header_size_too_big(canary: Path) -> HostileCase:
    """A header claims 1 GiB; the stream ends long before: truncated."""
    return _lying(canary, "tar-size-too-big", b"%011o" % (1 << 30), r"truncated")


def header_size_too_small(canary: Path) -> HostileCase:
    """A header claims 10 bytes of a 3000-byte body: the body is then read as headers."""
    return _lying(canary, "tar-size-too-small", b"%011o" % 10, r"checksum|corrupt")


def header_size_garbage(canary: Path) -> HostileCase:
    """A size field that is not a number."""
    return _lying(canary, "tar-size-garbage", b"12x4!@#", r"size|number|invalid|corrupt")


def header_size_negative(canary: Path) -> HostileCase:
    """A base-256 size field with the sign bit set (a negative size)."""
    return _lying(canary, "tar-size-negative", b"\xff" * 12, r"negative|size")


def _corrupt_stream(
    name: str, compress: Callable[[bytes], bytes], media_type: str, how: str
) -> HostileCase:
    tar = build_tar([*_base_files(), file("data", os.urandom(256 * 1024))])
    blob = compress(tar)
    if how == "truncated":
        blob = blob[: len(blob) // 2]
    else:  # flip bytes in the middle of the compressed data
        mid = len(blob) // 2
        blob = blob[:mid] + bytes(b ^ 0x5A for b in blob[mid : mid + 64]) + blob[mid + 64 :]
    return HostileCase(
        name, make_image([_layer_of(tar, blob, media_type)]), LayerError, r"corrupt or truncated"
    )


def gzip_truncated(canary: Path) -> HostileCase:
    return _corrupt_stream("gzip-truncated", _gzip, GZIP, "truncated")


def gzip_corrupt(canary: Path) -> HostileCase:
    return _corrupt_stream("gzip-corrupt", _gzip, GZIP, "corrupt")


def zstd_truncated(canary: Path) -> HostileCase:
    return _corrupt_stream("zstd-truncated", _zstd, ZSTD, "truncated")


def zstd_corrupt(canary: Path) -> HostileCase:
    """zstd frames carry no checksum by default: the diff_id check is what catches this."""
    case = _corrupt_stream("zstd-corrupt", _zstd, ZSTD, "corrupt")
    return HostileCase(case.name, case.image, LayerError, r"corrupt or truncated|rootfs\.diff_ids")


def gzip_claims_zstd_is(canary: Path) -> HostileCase:
    """The descriptor says ``+gzip``; the bytes are zstd."""
    tar = build_tar(_base_files())
    return HostileCase(
        "gzip-type-zstd-bytes",
        make_image([_layer_of(tar, _zstd(tar), GZIP)]),
        LayerError,
        r"(?=.*gzip)(?=.*zstd)",
    )


def huge_config(canary: Path) -> HostileCase:
    """A 5 MiB config (one enormous label): over spec.MAX_DOCUMENT_BYTES (4 MiB)."""
    layer = make_layer(_base_files())
    image = make_image([layer], labels={"pad": "x" * (5 * MiB)})
    return HostileCase("huge-config", image, HypemanError, r"byte limit")


def huge_manifest(canary: Path) -> HostileCase:
    """A 6 MiB manifest (padded with annotations), served by the proxy."""
    image = make_image([make_layer(_base_files())])
    doc = json.loads(image.manifest)
    doc["annotations"] = {"pad": "x" * (6 * MiB)}
    return HostileCase(
        "huge-manifest",
        image,
        LimitExceeded,
        r"byte limit",
        stage="resolve",
        served=_served_manifest(doc),
    )


def oversized_config_descriptor(canary: Path) -> HostileCase:
    """The manifest says the config is 1 GiB: refused before a byte is downloaded."""
    image = make_image([make_layer(_base_files())])
    doc = json.loads(image.manifest)
    doc["config"]["size"] = 1 << 30
    return HostileCase(
        "oversized-config-descriptor",
        image,
        LimitExceeded,
        r"config.*(limit|bytes)",
        served=_served_manifest(doc),
    )


def wrong_layer_size(canary: Path) -> HostileCase:
    """A layer descriptor whose size is smaller than the blob: the download stops there."""
    image = make_image([make_layer([*_base_files(), file("wrong-size", b"w")])])
    doc = json.loads(image.manifest)
    doc["layers"][0]["size"] -= 10
    return HostileCase(
        "wrong-layer-size",
        image,
        DigestMismatch,
        r"descriptor says",
        served=_served_manifest(doc),
    )


def diff_id_mismatch(canary: Path) -> HostileCase:
    """The config's diff_id is another tar's."""
    layer = make_layer(_base_files())
    other = make_layer([file("other", b"o")])
    image = make_image(
        [layer], config_extra={"rootfs": {"type": "layers", "diff_ids": [other.diff_id]}}
    )
    return HostileCase("diff-id-mismatch", image, LayerError, r"rootfs\.diff_ids")


def diff_id_count(canary: Path) -> HostileCase:
    """Two diff_ids for one layer."""
    layer = make_layer(_base_files())
    diff_ids = [layer.diff_id, layer.diff_id]
    image = make_image([layer], config_extra={"rootfs": {"type": "layers", "diff_ids": diff_ids}})
    return HostileCase("diff-id-count", image, LayerError, r"diff_ids")


LONG_NUMBER = b"9" * 5000  # past int()'s digit limit (sys.get_int_max_str_digits)


def _with_field(document: bytes, value: bytes) -> bytes:
    """``document`` (a JSON object) with one more field, ``"x"``, of raw JSON ``value``."""
    assert document.rstrip().endswith(b"}")
    return document.rstrip()[:-1] + b',"x":' + value + b"}"


def long_number_in_manifest(canary: Path) -> HostileCase:
    """A field no parser knows, holding a 5000-digit number: docker-registry stores it."""
    image = make_image([make_layer(_base_files())])
    image = replace(image, manifest=_with_field(image.manifest, LONG_NUMBER))
    return HostileCase(
        "long-number-in-manifest", image, LayerError, r"more than \d+ digits", stage="resolve"
    )


def long_number_in_config(canary: Path) -> HostileCase:
    """The same in the image config (a blob: any bytes), which the manifest names."""
    image = make_image([make_layer(_base_files())])
    config = _with_field(image.config, LONG_NUMBER)
    doc = json.loads(image.manifest)
    doc["config"].update(digest=sha256_digest(config), size=len(config))
    image = replace(image, config=config, manifest=json.dumps(doc).encode())
    return HostileCase("long-number-in-config", image, LayerError, r"more than \d+ digits")


def _malformed_digest(name: str, digest: str) -> Callable[[Path], HostileCase]:
    def build(canary: Path) -> HostileCase:
        image = make_image([make_layer(_base_files())])
        doc = json.loads(image.manifest)
        doc["layers"][0]["digest"] = digest
        return HostileCase(
            name,
            image,
            LayerError,
            r"malformed descriptor",
            stage="resolve",
            served=_served_manifest(doc),
        )

    build.__name__ = name
    return build


def _served_manifest(doc: Mapping[str, Any]) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The proxy's answer to a manifest GET: ``doc`` serialized, as a registry sends it."""
    body = json.dumps(doc).encode()
    headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256_digest(body)}
    return {"/manifests/": (body, headers)}


CASES: tuple[Callable[[Path], HostileCase], ...] = (
    traversal_names,
    hardlink_clamped,
    hardlink_outside,
    symlink_write_through,
    symlink_chain_across_layers,
    symlink_chain_stored,
    symlink_loop_write,
    hardlink_through_symlink,
    gzip_bomb,
    zstd_bomb,
    image_bomb,
    entry_flood,
    pax_flood,
    long_path,
    header_size_too_big,
    header_size_too_small,
    header_size_garbage,
    header_size_negative,
    gzip_truncated,
    gzip_corrupt,
    zstd_truncated,
    zstd_corrupt,
    gzip_claims_zstd_is,
    huge_config,
    huge_manifest,
    oversized_config_descriptor,
    wrong_layer_size,
    diff_id_mismatch,
    diff_id_count,
    long_number_in_manifest,
    long_number_in_config,
    _malformed_digest("digest-not-hex", "sha256:" + "z" * 64),
    _malformed_digest("digest-traversal", "sha256:../../../../../../etc/passwd"),
    _malformed_digest("digest-short", "sha256:1234"),
    _malformed_digest("digest-unknown-algorithm", "md5:d41d8cd98f00b204e9800998ecf8427e"),
    _malformed_digest("digest-empty", ""),
)


# -- checks ------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root`` with its mode, size and (for files) content hash."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b""
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, digest)
    return out


_IMAGE_FILES = {"metadata.json", ".lock", "rootfs.ext4"}
_CACHE_TOP = {"oci-layout", "index.json", ".lock", "blobs", "ingest", "scans", "e2fsprogs.json"}
_COMPONENT = re.compile(r"[a-z0-9][a-z0-9._-]*|[0-9a-zA-Z.-]+:[0-9]+|\[[0-9a-fA-F:.]+\](:[0-9]+)?")


def unexpected_paths(data_dir: Path) -> list[str]:
    """Paths the data-dir layout (docs/design.md, "On-disk layout") does not account for."""
    bad: list[str] = []
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir)
        parts = rel.parts
        if len(parts) == 1 and parts[0] in ("cache", "images") and path.is_dir():
            continue
        if parts[0] == "cache":
            if len(parts) == 2 and parts[1] in _CACHE_TOP:
                continue
            if parts[1:] in (("blobs", "sha256"), ("scans", "sha256")):
                continue
            in_cache = parts[1:3] in (("blobs", "sha256"), ("scans", "sha256"))
            if len(parts) == 4 and in_cache and HEX64.fullmatch(parts[3]):
                continue
            bad.append(str(rel))
        elif parts[0] == "images":
            if path.is_symlink():
                if not HEX64.fullmatch(os.readlink(path)) or path.name.startswith("."):
                    bad.append(str(rel))
            elif path.is_dir():
                if not (HEX64.fullmatch(path.name) or _COMPONENT.fullmatch(path.name)):
                    bad.append(str(rel))
            elif not (path.name in _IMAGE_FILES and HEX64.fullmatch(path.parent.name)):
                bad.append(str(rel))
        else:
            bad.append(str(rel))
    return bad


def _e2fsck_ok(disk: Path) -> bool:
    proc = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True)
    return proc.returncode == 0


def store_problems(data_dir: Path, *, fsck: bool = True) -> list[str]:
    """What is inconsistent in a data dir: the invariants of docs/design.md, checked from outside.

    - a ``ready`` record has its ``rootfs.ext4``, of the recorded size, clean under e2fsck;
    - a record that is not ready has no ``rootfs.ext4``;
    - a tag link points at a ready record in its own repository;
    - no temp file, half-written disk or half-deleted directory is left;
    - every cached blob hashes to its name, and ``ingest/`` is empty.
    """
    problems: list[str] = []
    images = data_dir / "images"
    for meta in sorted(images.rglob("metadata.json")) if images.exists() else []:
        doc: dict[str, Any] = json.loads(meta.read_bytes())
        disk = meta.parent / "rootfs.ext4"
        where = meta.parent.relative_to(data_dir)
        if doc["status"] == "ready":
            if not disk.is_file():
                problems.append(f"{where}: ready without rootfs.ext4")
            elif disk.stat().st_size != doc.get("size_bytes"):
                problems.append(f"{where}: disk size differs from size_bytes")
            elif fsck and not _e2fsck_ok(disk):
                problems.append(f"{where}: e2fsck finds problems in the ready disk")
        elif disk.exists():
            problems.append(f"{where}: {doc['status']} but rootfs.ext4 exists")
        if doc["status"] == "failed" and not doc.get("error"):
            problems.append(f"{where}: failed without an error")
    for link in sorted(p for p in images.rglob("*") if p.is_symlink()) if images.exists() else []:
        target = link.parent / os.readlink(link)
        meta = target / "metadata.json"
        if not meta.is_file() or json.loads(meta.read_bytes())["status"] != "ready":
            problems.append(
                f"{link.relative_to(data_dir)}: tag points at a build that is not ready"
            )
    for path in sorted(data_dir.rglob("*")):
        if path.name.startswith(".") and path.name != ".lock":
            problems.append(f"{path.relative_to(data_dir)}: leftover temp or deleting path")
    blobs = data_dir / "cache" / "blobs" / "sha256"
    for blob in sorted(blobs.iterdir()) if blobs.exists() else []:
        if hashlib.sha256(blob.read_bytes()).hexdigest() != blob.name:
            problems.append(f"cache/blobs/sha256/{blob.name}: content does not match its name")
    ingest = data_dir / "cache" / "ingest"
    if ingest.exists() and any(ingest.iterdir()):
        problems.append(f"cache/ingest not empty: {sorted(p.name for p in ingest.iterdir())}")
    return problems


def open_fds() -> set[str]:
    """This process's open file descriptors, as ``fd -> target`` strings."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    return out


def iter_cases(canary: Path) -> Iterator[HostileCase]:
    """Every case of the corpus, built for ``canary``."""
    for build in CASES:
        yield build(canary)


__all__ = [
    "CASES",
    "HostileCase",
    "iter_cases",
    "lie_about_size",
    "open_fds",
    "snapshot",
    "store_problems",
    "unexpected_paths",
]


def million_entries_layer(count: int = 1_000_000, per_dir: int = 1000) -> tuple[bytes, str, int]:
    """A gzip layer of ``count`` empty files in dirs of ``per_dir``, streamed (no 512 MB tar).

    Returns (blob, diff_id, entries). Headers come from one template with the
    name and checksum patched, so building a million takes seconds.
    """
    template = bytearray(build_tar([file("x")])[:BLOCK])
    dir_template = bytearray(build_tar([directory("x")])[:BLOCK])
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip container, fast
    hasher = hashlib.sha256()
    out: list[bytes] = []
    batch: list[bytes] = []

    def header(base: bytearray, name: bytes) -> bytes:
        block = bytearray(base)
        block[0:100] = name.ljust(100, b"\0")
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        return bytes(block)

    def flush() -> None:
        data = b"".join(batch)
        batch.clear()
        hasher.update(data)
        out.append(compressor.compress(data))

    entries = 0
    for d in range((count + per_dir - 1) // per_dir):
        batch.append(header(dir_template, b"d%d/" % d))
        entries += 1
        for i in range(min(per_dir, count - d * per_dir)):
            batch.append(header(template, b"d%d/%d" % (d, i)))
            entries += 1
        if len(batch) > 20_000:
            flush()
    batch.append(bytes(2 * BLOCK))
    flush()
    out.append(compressor.flush())
    return b"".join(out), "sha256:" + hasher.hexdigest(), entries

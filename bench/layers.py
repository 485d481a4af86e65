"""Realistic benchmark images: Debian root filesystems from mmdebstrap, split into layers.

Each image is a list of *stages*: full root filesystems made by
``mmdebstrap --variant=minbase`` with more packages at every stage. Layer 0 is
the first stage as is; layer ``i`` is the difference between stages ``i-1``
and ``i`` as ``docker build`` would commit it: new and changed entries (with
their parent directories), a ``.wh.<name>`` whiteout for every removed path
whose parent survives, and a ``.wh..wh..opq`` opaque marker for a directory
that survives with none of its old children. Whiteouts and opaque markers come
right after their directory's own entry, so every reader (umoci included)
applies them before the layer's new children.

Everything is cached under ``~/.cache/hypeman-bench/`` (``$HYPEMAN_BENCH_CACHE``):
``debs/`` (apt's downloads, reused by every mmdebstrap run), ``rootfs/<stage>.tar``
and ``layers/<image>/<n>.tar.gz`` with a ``layers.json`` describing them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE = Path(os.environ.get("HYPEMAN_BENCH_CACHE", Path.home() / ".cache" / "hypeman-bench"))
SUITE = "bookworm"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20

# Removes docs, man pages and some locales of everything installed so far, then
# leaves one file in /usr/share/doc: the slimming step of many real Dockerfiles.
# Against the stage before, this yields whiteouts (man, info, licenses, locales)
# and an opaque directory (doc).
SLIM_HOOK = (
    'rm -rf "$1"/usr/share/man "$1"/usr/share/info "$1"/usr/share/doc/* '
    '"$1"/usr/share/common-licenses/G* "$1"/usr/share/locale/[a-m]* '
    '&& mkdir -p "$1"/usr/share/doc/python3 && echo slim > "$1"/usr/share/doc/python3/README'
)


@dataclass(frozen=True)
class Stage:
    """One mmdebstrap root filesystem: extra packages and customize hooks."""

    name: str
    include: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    """A benchmark image: its stages, bottom first (one layer per stage)."""

    name: str
    stages: tuple[Stage, ...]


_BUILD = ("build-essential",)
_DEV = (*_BUILD, "python3", "python3-dev", "python3-pip", "git")
_MORE = (*_DEV, "cmake", "gfortran", "libssl-dev", "vim-nox")

MINBASE = Stage("minbase")
IMAGES = {
    "minbase": ImageSpec("minbase", (MINBASE,)),
    "python": ImageSpec("python", (MINBASE, Stage("python", ("python3",), (SLIM_HOOK,)))),
    "large": ImageSpec(
        "large",
        (
            MINBASE,
            Stage("large2", _BUILD),
            Stage("large3", _DEV),
            Stage("large4", _MORE, (SLIM_HOOK,)),
        ),
    ),
}


@dataclass(frozen=True)
class LayerFile:
    """A compressed layer in the cache and what a manifest and config say about it."""

    path: str
    digest: str  # sha256 of the .tar.gz
    size: int
    diff_id: str  # sha256 of the tar
    tar_size: int
    entries: int
    whiteouts: int
    opaques: int


# -- stages: mmdebstrap ---------------------------------------------------------------


def build_stage(stage: Stage, cache: Path = CACHE) -> Path:
    """``rootfs/<stage>.tar``, made with mmdebstrap on first use (root; about a minute)."""
    out = cache / "rootfs" / f"{stage.name}.tar"
    if out.exists():
        return out
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".tar.part")
    # apt's downloads are synced in and out so each stage downloads only what is new
    # (the hooks follow mmdebstrap(1) "--skip=download/empty" example); no mirror is
    # named, so mmdebstrap uses the machine's apt sources.
    command = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        "--skip=download/empty",
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
    ]
    if stage.include:
        command.append("--include=" + ",".join(stage.include))
    command += [f"--customize-hook={hook}" for hook in stage.hooks]
    command += [SUITE, str(part)]
    print(f"bench: building root filesystem {stage.name!r} with mmdebstrap", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    part.rename(out)
    return out


# -- layers: the diff between two stages -------------------------------------------------


def _norm(name: str) -> str:
    name = name.removeprefix("./").rstrip("/")
    return "" if name == "." else name


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _signature(tar: tarfile.TarFile, info: tarfile.TarInfo) -> tuple[object, ...]:
    body = ""
    if info.isreg():
        handle = tar.extractfile(info)
        assert handle is not None
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        body = digest.hexdigest()
    xattrs = tuple(sorted((k, v) for k, v in info.pax_headers.items() if k.startswith("SCHILY.")))
    return (
        info.type,
        info.mode,
        info.uid,
        info.gid,
        int(info.mtime),
        info.size,
        info.linkname,
        info.devmajor,
        info.devminor,
        body,
        xattrs,
    )


def _signatures(path: Path) -> dict[str, tuple[object, ...]]:
    with tarfile.open(path, "r:") as tar:
        return {_norm(info.name): _signature(tar, info) for info in tar}


@dataclass
class _Plan:
    keep: set[str]
    whiteouts: dict[str, list[str]]  # directory -> names to white out
    opaque: set[str]


def _plan(lower: dict[str, tuple[object, ...]], upper: dict[str, tuple[object, ...]]) -> _Plan:
    """What layer ``upper - lower`` holds."""
    changed = {p for p, sig in upper.items() if lower.get(p) != sig}
    for path, sig in upper.items():
        # A hard link to a changed file must move with it (its own header is unchanged).
        if sig[0] == tarfile.LNKTYPE and _norm(str(sig[6])) in changed:
            changed.add(path)
    removed = {p for p in lower if p not in upper}
    children: dict[str, list[str]] = {}
    for path in lower:
        if path:
            children.setdefault(_parent(path), []).append(path)
    opaque = {
        d
        for d, kids in children.items()
        if d in upper and upper[d][0] == tarfile.DIRTYPE and all(k in removed for k in kids)
    }
    opaque -= {d for d in opaque if any(_parent(d) == o or d.startswith(o + "/") for o in opaque)}
    whiteouts: dict[str, list[str]] = {}
    for path in sorted(removed):
        parent = _parent(path)
        if parent in removed or parent in opaque or any(path.startswith(o + "/") for o in opaque):
            continue
        whiteouts.setdefault(parent, []).append(path.rpartition("/")[2])
    keep = set(changed)
    for path in list(changed) + list(whiteouts) + list(opaque):
        while path:
            path = _parent(path)
            keep.add(path)
    keep.update(whiteouts)
    keep.update(opaque)
    # Under an opaque directory every surviving entry must be in this layer.
    for path in upper:
        if any(path.startswith(o + "/") for o in opaque):
            keep.add(path)
    return _Plan(keep, whiteouts, opaque)


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.type = 0o644, 0, tarfile.REGTYPE
    return info


class _Counter:
    """Counts and hashes what passes through on the way into the gzip writer."""

    def __init__(self, out: gzip.GzipFile) -> None:
        self.out = out
        self.size = 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        self.hash.update(data)
        return self.out.write(data)


def write_layer(upper_tar: Path, plan: _Plan | None, dest: Path) -> LayerFile:
    """Write ``dest`` (.tar.gz, gzip -6 without a name or mtime) from ``upper_tar``."""
    entries = whiteouts = opaques = 0
    part = dest.with_suffix(".part")
    with (
        part.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
    ):
        counter = _Counter(gz)
        with (
            tarfile.open(upper_tar, "r:") as src,
            tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT) as out,  # type: ignore[call-overload]
        ):
            for info in src:
                path = _norm(info.name)
                if plan is not None and path not in plan.keep:
                    continue
                if plan is not None and (path in plan.whiteouts or path in plan.opaque):
                    # markers live under their directory: write it first, then them
                    out.addfile(info)
                    entries += 1
                    prefix = info.name.rstrip("/") + "/"
                    if path in plan.opaque:
                        out.addfile(_marker(prefix + OPAQUE))
                        entries, opaques = entries + 1, opaques + 1
                    for name in plan.whiteouts.get(path, []):
                        out.addfile(_marker(prefix + WHITEOUT + name))
                        entries, whiteouts = entries + 1, whiteouts + 1
                    continue
                out.addfile(info, src.extractfile(info) if info.isreg() else None)
                entries += 1
    digest = hashlib.sha256()
    with part.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    part.rename(dest)
    return LayerFile(
        str(dest),
        "sha256:" + digest.hexdigest(),
        dest.stat().st_size,
        "sha256:" + counter.hash.hexdigest(),
        counter.size,
        entries,
        whiteouts,
        opaques,
    )


def diff_plan(lower_tar: Path, upper_tar: Path) -> _Plan:
    """The plan of the layer that turns ``lower_tar``'s tree into ``upper_tar``'s."""
    return _plan(_signatures(lower_tar), _signatures(upper_tar))


def image_layers(spec: ImageSpec, cache: Path = CACHE) -> list[LayerFile]:
    """The image's compressed layers, bottom first, building whatever is missing."""
    folder = cache / "layers" / spec.name
    index = folder / "layers.json"
    if index.exists():
        return [LayerFile(**d) for d in json.loads(index.read_text())]
    folder.mkdir(parents=True, exist_ok=True)
    tars = [build_stage(stage, cache) for stage in spec.stages]
    layers = []
    for i, tar in enumerate(tars):
        print(f"bench: writing layer {i} of {spec.name!r}", flush=True)
        plan = diff_plan(tars[i - 1], tar) if i else None
        layers.append(write_layer(tar, plan, folder / f"{i}.tar.gz"))
    index.write_text(json.dumps([asdict(layer) for layer in layers], indent=1))
    return layers


def iter_layer_tar(layer: LayerFile) -> Iterator[bytes]:
    """The uncompressed tar of a cached layer, in chunks (for the floor measurement)."""
    with gzip.open(layer.path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def describe(layers: Sequence[LayerFile]) -> str:
    """``4 layers, 249 MB compressed, 685 MB of tar, 16,500 entries (12 whiteouts, 1 opaque)``."""
    return (
        f"{len(layers)} layer{'s' if len(layers) > 1 else ''}, "
        f"{sum(x.size for x in layers) / 1e6:.0f} MB compressed, "
        f"{sum(x.tar_size for x in layers) / 1e6:.0f} MB of tar, "
        f"{sum(x.entries for x in layers):,} entries "
        f"({sum(x.whiteouts for x in layers)} whiteouts, {sum(x.opaques for x in layers)} opaque)"
    )

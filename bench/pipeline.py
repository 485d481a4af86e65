"""hypeman-images pull vs. the reference pipeline (skopeo → umoci → mkfs.ext4 -d), side by side.

The figures of docs/performance.md come from here. Starts docker-registry on
127.0.0.1, pushes Debian images made with mmdebstrap (see ``bench/layers.py``;
cached under ``~/.cache/hypeman-bench/``), then for each image, alternating,
on a cold page cache each time:

* reference: ``skopeo copy docker://… oci:DIR:tag``; ``umoci unpack``;
  ``mkfs.ext4 -O ^has_journal -d bundle/rootfs`` sized du + 10 % + 64 MiB;
* ours: ``hypeman-images pull`` (the CLI, a fresh data dir each run).

Then, in this process: the per-stage split of ours (``BuildStats``), the
re-pull of a ready digest, a new tag over cached layers, and the floor:
``mke2fs -d -`` fed the already-flattened tar of the same image from memory
through a 1 MiB pipe in 1 MiB writes, as our pull feeds it (bare, and through
``mke2fs.build_disk``, which adds the xattr fix-ups, ``e2fsck -fn`` beside the
sha256, and the fsync our pull also pays), beside the time to merely
decompress the layers.

The package's bytecode is compiled first (``compileall``), as an installed
package's is: with ``PYTHONDONTWRITEBYTECODE`` set, every CLI run would
otherwise compile its modules, a cost the re-pull's figure would carry.

    .venv/bin/python bench/pipeline.py                 # minbase, python, large; 3 runs
    .venv/bin/python bench/pipeline.py --quick         # minbase, 1 run (CI smoke)
    .venv/bin/python bench/pipeline.py --images large --runs 5 --json out.json
    .venv/bin/python bench/pipeline.py --link-rate 800mbit   # a ~100 MB/s registry
    .venv/bin/python bench/pipeline.py --formats       # ext4 against EROFS (bench/formats.py)

Needs root (umoci unpack keeps ownership only as root; dropping the page
cache; ``tc`` for ``--link-rate``), mmdebstrap, skopeo, umoci, docker-registry,
e2fsprogs >= 1.47.1.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import formats  # noqa: E402
import layers  # noqa: E402
import measure  # noqa: E402
from support.push import push_blob, push_manifest  # noqa: E402
from support.registry import start_registry  # noqa: E402

from hypeman_images.build.manager import ImageManager  # noqa: E402
from hypeman_images.build.options import BuildOptions  # noqa: E402
from hypeman_images.build.pipeline import BuildStats  # noqa: E402
from hypeman_images.build.stream import size_inputs  # noqa: E402
from hypeman_images.disk.e2fsprogs import find_e2fsprogs, tool_env  # noqa: E402
from hypeman_images.disk.mke2fs import (  # noqa: E402
    FIXED_TIME,
    MKE2FS_CONF,
    build_disk,
    mke2fs_argv,
    run_mke2fs_stream,
)
from hypeman_images.disk.sizing import plan_disk  # noqa: E402
from hypeman_images.layers.compression import open_decompressed  # noqa: E402
from hypeman_images.layers.emit import write_tar  # noqa: E402
from hypeman_images.layers.merge import merge  # noqa: E402
from hypeman_images.layers.scan import scan_layer  # noqa: E402
from hypeman_images.oci.digest import Digest  # noqa: E402

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
FREE_SPACE = 16 * 1024 * 1024  # the CLI's default --free-space


# -- images in the registry ------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    """An image in the bench registry: ``ref`` and ``retag_ref`` share every blob."""

    name: str
    ref: str
    retag_ref: str
    layers: tuple[layers.LayerFile, ...]


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _push_file(http: httpx.Client, url: str, repo: str, layer: layers.LayerFile) -> None:
    """A monolithic blob upload streamed from the file (never all in memory)."""
    base = f"{url}/v2/{repo}/blobs"
    if http.head(f"{base}/{layer.digest}").status_code == 200:
        return
    started = http.post(f"{base}/uploads/")
    started.raise_for_status()
    location = httpx.URL(url).join(started.headers["location"])
    location = location.copy_merge_params({"digest": layer.digest})
    with open(layer.path, "rb") as body:
        done = http.put(
            location,
            content=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(layer.size)},
        )
    done.raise_for_status()


def push(url: str, host: str, name: str, files: list[layers.LayerFile]) -> Pushed:
    """Push ``bench/<name>:1`` and ``:retag`` (same blobs, an annotation more)."""
    repo = f"bench/{name}"
    config = _json(
        {
            "created": "2025-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [f"PATH={os.defpath}"], "Cmd": ["/bin/bash"]},
            "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in files]},
            "history": [{"created_by": f"bench layer {i}"} for i in range(len(files))],
        }
    )
    with httpx.Client(timeout=300.0) as http:
        for layer in files:
            _push_file(http, url, repo, layer)
        config_digest = push_blob(url, repo, config, client=http)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": x.digest, "size": x.size} for x in files
            ],
        }
        push_manifest(url, repo, "1", _json(manifest), MANIFEST_TYPE, client=http)
        manifest["annotations"] = {"org.example.bench": "retag"}
        push_manifest(url, repo, "retag", _json(manifest), MANIFEST_TYPE, client=http)
    return Pushed(name, f"{host}/{repo}:1", f"{host}/{repo}:retag", tuple(files))


# -- the two pipelines -------------------------------------------------------------------


@dataclass
class Measured:
    """One end-to-end run: the totals, its steps, and what it left on disk."""

    total: measure.Run
    steps: dict[str, float]
    disk_bytes: int  # allocated by its outputs at the end = its high-water mark
    device_written: int | None
    python_rss: int = 0  # ours: the hypeman-images process alone (its mke2fs excluded)


def reference(pushed: Pushed, work: Path) -> Measured:
    """skopeo copy → umoci unpack → mkfs.ext4 -d, into ``work``."""
    oci, bundle, disk = work / "oci", work / "bundle", work / "disk.ext4"
    device = measure.DeviceWrites(work)
    device.start()
    copy = measure.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{pushed.ref}",
            f"oci:{oci}:bench",
        ]
    )
    unpack = measure.run(["umoci", "unpack", "--image", f"{oci}:bench", str(bundle)])
    started = time.perf_counter()
    tree = measure.disk_usage(bundle / "rootfs")
    size_k = (tree + tree // 10 + (64 << 20)) // 4096 * 4
    du = time.perf_counter() - started
    mkfs = measure.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", bundle / "rootfs", disk, f"{size_k}k"]
    )
    total = copy + unpack + mkfs
    total = measure.Run(total.seconds + du, total.max_rss, total.written, total.cpu)
    steps = {
        "skopeo copy": copy.seconds,
        "umoci unpack": unpack.seconds,
        "mkfs.ext4 -d": mkfs.seconds,
    }
    return Measured(total, steps, measure.disk_usage(oci, bundle, disk), device.stop())


# The CLI's main() in a python that reports its own peak RSS at exit: wait4's
# figure is the largest process of the tree, and that is mke2fs.
_SELF_RSS = "BENCH_SELF_MAXRSS_KB="
_CLI = (
    "import atexit, resource, sys\n"
    "atexit.register(lambda: print("
    f"'{_SELF_RSS}%d' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))\n"
    "from hypeman_images.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def cli() -> list[str]:
    """The hypeman-images command of this venv (``main()`` with the RSS report)."""
    return [sys.executable, "-c", _CLI]


def _self_rss(output: bytes) -> int:
    for line in output.decode(errors="replace").splitlines():
        if line.startswith(_SELF_RSS):
            return int(line[len(_SELF_RSS) :]) * 1024
    return 0


@dataclass(frozen=True)
class Ours:
    """How ours is run: the default (the disk's sha256 recorded) or ``--no-disk-digest``."""

    disk_digest: bool = True

    @property
    def flags(self) -> list[str]:
        return [] if self.disk_digest else ["--no-disk-digest"]

    @property
    def options(self) -> BuildOptions:
        return BuildOptions(disk_digest=self.disk_digest)


def ours(pushed: Pushed, work: Path, how: Ours) -> Measured:
    """``hypeman-images pull`` into a fresh data dir under ``work``."""
    data = work / "data"
    device = measure.DeviceWrites(work)
    device.start()
    argv = [*cli(), "pull", "--no-progress", *how.flags, "--data-dir", str(data), pushed.ref]
    result = measure.run(argv)
    return Measured(result, {}, measure.disk_usage(data), device.stop(), _self_rss(result.output))


# -- in-process figures ------------------------------------------------------------------


@dataclass
class InProcess:
    """Stage split, re-pulls and the floor for one image (seconds unless named)."""

    split: dict[str, float] = field(default_factory=dict)
    repull_s: float = 0.0
    repull_cli_s: float = 0.0
    repull_cli_cold_s: float = 0.0
    retag_s: float = 0.0
    retag_downloaded: int = -1
    retag_cached_blobs: int = 0
    decompress_s: float = 0.0
    floor_mke2fs_s: float = 0.0
    floor_build_disk_s: float = 0.0
    flat_tar_bytes: int = 0
    io_floor_bytes: int = 0
    io_floor_s: float = 0.0


def _pull(data: Path, ref: str, how: Ours) -> tuple[BuildStats, float]:
    stats = BuildStats()
    started = time.perf_counter()
    with ImageManager(data, options=how.options) as manager:
        manager.pull(ref, stats=stats)
    return stats, time.perf_counter() - started


def in_process(pushed: Pushed, work: Path, how: Ours) -> InProcess:
    """Cold pull with the stage split, then re-pull, retag, decompress and floor."""
    out = InProcess()
    data = work / "data"
    measure.drop_caches()
    stats, total = _pull(data, pushed.ref, how)
    out.split = {
        "resolve": stats.resolve_s,
        "download": stats.download_s,
        # One pass: every layer read once into mke2fs as it downloads, then the
        # shrink and e2fsck; two passes (and a one pass that fell back): the scan,
        # then the emit.
        **(
            {
                "one pass (read + mke2fs + shrink, beside the download)": stats.stages[
                    "one_pass_s"
                ],
                "of which after the download": stats.convert_s,
            }
            if "one_pass_s" in stats.stages
            else {
                "one pass tried": stats.stages.get("one_pass_tried_s", 0.0),
                "flatten scan": stats.stages.get("flatten_scan_s", 0.0),
                "mke2fs (emit)": stats.stages.get("mke2fs_s", 0.0),
            }
        ),
        "finish": stats.finish_s,
        "total": total,
    }
    again, out.repull_s = _pull(data, pushed.ref, how)
    assert again.reused, "a second pull of a ready digest rebuilt it"
    # The first CLI start after the cold pull reads the interpreter's and the
    # libraries' files from disk (the page cache was dropped); the median of
    # the next five is the start-up of a CLI on a host that uses it.
    repull = [*cli(), "pull", "--no-progress", "--data-dir", str(data), pushed.ref]
    out.repull_cli_cold_s = measure.run(repull).seconds
    out.repull_cli_s = measure.median([measure.run(repull).seconds for _ in range(5)])
    # Settled first: the writeback of the disks just built would otherwise slow it.
    os.sync()
    measure.drop_caches()
    retag, out.retag_s = _pull(data, pushed.retag_ref, how)
    out.retag_downloaded, out.retag_cached_blobs = retag.downloaded_bytes, retag.cached_blobs
    _floor(pushed, data / "cache", work, out, how)
    return out


def _blob(cache: Path, digest: str) -> Path:
    algorithm, _, encoded = digest.partition(":")
    return cache / "blobs" / algorithm / encoded


def _floor(pushed: Pushed, cache: Path, work: Path, out: InProcess, how: Ours) -> None:
    """Decompress-only time, then mke2fs on the flattened tar held in memory."""
    paths = [_blob(cache, x.digest) for x in pushed.layers]
    for path in paths:
        path.read_bytes()  # warm: the floor is CPU and the disk write, not the blob reads
    started = time.perf_counter()
    for path in paths:
        with open_decompressed(path, LAYER_TYPE, name=path.name) as stream:
            while stream.read(1 << 20):
                pass
    out.decompress_s = time.perf_counter() - started

    scans = []
    for i, path in enumerate(paths):
        with open_decompressed(path, LAYER_TYPE, name=path.name) as stream:
            scans.append(scan_layer(stream, i, name=path.name))
    tree = merge(scans)
    flat = work / "flat.tar"
    with flat.open("wb") as handle:
        write_tar(tree, lambda i: open_decompressed(paths[i], LAYER_TYPE, name=""), handle)
    data = flat.read_bytes()
    out.flat_tar_bytes = len(data)
    flat.unlink()
    tools = find_e2fsprogs()
    inputs = size_inputs(tree.stats)
    seed = Digest.of(pushed.ref.encode())

    conf = work / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    env = {**tool_env(tools, FIXED_TIME), "MKE2FS_CONFIG": str(conf)}
    image = work / "floor.ext4"
    image.write_bytes(b"")
    argv = mke2fs_argv(tools, image, plan_disk(inputs, FREE_SPACE), seed, None, "-")

    def feed(stream: BinaryIO) -> None:
        view = memoryview(data)
        for offset in range(0, len(view), 1 << 20):
            stream.write(view[offset : offset + (1 << 20)])

    measure.drop_caches()
    started = time.perf_counter()
    # Through our pull's own pipe into mke2fs (1 MiB pipe and buffer), not
    # subprocess.run(input=...), whose 4 KiB writes would make the floor slower.
    run_mke2fs_stream(argv, env, feed)
    os.sync()  # our pull fsyncs its disk; so does the floor
    out.floor_mke2fs_s = time.perf_counter() - started
    image.unlink()

    measure.drop_caches()
    started = time.perf_counter()
    build_disk(
        work / "floor2.ext4",
        inputs,
        feed,
        seed=seed,
        free_space=FREE_SPACE,
        mke2fs=tools,
        xattr_fixups=[(f.path, f.name, f.value) for f in tree.xattr_fixups],
        compute_sha256=how.disk_digest,  # as the pull measured does (disk_sha256)
    )
    out.floor_build_disk_s = time.perf_counter() - started
    (work / "floor2.ext4").unlink()

    # What no pipeline of this design avoids writing: the blobs into the cache
    # and the tree into the disk, each fsynced; written here as plain zeros.
    out.io_floor_bytes = sum(x.size for x in pushed.layers) + len(data)
    block = bytes(1 << 20)
    measure.drop_caches()
    started = time.perf_counter()
    with (work / "io-floor").open("wb") as handle:
        for _ in range(out.io_floor_bytes >> 20):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    out.io_floor_s = time.perf_counter() - started
    (work / "io-floor").unlink()


# -- the run -------------------------------------------------------------------------------


@dataclass
class ImageResult:
    """Everything measured for one image."""

    name: str
    description: str
    reference: list[Measured] = field(default_factory=list)
    ours: list[Measured] = field(default_factory=list)
    extra: InProcess | None = None


@contextmanager
def scratch(parent: Path, name: str) -> Iterator[Path]:
    """A fresh directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=name + "-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_image(pushed: Pushed, runs: int, work: Path, how: Ours) -> ImageResult:
    """``runs`` alternating cold runs of both pipelines, then the in-process figures."""
    result = ImageResult(pushed.name, layers.describe(pushed.layers))
    for i in range(runs):
        order = ("reference", "ours") if i % 2 == 0 else ("ours", "reference")
        for which in order:
            with scratch(work, which) as folder:
                measure.drop_caches()
                if which == "reference":
                    result.reference.append(reference(pushed, folder))
                else:
                    result.ours.append(ours(pushed, folder, how))
            print(f"  {pushed.name} run {i + 1} {which}: {_last(result, which):.2f} s", flush=True)
    with scratch(work, "inproc") as folder:
        result.extra = in_process(pushed, folder, how)
    return result


def _last(result: ImageResult, which: str) -> float:
    runs = result.reference if which == "reference" else result.ours
    return runs[-1].total.seconds


def _med(runs: list[Measured], key: str) -> float:
    return measure.median([float(getattr(r.total, key)) for r in runs])


def report(results: list[ImageResult], dropped: bool, runs: int) -> str:
    """The tables, as plain text."""
    lines = [
        f"machine: {os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM, "
        f"{_kernel()}; page cache {'dropped before each run' if dropped else 'NOT dropped'}; "
        f"medians of {runs} run{'s' if runs > 1 else ''}",
        "RSS: reference = its largest process; ours = the hypeman-images process, (mke2fs) = "
        "the largest of its tree. written: bytes its processes dirtied for the disk "
        "(rusage oublock). disk: what its outputs occupy at the end (its high-water mark). "
        "CPU: user + system seconds of its processes (the registry's not counted).",
        "",
    ]
    head = (
        f"{'image':<8} {'reference':>10} {'ours':>8} {'ratio':>6} {'ref CPU':>8} {'our CPU':>8} "
        f"{'ref RSS':>9} {'our RSS':>9} "
        f"{'(mke2fs)':>9} {'ref written':>12} {'our written':>12} {'ref disk':>10} "
        f"{'our disk':>10}"
    )
    lines += [head, "-" * len(head)]
    for r in results:
        ref_s, our_s = _med(r.reference, "seconds"), _med(r.ours, "seconds")
        lines.append(
            f"{r.name:<8} {ref_s:>9.2f}s {our_s:>7.2f}s {ref_s / our_s:>5.1f}x "
            f"{_med(r.reference, 'cpu'):>7.2f}s {_med(r.ours, 'cpu'):>7.2f}s "
            f"{_med(r.reference, 'max_rss') / 2**20:>6.0f}MiB "
            f"{measure.median([m.python_rss for m in r.ours]) / 2**20:>6.0f}MiB "
            f"{_med(r.ours, 'max_rss') / 2**20:>6.0f}MiB "
            f"{measure.mb(_med(r.reference, 'written')):>12} "
            f"{measure.mb(_med(r.ours, 'written')):>12} "
            f"{measure.mb(measure.median([m.disk_bytes for m in r.reference])):>10} "
            f"{measure.mb(measure.median([m.disk_bytes for m in r.ours])):>10}"
        )
    lines.append("")
    for r in results:
        lines.append(f"{r.name}: {r.description}")
        steps = {k: measure.median([m.steps[k] for m in r.reference]) for k in r.reference[0].steps}
        lines.append("  reference steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in steps.items()))
        dev_ref = [m.device_written for m in r.reference if m.device_written is not None]
        dev_our = [m.device_written for m in r.ours if m.device_written is not None]
        if dev_ref and dev_our:
            lines.append(
                f"  block device writes (all processes, after sync): reference "
                f"{measure.mb(measure.median(dev_ref))}, ours {measure.mb(measure.median(dev_our))}"
            )
        x = r.extra
        if x is None:
            continue
        lines.append(
            "  ours, in process: " + ", ".join(f"{k} {v:.2f}s" for k, v in x.split.items())
        )
        lines.append(
            f"  floor: decompress layers only {x.decompress_s:.2f}s; flattened tar "
            f"{measure.mb(x.flat_tar_bytes)} → mke2fs -d - {x.floor_mke2fs_s:.2f}s, "
            f"build_disk {x.floor_build_disk_s:.2f}s; ours / build_disk floor "
            f"{_med(r.ours, 'seconds') / x.floor_build_disk_s:.2f}x, "
            f"ours / mke2fs floor {_med(r.ours, 'seconds') / x.floor_mke2fs_s:.2f}x"
        )
        lines.append(
            f"  device floor: {measure.mb(x.io_floor_bytes)} (blobs + flattened tree) "
            f"written and fsynced {x.io_floor_s:.2f}s; ours / device floor "
            f"{_med(r.ours, 'seconds') / x.io_floor_s:.2f}x"
        )
        lines.append(
            f"  re-pull of the ready digest {x.repull_s:.3f}s in process "
            f"({x.repull_cli_s:.2f}s as a CLI process, {x.repull_cli_cold_s:.2f}s the first "
            "time after the cold pull); new tag over cached blobs "
            f"{x.retag_s:.2f}s, downloaded {x.retag_downloaded} bytes "
            f"({x.retag_cached_blobs} cached layers)"
        )
    return "\n".join(lines)


@contextmanager
def link_rate(rate: str | None) -> Iterator[None]:
    """Limit the loopback interface to ``rate`` (``tc`` token bucket) while the block runs."""
    if rate is None:
        yield
        return
    tc = ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate]
    subprocess.run([*tc, "burst", "1mb", "latency", "50ms"], check=True)
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _kernel() -> str:
    return f"Linux {os.uname().release}"


def bench_parser(description: str, per: str) -> argparse.ArgumentParser:
    """The flags every image benchmark takes: which images, how many runs ``per`` way, where."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="minbase only, 1 run (CI smoke)")
    parser.add_argument("--runs", type=int, default=3, help=f"runs per {per} and image")
    parser.add_argument(
        "--images", default="minbase,python,large", help=f"comma list of {','.join(layers.IMAGES)}"
    )
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"), help="scratch parent dir")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    return parser


def chosen(args: argparse.Namespace) -> tuple[list[str], int]:
    """The image names and the runs per way that :func:`bench_parser`'s flags ask for."""
    names = ["minbase"] if args.quick else args.images.split(",")
    return names, 1 if args.quick else args.runs


def main() -> int:
    """Parse the arguments, run the benchmark, print the report."""
    parser = bench_parser(__doc__.split("\n\n")[0], "pipeline")
    parser.add_argument(
        "--link-rate",
        metavar="RATE",
        help="limit the loopback to RATE (tc's units, e.g. 800mbit: ~100 MB/s) once the "
        "images are pushed, as a registry across a network would be",
    )
    parser.add_argument(
        "--no-disk-digest",
        action="store_true",
        help="run ours with --no-disk-digest (the disk's sha256 not recorded)",
    )
    parser.add_argument(
        "--formats",
        action="store_true",
        help="compare ours as ext4 with ours as EROFS (build time, disk size, lz4) instead "
        "of ours with the reference",
    )
    args = parser.parse_args()
    how = Ours(disk_digest=not args.no_disk_digest)
    names, runs = chosen(args)
    compileall.compile_dir(ROOT / "src", quiet=1)
    dropped = measure.drop_caches()
    if not dropped:
        print("bench: cannot drop the page cache (not root?): runs are warm", file=sys.stderr)
    images = {name: layers.image_layers(layers.IMAGES[name]) for name in names}
    results = []
    with (
        scratch(args.work, "hypeman-bench") as work,
        start_registry(work / "registry") as registry,
    ):
        pushed = [push(registry.url, registry.host, name, images[name]) for name in names]
        with link_rate(args.link_rate):
            if args.formats:
                compared = [
                    formats.compare_formats(p.name, p.ref, cli(), runs, work, how.disk_digest)
                    for p in pushed
                ]
            else:
                for image in pushed:
                    print(f"bench: {image.name}: {layers.describe(image.layers)}", flush=True)
                    results.append(bench_image(image, runs, work, how))
    if args.formats:
        print()
        print(formats.format_report(compared))
        return 0
    text = report(results, dropped, runs)
    if args.link_rate:
        text = f"loopback limited to {args.link_rate} (tc tbf)\n" + text
    if not how.disk_digest:
        text = "ours: --no-disk-digest (the disk's sha256 not recorded)\n" + text
    print()
    print(text)
    if args.json:
        raw = json.dumps([asdict(r) for r in results], indent=1, default=lambda _: None)
        args.json.write_text(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())

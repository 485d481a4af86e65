"""A disk fetched from the disk cache and verified vs. the same disk built, for the bench images.

The disk-cache figures of docs/performance.md come from here. Starts
docker-registry on 127.0.0.1 and pushes the Debian images of
``bench/pipeline.py`` (``bench/layers.py``), then for each image, on a cold
page cache each time (the registry's storage included):

* build: ``hypeman-images pull`` into a fresh data dir, no disk cache: what a
  host without a fleet does;
* build + push: the same with ``--disk-cache-mode push``: the first host of a
  fleet (the path is printed when the disk is ready; the command ends when
  the push does, so the difference is the push);
* fetch: ``hypeman-images pull --disk-cache-mode pull`` into a fresh data
  dir: the lookup, the chunks fetched and inflated, the disk's sha256,
  ``e2fsck -fn``, the rename; no layer downloaded.

Reported per image: the layers' compressed bytes beside the artifact's (its
distinct chunks, config and manifest), the disk's size, medians of the wall
times, and the peak RSS of the hypeman-images process alone (its e2fsck and
mke2fs excluded) and of its whole tree, against the fetch's 128 MiB target.

    .venv/bin/python bench/fleet.py                 # minbase, python, large; 3 runs
    .venv/bin/python bench/fleet.py --quick         # minbase, 1 run (CI smoke)
    .venv/bin/python bench/fleet.py --images large --runs 5 --link-rate 800mbit

Needs root to drop the page cache (else runs are warm), docker-registry,
mmdebstrap (the first time, to make the layers), e2fsprogs >= 1.47.1.
"""

from __future__ import annotations

import compileall
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import layers  # noqa: E402
import measure  # noqa: E402
import pipeline  # noqa: E402
from support.registry import start_registry  # noqa: E402

from hypeman_images.build.diskcache import recorded_recipe  # noqa: E402
from hypeman_images.fleet.cache import parse_repository  # noqa: E402
from hypeman_images.fleet.lookup import find_disk  # noqa: E402
from hypeman_images.registry.client import RegistryClient  # noqa: E402
from hypeman_images.store.images import read_record  # noqa: E402

RSS_TARGET = 128 * 1024 * 1024  # the fetch's own peak: docs/performance.md, "Targets"
WAYS = ("build", "build + push", "fetch")


@dataclass
class FleetResult:
    """One image: sizes, and the runs of each way."""

    name: str
    description: str
    layer_bytes: int = 0
    artifact_bytes: int = 0
    chunks: int = 0
    distinct_chunks: int = 0
    disk_bytes: int = 0
    runs: dict[str, list[pipeline.Measured]] = field(default_factory=dict)


def pull(pushed: pipeline.Pushed, data: Path, *flags: str) -> pipeline.Measured:
    """One measured ``hypeman-images pull`` into ``data`` (a fresh data dir)."""
    measure.drop_caches()
    argv = [*pipeline.cli(), "pull", "--no-progress", "--data-dir", str(data), *flags, pushed.ref]
    result = measure.run(argv)
    return pipeline.Measured(
        result, {}, measure.disk_usage(data), None, pipeline._self_rss(result.output)
    )


def artifact_size(cache: str, data: Path, result: FleetResult) -> None:
    """The artifact the push made, read back from the cache: its sizes into ``result``."""
    [metadata] = (data / "images").rglob("metadata.json")
    record = read_record(metadata.parent)
    assert record is not None and record.size_bytes is not None
    with RegistryClient() as client:
        found = find_disk(client, parse_repository(cache), recorded_recipe(record))
    assert found is not None, "the push left no artifact to find"
    artifact = found.artifact
    distinct = {chunk.blob.digest: chunk.blob.size for chunk in artifact.chunks}
    result.artifact_bytes = (
        sum(distinct.values()) + len(artifact.config_data) + len(artifact.manifest.data)
    )
    result.chunks, result.distinct_chunks = len(artifact.chunks), len(distinct)
    result.disk_bytes = record.size_bytes


def bench_image(pushed: pipeline.Pushed, runs: int, work: Path, registry: str) -> FleetResult:
    """``runs`` cold runs of each way; the cache repository is the image's own."""
    result = FleetResult(pushed.name, layers.describe(pushed.layers))
    result.layer_bytes = sum(layer.size for layer in pushed.layers)
    result.runs = {way: [] for way in WAYS}
    cache = f"{registry}/fleet/{pushed.name}"
    flags = {
        "build": (),
        "build + push": ("--disk-cache", cache, "--disk-cache-mode", "push"),
        "fetch": ("--disk-cache", cache, "--disk-cache-mode", "pull"),
    }
    for i in range(runs):
        for way in WAYS:
            with pipeline.scratch(work, "fleet") as folder:
                measured = pull(pushed, folder / "data", *flags[way])
                if way == "build + push" and i == 0:
                    artifact_size(cache, folder / "data", result)
                if way == "fetch":
                    text = measured.total.output.decode(errors="replace")
                    assert "fetching: disk" in text, text[-2000:]
            result.runs[way].append(measured)
            print(f"  {pushed.name} run {i + 1} {way}: {measured.total.seconds:.2f} s", flush=True)
    return result


def report(results: list[FleetResult], dropped: bool, runs: int) -> str:
    """The table, as plain text."""
    lines = [
        f"page cache {'dropped before each run' if dropped else 'NOT dropped'}; medians of "
        f"{runs} run{'s' if runs > 1 else ''}. RSS: the hypeman-images process alone, and "
        "(tree) the largest process of its tree (mke2fs, e2fsck).",
        "",
    ]
    head = (
        f"{'image':<8} {'layers':>9} {'artifact':>9} {'disk':>9} {'chunks':>7} "
        f"{'build':>8} {'+push':>8} {'fetch':>8} {'speed-up':>8} "
        f"{'fetch RSS':>10} {'(tree)':>8} {'build RSS':>10}"
    )
    lines += [head, "-" * len(head)]
    for r in results:
        med = {way: pipeline._med(r.runs[way], "seconds") for way in WAYS}
        rss = measure.median([m.python_rss for m in r.runs["fetch"]])
        lines.append(
            f"{r.name:<8} {measure.mb(r.layer_bytes):>9} {measure.mb(r.artifact_bytes):>9} "
            f"{measure.mb(r.disk_bytes):>9} {r.distinct_chunks:>3}/{r.chunks:<3} "
            f"{med['build']:>7.2f}s {med['build + push']:>7.2f}s {med['fetch']:>7.2f}s "
            f"{med['build'] / med['fetch']:>7.1f}x "
            f"{rss / 2**20:>7.0f}MiB {pipeline._med(r.runs['fetch'], 'max_rss') / 2**20:>5.0f}MiB "
            f"{measure.median([m.python_rss for m in r.runs['build']]) / 2**20:>7.0f}MiB"
        )
    worst = max(measure.median([m.python_rss for m in r.runs["fetch"]]) for r in results)
    verdict = "met" if worst <= RSS_TARGET else "MISSED"
    lines += ["", f"fetch peak RSS target {RSS_TARGET >> 20} MiB: {verdict}"]
    for r in results:
        lines.append(f"{r.name}: {r.description}")
    return "\n".join(lines)


def main() -> int:
    """Parse the arguments, run the benchmark, print the report."""
    parser = pipeline.bench_parser(__doc__.split("\n\n")[0], "way")
    parser.add_argument("--link-rate", metavar="RATE", help="limit the loopback (tc's units)")
    args = parser.parse_args()
    names, runs = pipeline.chosen(args)
    compileall.compile_dir(ROOT / "src", quiet=1)
    dropped = measure.drop_caches()
    images = {name: layers.image_layers(layers.IMAGES[name]) for name in names}
    results = []
    with (
        pipeline.scratch(args.work, "hypeman-fleet-bench") as work,
        start_registry(work / "registry") as registry,
    ):
        pushed = [pipeline.push(registry.url, registry.host, n, images[n]) for n in names]
        with pipeline.link_rate(args.link_rate):
            for image in pushed:
                print(f"bench: {image.name}: {layers.describe(image.layers)}", flush=True)
                results.append(bench_image(image, runs, work, registry.host))
    text = report(results, dropped, runs)
    if args.link_rate:
        text = f"loopback limited to {args.link_rate} (tc tbf)\n" + text
    print()
    print(text)
    if args.json:
        raw = json.dumps([asdict(r) for r in results], indent=1, default=lambda _: None)
        args.json.write_text(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())

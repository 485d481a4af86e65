"""The disk cache's part of a build: the recipe it looks for, the one it records, the metrics."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from support.fleet import FAST, cache_repo
from support.pushed import PushedImage

from hypeman_images.build.diskcache import BUILDER, STAGED, planned_recipes, recorded_recipe
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.metrics import Metrics, QueueGauges, parse
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pull import resolve
from hypeman_images.disk.e2fsprogs import E2fsprogs, find_e2fsprogs
from hypeman_images.errors import InvalidArgument
from hypeman_images.fleet.cache import CacheMode, DiskCache
from hypeman_images.layers.limits import Limits
from hypeman_images.oci.reference import parse_reference
from hypeman_images.oci.spec import Platform
from hypeman_images.registry.client import RegistryClient


@pytest.fixture(scope="module")
def tools() -> E2fsprogs:
    return find_e2fsprogs()


def test_the_recipe_looked_for_is_the_one_the_build_records(
    alpine_ref: PushedImage, data_dir: Path, tools: E2fsprogs
) -> None:
    with RegistryClient(config=FAST) as client:
        resolved = resolve(client, parse_reference(alpine_ref.ref), Platform.host())
    options = BuildOptions()
    planned = planned_recipes(resolved, options, options.limits, tools)
    assert [r.one_pass for r in planned] == [True, False]  # the one pass, then its fallback
    assert planned[0].builder == BUILDER and planned[0].e2fsprogs == tools.version_text
    with ImageManager(data_dir, client_factory=lambda: RegistryClient(config=FAST)) as manager:
        record = manager.pull(alpine_ref.ref).record
    assert (record.source, record.one_pass, record.builder) == ("build", True, BUILDER)
    assert recorded_recipe(record) == planned[0]
    assert recorded_recipe(record).key == planned[0].key


def test_the_build_path_predicted_follows_the_options_and_the_tools(
    alpine_ref: PushedImage, tools: E2fsprogs
) -> None:
    with RegistryClient(config=FAST) as client:
        resolved = resolve(client, parse_reference(alpine_ref.ref), Platform.host())
    options = BuildOptions()
    two_pass = planned_recipes(resolved, replace(options, one_pass=False), Limits(), tools)
    assert [r.one_pass for r in two_pass] == [False]
    old_mke2fs = replace(tools, tar_input=False)
    staged = planned_recipes(resolved, options, Limits(), old_mke2fs)
    assert [(r.one_pass, dict(r.options)) for r in staged] == [(False, STAGED)]
    no_room = planned_recipes(resolved, options, Limits(max_image_bytes=1), tools)
    assert [r.one_pass for r in no_room] == [False]
    assert len({r.match_key for r in (*two_pass, *staged)}) == 2


def test_a_record_from_before_the_disk_cache_is_not_pushed(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    with ImageManager(data_dir, client_factory=lambda: RegistryClient(config=FAST)) as manager:
        record = manager.pull(alpine_ref.ref).record
    with pytest.raises(InvalidArgument, match="predates the disk cache"):
        recorded_recipe(replace(record, builder=None, one_pass=None))


def test_the_disk_cache_metrics() -> None:
    metrics = Metrics()
    metrics.disk_cache_used(None, None, 0)  # no cache asked: nothing counted
    metrics.disk_cache_used("hit", None, 1234)
    metrics.disk_cache_used("miss", None, 0)
    metrics.disk_cache_used("fallback", "digest_mismatch", 0)
    metrics.disk_cache_used("fallback", "digest_mismatch", 0)
    metrics.disk_pushed(True, 999)
    metrics.disk_pushed(False, 0)
    text = metrics.render(QueueGauges(0, 0))
    assert "# TYPE hypeman_images_disk_cache_lookups_total counter" in text
    assert {k: v for k, v in parse(text).items() if "disk_cache" in k} == {
        'hypeman_images_disk_cache_lookups_total{result="hit"}': 1,
        'hypeman_images_disk_cache_lookups_total{result="miss"}': 1,
        'hypeman_images_disk_cache_lookups_total{result="fallback"}': 2,
        'hypeman_images_disk_cache_fallbacks_total{reason="digest_mismatch"}': 2,
        'hypeman_images_disk_cache_pushes_total{outcome="success"}': 1,
        'hypeman_images_disk_cache_pushes_total{outcome="failure"}': 1,
        'hypeman_images_disk_cache_bytes_total{direction="fetched"}': 1234,
        'hypeman_images_disk_cache_bytes_total{direction="pushed"}': 999,
    }


def test_a_push_that_crashes_is_told_and_counted_and_the_image_stays_ready(
    alpine_ref: PushedImage, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A bug in the background push (here, push_disk raising what no registry error is)
    must not vanish into the push thread's Future: it is logged with its traceback and
    counted as a failed push, and the image it was pushing stays ready."""

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the push")

    monkeypatch.setattr("hypeman_images.fleet.push.push_disk", crash)
    cache = DiskCache(cache_repo(alpine_ref.registry.host, "crash"), CacheMode.PUSH)
    options = BuildOptions(disk_cache=cache)
    with (
        caplog.at_level(logging.ERROR),
        ImageManager(
            data_dir, options=options, client_factory=lambda: RegistryClient(config=FAST)
        ) as manager,
    ):
        stored = manager.pull(alpine_ref.ref)
    # Leaving drained the push.
    assert stored.record.status == "ready" and stored.disk.is_file()
    crashed = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashed) == 1 and crashed[0].exc_info is not None
    assert "a bug in the push" in str(crashed[0].exc_info[1])
    pushes = {k: v for k, v in parse(manager.metrics.render(QueueGauges(0, 0))).items()
              if "pushes_total" in k}  # fmt: skip
    assert pushes == {
        'hypeman_images_disk_cache_pushes_total{outcome="success"}': 0,
        'hypeman_images_disk_cache_pushes_total{outcome="failure"}': 1,
    }

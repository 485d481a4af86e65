"""Cyclic collections are rare while builds run, and only then (hypeman_images.build.collector)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pushed import PushedImage

from hypeman_images.build import collector
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.progress import Reporter

RARE = collector.BUILD_THRESHOLD


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was, thresholds = gc.isenabled(), gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    (gc.enable if was else gc.disable)()


def test_overlapping_builds_restore_the_thresholds_when_the_last_ends() -> None:
    gc.set_threshold(700, 10, 10)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def second() -> None:
        first_in.wait()
        with collector.collect_rarely():
            second_in.set()
            first_out.wait()
            seen.append(gc.get_threshold()[0])  # the first build ended; this one still runs

    thread = threading.Thread(target=second)
    thread.start()
    with collector.collect_rarely():
        assert gc.get_threshold() == (RARE, 10, 10)
        first_in.set()
        second_in.wait()
    first_out.set()
    thread.join()
    assert seen == [RARE]
    assert gc.get_threshold() == (700, 10, 10)


def test_cyclic_garbage_is_still_collected_during_a_build() -> None:
    """The service's event loop makes cycles while builds run: they must not pile up."""

    class Node:
        def __init__(self) -> None:
            self.me = self

    gc.enable()
    with collector.collect_rarely():
        gc.collect()
        for _ in range(3 * RARE):
            Node()
        left = sum(isinstance(o, Node) for o in gc.get_objects())
    assert left < RARE + 1000


def test_the_program_settings_are_kept() -> None:
    gc.disable()
    gc.set_threshold(100_000, 5, 5)  # already rarer than a build's: left alone
    with collector.collect_rarely():
        assert gc.get_threshold() == (100_000, 5, 5)
    assert not gc.isenabled() and gc.get_threshold() == (100_000, 5, 5)


def test_a_failing_build_restores_the_thresholds() -> None:
    gc.set_threshold(700, 10, 10)
    with pytest.raises(RuntimeError), collector.collect_rarely():
        raise RuntimeError("the build failed")
    assert gc.get_threshold() == (700, 10, 10)


def test_a_pull_collects_rarely_while_it_builds(alpine_ref: PushedImage, tmp_path: Path) -> None:
    """Through the pipeline: the stages a pull reports mid-build see the build's threshold."""
    gc.set_threshold(700, 10, 10)
    during: dict[str, int] = {}

    class Watching(Reporter):
        def stage(self, stage: str, detail: str = "") -> None:
            during[stage] = gc.get_threshold()[0]

    with ImageManager(tmp_path / "data") as manager:
        manager.pull(alpine_ref.ref, reporter=Watching())
    assert during["pulling"] == RARE and during["converting"] == RARE
    assert gc.get_threshold() == (700, 10, 10)

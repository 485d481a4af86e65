"""The cyclic collector is paused while builds run, and only then (hypeman_images.gcpause)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pushed import PushedImage

from hypeman_images import gcpause
from hypeman_images.manager import ImageManager
from hypeman_images.progress import Reporter


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_overlapping_builds_resume_collection_when_the_last_ends() -> None:
    gc.enable()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        first_in.wait()
        with gcpause.paused():
            second_in.set()
            first_out.wait()
            seen.append(gc.isenabled())  # the first build ended; this one still runs

    thread = threading.Thread(target=second)
    thread.start()
    with gcpause.paused():
        assert not gc.isenabled()
        first_in.set()
        second_in.wait()
    first_out.set()
    thread.join()
    assert seen == [False]
    assert gc.isenabled()


def test_a_collector_the_program_disabled_stays_disabled() -> None:
    gc.disable()
    with gcpause.paused():
        pass
    assert not gc.isenabled()


def test_a_failing_build_resumes_collection() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), gcpause.paused():
        raise RuntimeError("the build failed")
    assert gc.isenabled()


def test_a_build_pauses_collection_while_it_runs(alpine_ref: PushedImage, tmp_path: Path) -> None:
    """Through the pipeline: the stages a pull reports mid-build see it paused."""
    gc.enable()
    during: dict[str, bool] = {}

    class Watching(Reporter):
        def stage(self, stage: str, detail: str = "") -> None:
            during[stage] = gc.isenabled()

    with ImageManager(tmp_path / "data") as manager:
        manager.pull(alpine_ref.ref, reporter=Watching())
    assert during["pulling"] is False and during["converting"] is False
    assert gc.isenabled()

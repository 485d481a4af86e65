"""The build queue on its own: concurrency limit, dedupe by key, FIFO positions, failures.

No registry here: the queue runs whatever ``run`` it is given, so these tests
hand it functions that block on events and count who runs at once.
"""

from __future__ import annotations

import threading
import time

import pytest

from hypeman_images.build.options import BuildOptions
from hypeman_images.build.progress import Reporter
from hypeman_images.build.queue import (
    PAUSE_ENV,
    BuildKey,
    BuildQueue,
    FanOutReporter,
    Job,
    PauseHook,
    PausingReporter,
)
from hypeman_images.errors import InvalidArgument, LayerError
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference
from hypeman_images.store.images import ImageStatus

OPTIONS = BuildOptions()


def job(n: int, tag: str = "v1") -> Job:
    digest = Digest("sha256", f"{n:064x}")
    ref = parse_reference(f"127.0.0.1:5000/test/img-{n}:{tag}").with_digest(digest)
    return Job(BuildKey(ref.name, digest), ref, OPTIONS)


class Gate:
    """A ``run`` that blocks until released and records how many ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.running = 0
        self.peak = 0
        self.order: list[BuildKey] = []

    def __call__(self, job: Job) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.order.append(job.key)
        try:
            assert self.release.wait(10)
        finally:
            with self.lock:
                self.running -= 1


def test_never_more_than_the_limit_and_fifo() -> None:
    gate = Gate()
    queue = BuildQueue(gate, concurrency=2)
    jobs = [queue.submit(job(n)) for n in range(5)]
    time.sleep(0.1)
    assert queue.counts() == (3, 2)
    assert [queue.position(j) for j in jobs] == [None, None, 1, 2, 3]
    gate.release.set()
    for j in jobs:
        assert j.wait(10)
    assert gate.peak == 2
    assert gate.order == [j.key for j in jobs]
    assert queue.counts() == (0, 0) and queue.jobs() == []


def test_same_key_is_one_job() -> None:
    gate = Gate()
    queue = BuildQueue(gate, concurrency=2)
    first = queue.submit(job(1))
    again = queue.submit(job(1, tag="other"))
    assert again is first
    assert len(queue.jobs()) == 1
    gate.release.set()
    assert first.wait(10)
    assert len(gate.order) == 1
    # Once finished, the key is free: a new request starts a new build.
    assert queue.submit(job(1)) is not first


def test_failures_are_recorded_and_free_the_slot() -> None:
    def run(j: Job) -> None:
        if j.key.digest.encoded.endswith("1"):
            raise LayerError("layer 1 is corrupt")
        if j.key.digest.encoded.endswith("2"):
            raise RuntimeError("a bug")

    queue = BuildQueue(run, concurrency=1)
    jobs = [queue.submit(job(n)) for n in (1, 2, 3)]
    for j in jobs:
        assert j.wait(10)
    assert isinstance(jobs[0].error, LayerError) and jobs[0].status is ImageStatus.FAILED
    assert isinstance(jobs[1].error, RuntimeError) and jobs[1].status is ImageStatus.FAILED
    assert jobs[2].error is None


def test_close_starts_nothing_more() -> None:
    gate = Gate()
    queue = BuildQueue(gate, concurrency=1)
    running, waiting = queue.submit(job(1)), queue.submit(job(2))
    time.sleep(0.05)
    assert not queue.close(timeout=0.05)
    gate.release.set()
    assert running.wait(10)
    assert queue.close(timeout=5)
    assert not waiting.done.is_set() and waiting.status is ImageStatus.PENDING


def test_job_answers_its_tags_and_digest() -> None:
    j = job(7)
    j.add_name(parse_reference("127.0.0.1:5000/test/img-7:latest"))
    assert j.answers(parse_reference("127.0.0.1:5000/test/img-7:v1"))
    assert j.answers(parse_reference("127.0.0.1:5000/test/img-7:latest"))
    assert j.answers(parse_reference(f"127.0.0.1:5000/test/img-7@{j.key.digest}"))
    assert not j.answers(parse_reference("127.0.0.1:5000/test/img-7:other"))
    assert not j.answers(parse_reference(f"127.0.0.1:5000/test/img-8@{j.key.digest}"))
    assert [str(n) for n in j.names] == [
        "127.0.0.1:5000/test/img-7:v1",
        "127.0.0.1:5000/test/img-7:latest",
    ]


def test_concurrency_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        BuildQueue(lambda j: None, concurrency=0)


class Recorder(Reporter):
    def __init__(self) -> None:
        self.events: list[str] = []

    def stage(self, stage: str, detail: str = "") -> None:
        self.events.append(f"stage {stage}")

    def converted(self, nbytes: int, total: int) -> None:
        self.events.append(f"converted {nbytes}/{total}")


def test_fan_out_reaches_every_attached_reporter() -> None:
    fan = FanOutReporter()
    one, two = Recorder(), Recorder()
    fan.attach(one)
    fan.stage("pulling")
    fan.attach(two)
    fan.converted(1, 2)
    assert one.events == ["stage pulling", "converted 1/2"]
    assert two.events == ["converted 1/2"]


def test_pause_hook_reads_one_variable_and_checks_it() -> None:
    assert PauseHook.from_env({}).stage is None
    assert PauseHook.from_env({PAUSE_ENV: "mke2fs"}).stage == "mke2fs"
    with pytest.raises(
        InvalidArgument, match="resolving, pulling, flattening, mke2fs, metadata, tagging"
    ):
        PauseHook.from_env({PAUSE_ENV: "nowhere"})


def test_pausing_reporter_parks_the_build_at_its_stage() -> None:
    inner = Recorder()
    reporter = PausingReporter(inner, PauseHook("mke2fs"))
    reporter.stage("converting")  # flattening: not this hook's stage, passes
    parked = threading.Thread(target=reporter.converted, args=(1, 10), daemon=True)
    parked.start()
    parked.join(0.3)
    assert parked.is_alive(), "the hook should block the build thread for good"
    assert inner.events == ["stage converting", "converted 1/10"]

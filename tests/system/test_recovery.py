"""Crash recovery with real kills: ``serve`` is parked at a stage, ``kill -9``ed, restarted.

The test hook ``HYPEMAN_TEST_PAUSE_AT=<stage>`` (hypeman_images.build.queue.PauseHook)
makes the build block forever at a known point and log that it did. The whole
process group (serve and any mke2fs it runs) then gets SIGKILL. A fresh
``serve`` must resume the build, set the tag, and after ``gc`` the data dir must
hold exactly one ready disk that passes ``e2fsck -fn`` and the blobs it needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support.disk import e2fsck_clean
from support.push import push_manifest
from support.pushed import PushedImage
from support.service import CLI, ServeProcess, serve_process, wait_for_status

from hypeman_images.build.queue import PAUSE_ENV, PAUSE_STAGES

pytestmark = pytest.mark.slow


def state(data_dir: Path, image: PushedImage) -> tuple[dict[str, object], Path]:
    directory = (
        data_dir / "images" / image.registry.host / image.repository / image.manifest_digest[7:]
    )
    return json.loads((directory / "metadata.json").read_text()), directory


def no_ready_without_a_valid_disk(data_dir: Path) -> None:
    for meta in (data_dir / "images").rglob("metadata.json"):
        if json.loads(meta.read_text())["status"] == "ready":
            e2fsck_clean(meta.parent / "rootfs.ext4")


def every_file(data_dir: Path) -> set[str]:
    return {
        p.relative_to(data_dir).as_posix()
        for p in data_dir.rglob("*")
        if p.is_file() or p.is_symlink()
    }


# Per stage: the status metadata.json shows while the build is parked there (None:
# no record yet), and the status GET /images/{name} shows (None: 404, nothing
# accepted yet). The API says ready only once every tag is set, so "metadata"
# and "tagging" still answer converting.
STAGES = {
    "resolving": (None, None),
    "pulling": ("pulling", "pulling"),
    "flattening": ("converting", "converting"),
    "mke2fs": ("converting", "converting"),
    "metadata": ("converting", "converting"),
    "tagging": ("ready", "converting"),
}


@contextlib.contextmanager
def parked_at_pulling(
    data_dir: Path, log: Path, image: PushedImage, *flags: str
) -> Iterator[tuple[ServeProcess, httpx.Client]]:
    """``serve`` (with ``flags``) that accepted a build of ``image`` and is parked
    half-way through its download."""
    with (
        serve_process(data_dir, log, *flags, env={PAUSE_ENV: "pulling"}) as served,
        httpx.Client(timeout=30) as client,
    ):
        posted = client.post(f"{served.url}/images", json={"name": image.ref})
        assert posted.status_code == 202, posted.text
        served.wait_for_output("paused at pulling")
        yield served, client


@contextlib.contextmanager
def paused_cli_pull(data_dir: Path, image: PushedImage, log: Path) -> Iterator[None]:
    """A CLI ``pull`` of ``image`` parked at mke2fs while the body runs, then killed with -9."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [CLI, "pull", "--data-dir", str(data_dir), image.ref],
            stdout=out,
            stderr=out,
            env={**os.environ, PAUSE_ENV: "mke2fs"},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "paused at mke2fs" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield
    finally:
        os.killpg(process.pid, 9)
        process.wait(10)


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_mid_stage_then_restart_finishes(
    stage: str, alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    assert set(STAGES) == set(PAUSE_STAGES), "every stage the hook knows is killed here"
    on_disk, live = STAGES[stage]
    log = tmp_path / "serve.log"
    directory = (
        data_dir / "images" / alpine_ref.registry.host / alpine_ref.repository
    ) / alpine_ref.manifest_digest[7:]
    disk = directory / "rootfs.ext4"
    with (
        serve_process(data_dir, log, env={PAUSE_ENV: stage}) as served,
        httpx.Client(timeout=30) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        # From a thread: parked at "resolving", the POST is answered only after the kill.
        posted = pool.submit(
            httpx.post, f"{served.url}/images", json={"name": alpine_ref.ref}, timeout=60
        )
        served.wait_for_output(f"paused at {stage}")
        shown = client.get(f"{served.url}/images/{alpine_ref.ref}")
        if live is None:
            assert shown.status_code == 404, shown.text
        else:
            assert shown.status_code == 200, shown.text
            assert shown.json()["status"] == live
            response = posted.result(10)
            assert response.status_code == 202, response.text
        if on_disk is None:
            assert not directory.exists(), "nothing is recorded before the name is resolved"
        else:
            assert state(data_dir, alpine_ref)[0]["status"] == on_disk
        if stage == "mke2fs":
            assert not disk.exists()
            temps = [
                p for p in directory.iterdir() if p.name.startswith(".") and "rootfs" in p.name
            ]
            assert temps, "mke2fs's temp disk should exist"
        if stage == "metadata":
            # The disk is in place and "ready" is written, but only to a temp file.
            assert disk.is_file()
            [temp] = directory.glob(".tmp-metadata.json.*")
            assert json.loads(temp.read_text())["status"] == "ready"
        served.kill()
        if live is None:
            with pytest.raises(httpx.TransportError):
                posted.result(10)  # the asker learns the request was not taken

    tag = directory.parent / alpine_ref.tag
    assert not tag.exists(), "no tag link before the build was ready and linked"
    no_ready_without_a_valid_disk(data_dir)

    with serve_process(data_dir, log) as served, httpx.Client(timeout=30) as client:
        if live is None:
            # Nothing was accepted, so nothing resumes: the asker asks again.
            assert client.get(f"{served.url}/images/{alpine_ref.ref}").status_code == 404
            again = client.post(f"{served.url}/images", json={"name": alpine_ref.ref})
            assert again.status_code == 202, again.text
        ready = wait_for_status(client, served.url, alpine_ref.ref, {"ready", "failed"})
        assert ready["status"] == "ready", ready["error"]
        assert ready["local_names"] == [alpine_ref.tag]
    assert os.readlink(tag) == alpine_ref.manifest_digest[7:]
    e2fsck_clean(disk)
    assert state(data_dir, alpine_ref)[0]["status"] == "ready"

    gc = subprocess.run(
        [CLI, "gc", "--json", "--data-dir", str(data_dir)], capture_output=True, text=True
    )
    assert gc.returncode == 0, gc.stderr
    layer = alpine_ref.image.manifest_digest, alpine_ref.image.config_digest
    blobs = {f"cache/blobs/sha256/{d[7:]}" for d in layer}
    blobs |= {f"cache/blobs/sha256/{d.digest[7:]}" for d in alpine_ref.image.layers}
    blobs |= {f"cache/scans/sha256/{d.digest[7:]}" for d in alpine_ref.image.layers}
    build = directory.relative_to(data_dir).as_posix()
    assert every_file(data_dir) == blobs | {
        "cache/index.json",
        "cache/oci-layout",
        "cache/.lock",
        "cache/e2fsprogs.json",
        f"{build}/.lock",
        f"{build}/metadata.json",
        f"{build}/rootfs.ext4",
        tag.relative_to(data_dir).as_posix(),
    }


def test_kill_with_a_build_queued_then_restart_finishes_both(
    alpine_ref: PushedImage, busybox_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    # One build at a time: alpine is parked mid-download, busybox waits behind it.
    # Only busybox's "pending" record says it was asked for; the restart must build it.
    log = tmp_path / "serve.log"
    with parked_at_pulling(data_dir, log, alpine_ref, "--concurrency", "1") as (served, client):
        queued = client.post(f"{served.url}/images", json={"name": busybox_ref.ref})
        assert queued.status_code == 202, queued.text
        assert (queued.json()["status"], queued.json()["queue_position"]) == ("pending", 1)
        shown = client.get(f"{served.url}/images/{busybox_ref.ref}").json()
        assert (shown["status"], shown["queue_position"]) == ("pending", 1)
        assert state(data_dir, busybox_ref)[0]["status"] == "pending"
        assert state(data_dir, alpine_ref)[0]["status"] == "pulling"
        served.kill()

    with serve_process(data_dir, log, "--concurrency", "1") as served, httpx.Client() as client:
        for image in (alpine_ref, busybox_ref):
            ready = wait_for_status(client, served.url, image.ref, {"ready", "failed"})
            assert ready["status"] == "ready", ready["error"]
            assert ready["local_names"] == [image.tag]
    no_ready_without_a_valid_disk(data_dir)
    for image in (alpine_ref, busybox_ref):
        record, directory = state(data_dir, image)
        assert record["status"] == "ready"
        assert os.readlink(directory.parent / image.tag) == image.manifest_digest[7:]
        e2fsck_clean(directory / "rootfs.ext4")


def test_killed_cli_pull_resumes_with_pull(
    alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    with paused_cli_pull(data_dir, alpine_ref, tmp_path / "pull.log"):
        pass  # killed with -9 while it converts
    record, directory = state(data_dir, alpine_ref)
    assert record["status"] == "converting"
    again = subprocess.run(
        [CLI, "pull", "--data-dir", str(data_dir), alpine_ref.ref], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    e2fsck_clean(Path(again.stdout.strip()))
    # The resumed build replaced nothing half-made: only the final disk is left after gc.
    subprocess.run([CLI, "gc", "--data-dir", str(data_dir)], check=True, capture_output=True)
    assert sorted(p.name for p in directory.iterdir()) == [".lock", "metadata.json", "rootfs.ext4"]


def test_recovered_build_keeps_the_free_space_it_was_asked_with(
    alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    # The first server builds with 48 MiB of free space and dies; the second one,
    # started with the default, must finish the build as it was first asked.
    log = tmp_path / "serve.log"
    with parked_at_pulling(data_dir, log, alpine_ref, "--free-space", "48M") as (served, _):
        served.kill()
    assert state(data_dir, alpine_ref)[0]["free_space_bytes"] == 48 << 20
    with serve_process(data_dir, log) as served, httpx.Client(timeout=30) as client:
        ready = wait_for_status(client, served.url, alpine_ref.ref, {"ready", "failed"})
        assert ready["status"] == "ready", ready["error"]
    _, directory = state(data_dir, alpine_ref)
    dumpe2fs = subprocess.run(
        ["dumpe2fs", "-h", str(directory / "rootfs.ext4")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    free = next(line for line in dumpe2fs.splitlines() if line.startswith("Free blocks:"))
    assert int(free.split()[-1]) * 4096 >= 48 << 20


@pytest.mark.parametrize("stage", ["pulling", "tagging"])
def test_every_tag_that_joined_a_build_survives_a_crash(
    stage: str, alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    # Two tags of one digest asked for while it builds: one build, two tags.
    # Killed mid-build (or between "ready" and the links), the restarted
    # service must set both, not only the first asker's.
    other = f"{alpine_ref.registry.host}/{alpine_ref.repository}:also-{stage}"
    push_manifest(
        alpine_ref.registry.url,
        alpine_ref.repository,
        f"also-{stage}",
        alpine_ref.image.manifest,
        alpine_ref.image.manifest_media_type,
    )
    log = tmp_path / "serve.log"
    with (
        serve_process(data_dir, log, env={PAUSE_ENV: stage}) as served,
        httpx.Client(timeout=30) as client,
    ):
        assert client.post(f"{served.url}/images", json={"name": alpine_ref.ref}).status_code == 202
        if stage == "pulling":
            served.wait_for_output(f"paused at {stage}")
        joined = client.post(f"{served.url}/images", json={"name": other})
        assert joined.status_code == 202, joined.text
        served.wait_for_output(f"paused at {stage}")
        record, directory = state(data_dir, alpine_ref)
        assert record["pending_tags"] == [other]
        served.kill()

    with serve_process(data_dir, log) as served, httpx.Client(timeout=30) as client:
        for name in (alpine_ref.ref, other):
            ready = wait_for_status(client, served.url, name, {"ready", "failed"})
            assert ready["status"] == "ready", ready["error"]
    for tag in (alpine_ref.tag, f"also-{stage}"):
        assert os.readlink(directory.parent / tag) == alpine_ref.manifest_digest[7:]
    record, _ = state(data_dir, alpine_ref)
    assert record["status"] == "ready" and record["pending_tags"] == []


def test_killed_cli_pull_shows_interrupted_and_gc_removes_it(
    alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    # No serve will resume it: `list` must say what it is, and gc must take it
    # (its build dir and its blobs), not keep a "converting" build forever.
    d = ("--data-dir", str(data_dir))
    with paused_cli_pull(data_dir, alpine_ref, tmp_path / "pull.log"):
        alive = json.loads(subprocess.check_output([CLI, "list", "--json", *d]))
        assert [i["status"] for i in alive] == ["converting"], "its process still runs"
    record, directory = state(data_dir, alpine_ref)
    assert record["status"] == "converting"

    [shown] = json.loads(subprocess.check_output([CLI, "list", "--json", *d]))
    assert shown["status"] == "failed" and shown["error"].startswith("interrupted"), shown
    gc = json.loads(subprocess.check_output([CLI, "gc", "--json", *d]))
    assert gc["directories_removed"] == 1 and gc["blobs_removed"] >= 2, gc
    assert not directory.exists()
    assert json.loads(subprocess.check_output([CLI, "list", "--json", *d])) == []

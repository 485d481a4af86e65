"""Load: many API clients at once, and a soak of pull/delete/gc cycles.

The server is the real thing: ``hypeman-images serve`` in a subprocess, on
127.0.0.1, in front of the session registry. ``mke2fs`` on its PATH is a
wrapper that logs when each run starts and ends, which tells how many builds
ran (one per digest, however many asked) and how many at once (never more
than ``--concurrency``). Resource use is read from ``/proc/<pid>``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from support.hostile import store_problems, unexpected_paths
from support.images import alpine_edge, make_image, make_layer, push_image
from support.pushed import PushedImage
from support.registry import RegistryServer, free_port
from support.tar import directory, file

CLI = str(Path(sys.executable).with_name("hypeman-images"))
CONCURRENCY = 2
CLIENTS = 50
TOKEN = "load-test-token-4c1f"


@dataclass
class Server:
    url: str
    pid: int
    data_dir: Path
    mke2fs_log: Path
    headers: dict[str, str]

    def proc(self, name: str) -> str:
        return Path(f"/proc/{self.pid}/{name}").read_text()

    def status_field(self, field: str) -> int:
        for line in self.proc("status").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def builds(self) -> list[tuple[float, float]]:
        """(start, end) of every mke2fs run that built a disk."""
        starts: dict[str, float] = {}
        runs = []
        for line in self.mke2fs_log.read_text().splitlines():
            kind, pid, stamp = line.split()
            if kind == "start":
                starts[pid] = float(stamp)
            else:
                runs.append((starts.pop(pid), float(stamp)))
        return runs


def mke2fs_logger(directory: Path, log: Path) -> Path:
    """A directory whose ``mke2fs`` logs start/end of real builds around the real one."""
    real = shutil.which("mke2fs") or "/sbin/mke2fs"
    directory.mkdir()
    for tool in ("debugfs", "e2fsck", "dumpe2fs"):
        (directory / tool).symlink_to(shutil.which(tool) or f"/sbin/{tool}")
    script = directory / "mke2fs"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *-V*|*hypeman-probe-*) exec {real} "$@";; esac\n'
        f'echo "start $$ $(date +%s.%N)" >> {log}\n'
        f'{real} "$@"; rc=$?\n'
        f'echo "end $$ $(date +%s.%N)" >> {log}\n'
        "exit $rc\n"
    )
    script.chmod(0o755)
    return directory


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    data_dir = tmp_path / "data"
    log = tmp_path / "mke2fs.log"
    log.touch()
    bin_dir = mke2fs_logger(tmp_path / "bin", log)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    process = subprocess.Popen(
        [CLI, "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
         "--token-file", str(token_file), "--concurrency", str(CONCURRENCY)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.log").open("wb"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, "serve did not come up"
        time.sleep(0.1)
    try:
        yield Server(url, process.pid, data_dir, log, {"Authorization": f"Bearer {TOKEN}"})
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def five_images(
    registry: RegistryServer,
    alpine_ref: PushedImage,
    busybox_ref: PushedImage,
    multilayer_ref: PushedImage,
) -> list[str]:
    """Five distinct images in the registry, by reference."""
    push_image(registry.url, "library/alpine", "edge", alpine_edge())
    small = make_image(
        [make_layer([directory("app"), file("app/run", b"#!/bin/sh\necho hi\n", mode=0o755)])],
        cmd=["/app/run"],
    )
    push_image(registry.url, "load/small", "v1", small)
    return [
        alpine_ref.ref,
        busybox_ref.ref,
        multilayer_ref.ref,
        f"{registry.host}/library/alpine:edge",
        f"{registry.host}/load/small:v1",
    ]


def wait_ready(client: httpx.Client, server: Server, name: str, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"{server.url}/images/{quote(name, safe='/:@')}")
        assert response.status_code == 200, response.text
        doc = response.json()
        if doc["status"] in ("ready", "failed"):
            return doc  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)


def test_fifty_clients_five_images(server: Server, five_images: list[str]) -> None:
    """50 concurrent clients: all answered, each digest built once, never over the limit."""
    barrier = threading.Barrier(CLIENTS)

    def one_client(i: int) -> tuple[int, dict]:  # type: ignore[type-arg]
        name = five_images[i % len(five_images)]
        with httpx.Client(headers=server.headers, timeout=60) as client:
            barrier.wait()
            created = client.post(f"{server.url}/images", json={"name": name})
            assert created.status_code in (200, 202), created.text
            return created.status_code, wait_ready(client, server, name)

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = list(pool.map(one_client, range(CLIENTS)))

    assert len(results) == CLIENTS
    docs = [doc for _, doc in results]
    assert all(doc["status"] == "ready" for doc in docs), [
        d for d in docs if d["status"] != "ready"
    ]
    digests = {doc["digest"] for doc in docs}
    assert len(digests) == len(five_images)
    # Each digest built once: one mke2fs run per digest, whatever the number of askers.
    runs = server.builds()
    assert len(runs) == len(five_images), runs
    # The concurrency limit: never more than CONCURRENCY mke2fs at the same moment.
    events = sorted([(s, 1) for s, _ in runs] + [(e, -1) for _, e in runs])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= CONCURRENCY
    # Memory bounded: the server's high-water mark stays well under what 5 images weigh.
    assert server.status_field("VmHWM") < 400 * 1024, f"VmHWM {server.status_field('VmHWM')} kB"
    listed = httpx.get(f"{server.url}/images", headers=server.headers).json()
    assert {doc["digest"] for doc in listed} == digests
    assert store_problems(server.data_dir) == []


def test_soak_pull_delete_gc(server: Server, five_images: list[str]) -> None:
    """Repeated pull/delete/gc: fds, threads and disk use come back to where they were."""
    name = five_images[4]
    samples = []
    with httpx.Client(headers=server.headers, timeout=60) as client:
        for cycle in range(8):
            assert client.post(f"{server.url}/images", json={"name": name}).status_code in (
                200,
                202,
            )
            assert wait_ready(client, server, name)["status"] == "ready"
            deleted = client.delete(f"{server.url}/images/{quote(name, safe='/:@')}")
            assert deleted.status_code == 204, deleted.text
            subprocess.run(
                [CLI, "gc", "--data-dir", str(server.data_dir)], check=True, capture_output=True
            )
            if cycle >= 2:  # after warm-up (imports, connection pools, the first build)
                samples.append((server.fds(), server.status_field("Threads"), du(server.data_dir)))
    fds, threads, disk = zip(*samples, strict=True)
    assert max(fds) <= min(fds) + 2, fds
    assert max(threads) <= min(threads) + 2, threads
    assert max(disk) == min(disk), disk
    assert unexpected_paths(server.data_dir) == []
    assert store_problems(server.data_dir) == []


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and p.name != ".lock")


def test_soak_in_process_manager(
    registry: RegistryServer, five_images: list[str], data_dir: Path
) -> None:
    """The same soak through ImageManager in this process: /proc/self/fd and threads stay flat."""
    from support.hostile import open_fds

    from hypeman_images.build.manager import ImageManager

    name = five_images[4]
    samples = []
    with ImageManager(data_dir) as manager:
        for cycle in range(8):
            manager.pull(name)
            manager.delete(name)
            manager.gc()
            if cycle >= 2:
                samples.append((len(open_fds()), threading.active_count(), du(data_dir)))
    fds, threads, disk = zip(*samples, strict=True)
    assert max(fds) <= min(fds) + 1, fds
    assert max(threads) <= min(threads) + 1, threads
    assert max(disk) == min(disk), disk

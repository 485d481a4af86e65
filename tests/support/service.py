"""Run the image service for tests: in a thread (uvicorn) or as a ``serve`` process.

Both listen on 127.0.0.1. The thread variant binds its socket before uvicorn
starts (port 0), so there is no window for another process to take the port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from hypeman_images.build.manager import ImageManager
from hypeman_images.service.api import create_app

from .images import make_image, make_layer, push_image
from .registry import RegistryServer, free_port
from .tar import directory, file

_BIND_ATTEMPTS = 5
CLI = str(Path(sys.executable).with_name("hypeman-images"))


@contextmanager
def serve_in_thread(
    manager: ImageManager, token: str | None = None, **app_options: Any
) -> Iterator[str]:
    """Serve ``manager``'s API from a thread; yield its base URL.

    ``app_options`` go to ``create_app`` (``limits``, ``hosts``).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(manager, token=token, **app_options), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class ServeProcess:
    """A ``hypeman-images serve`` subprocess; its stderr goes to ``log``."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen in {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """``kill -9`` the process group: serve and any mke2fs it started."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def serve_process(
    data_dir: Path, log: Path, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[ServeProcess]:
    """Start ``serve`` on a free port and wait for ``/healthz``; stop it on exit.

    The port was free when picked; if something else binds it first (another
    test session), serve exits with "address already in use" and another
    port is tried.
    """
    for _ in range(_BIND_ATTEMPTS):
        port = free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                [CLI, "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        served = ServeProcess(process, f"http://127.0.0.1:{port}", log)
        try:
            wait_healthy(served)
        except AssertionError:
            served.stop()
            if "address already in use" not in served.output():
                raise
            continue
        break
    else:
        raise AssertionError(f"no free port after {_BIND_ATTEMPTS} attempts:\n{served.output()}")
    try:
        yield served
    finally:
        served.stop()


def wait_healthy(served: ServeProcess, timeout: float = 20) -> None:
    """Wait for ``GET /healthz`` to answer 200; AssertionError if serve exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if served.process.poll() is not None:
            raise AssertionError(f"serve exited {served.process.returncode}:\n{served.output()}")
        try:
            if httpx.get(f"{served.url}/healthz", timeout=1).status_code == 200:
                # The answer may come from whoever won the port: ours must still be up.
                if served.process.poll() is None:
                    return
                continue
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"serve not healthy after {timeout}s:\n{served.output()}")
        time.sleep(0.05)


def wait_for_status(
    client: httpx.Client, base: str, name: str, statuses: set[str], timeout: float = 60
) -> dict[str, Any]:
    """Poll ``GET /images/{name}`` until its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"{base}/images/{name}")
        if response.status_code == 200 and response.json()["status"] in statuses:
            doc: dict[str, Any] = response.json()
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not {statuses} after {timeout}s: {response.text}")
        time.sleep(0.05)


def push_small_images(registry: RegistryServer, prefix: str, count: int) -> list[str]:
    """Push ``count`` distinct one-file images; return their references."""
    refs = []
    for i in range(count):
        layer = make_layer([directory("etc"), file(f"etc/{prefix}-{i}", f"image {i}\n".encode())])
        image = make_image([layer], cmd=["/bin/true"], env=[f"INDEX={i}"], working_dir="/etc")
        push_image(registry.url, f"test/{prefix}-{i}", "v1", image)
        refs.append(f"{registry.host}/test/{prefix}-{i}:v1")
    return refs


__all__ = [
    "CLI",
    "ServeProcess",
    "push_small_images",
    "serve_in_thread",
    "serve_process",
    "wait_for_status",
    "wait_healthy",
]

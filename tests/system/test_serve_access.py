"""Who ``serve`` answers: without a token, loopback only and its own names in ``Host``.

A browser on the same host would otherwise let any web page drive the API:
a page at ``attacker.example`` whose name is rebound to 127.0.0.1 sends its
requests there, with ``Host: attacker.example``. docs/security.md, "Who can reach the API".
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.rawhttp import connect, head, read_answer
from support.registry import free_port
from support.service import CLI, ServeProcess, serve_process


@pytest.mark.parametrize("address", ["0.0.0.0", "[::]", "192.0.2.1"])
def test_without_a_token_only_loopback(tmp_path: Path, address: str) -> None:
    data = tmp_path / "data"
    result = subprocess.run(
        [CLI, "serve", "--data-dir", str(data), "--listen", f"{address}:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "without --token-file" in result.stderr and "127.0.0.1" in result.stderr
    assert not data.exists()


def status_for(served: ServeProcess, host: str, headers: dict[str, str] | None = None) -> int:
    with connect(served.url) as sock:
        sock.sendall(head("GET", "/images", {"Host": host, **(headers or {})}))
        return read_answer(sock, timeout=5).status


def test_without_a_token_only_its_own_names(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with serve_process(tmp_path / "data", log, "--allowed-host", "build-box.internal") as served:
        port = served.url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "build-box.internal"):
            assert status_for(served, host) == 200, host
        for host in (f"attacker.example:{port}", "localhost.attacker.example", ""):
            assert status_for(served, host) == 421, host


def test_with_a_token_any_name_with_the_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("access-token\n")
    token.chmod(0o600)
    log = tmp_path / "serve.log"
    with serve_process(tmp_path / "data", log, "--token-file", str(token)) as served:
        good = {"Authorization": "Bearer access-token"}
        assert status_for(served, "hypeman.example:8080", good) == 200
        assert status_for(served, "hypeman.example:8080") == 401

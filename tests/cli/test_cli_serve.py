"""``serve``'s log as an operator reads it: one key=value line per request and per build change.

And the refusal an operator meets when the API would be open to the
network without a token.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import httpx
from support.pushed import PushedImage
from support.service import CLI, serve_process, wait_for_status

from hypeman_images.cli.servelog import logfmt_value

LINE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    """One logfmt line as a mapping (quoted values unquoted)."""
    return {k: v[1:-1] if v.startswith('"') else v for k, v in LINE.findall(line)}


def test_one_line_per_request_and_per_build_state(
    alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with serve_process(data_dir, log) as served, httpx.Client(timeout=30) as http:
        before = served.output().count("\n")
        created = http.post(f"{served.url}/images", json={"name": alpine_ref.ref})
        assert created.status_code == 202, created.text
        wait_for_status(http, served.url, alpine_ref.ref, {"ready"})
        missing = http.get(f"{served.url}/images/nothing%0Ahere:1")
        assert missing.status_code in (400, 404)
    lines = served.output().splitlines()
    assert all(line.startswith("time=") for line in lines), lines
    parsed = [fields(line) for line in lines[before:]]

    posts = [f for f in parsed if f.get("method") == "POST"]
    assert len(posts) == 1
    (post,) = posts
    assert post["path"] == "/images" and post["status"] == "202" and post["level"] == "info"
    assert float(post["duration_ms"]) >= 0 and post["client"].startswith("127.0.0.1:")
    # A path with a newline stays on its line, quoted.
    (odd,) = [f for f in parsed if f.get("path", "").startswith("/images/nothing")]
    assert odd["path"] == "/images/nothing\\nhere:1"

    builds = [f for f in parsed if f.get("msg", "").startswith("build of ")]
    states = [f["status"] for f in builds]
    assert states[0] == "pending" and states[-1] == "ready", states
    assert "pulling" in states and len(states) == len(set(states)), states
    assert all(f["image"] == alpine_ref.ref for f in builds)
    assert all(f["digest"] == alpine_ref.manifest_digest for f in builds)


def test_a_failed_build_logs_why(alpine_ref: PushedImage, data_dir: Path, tmp_path: Path) -> None:
    missing = f"{alpine_ref.registry.host}/library/alpine:nope"
    with serve_process(data_dir, tmp_path / "serve.log") as served, httpx.Client() as http:
        assert http.post(f"{served.url}/images", json={"name": missing}).status_code == 404
    (line,) = [fields(line) for line in served.output().splitlines() if "method=POST" in line]
    assert line["status"] == "404" and line["path"] == "/images"


def test_verbose_serve_logs_debug_lines(data_dir: Path, tmp_path: Path) -> None:
    with serve_process(data_dir, tmp_path / "serve.log", "-v") as served:
        httpx.get(f"{served.url}/healthz")
    output = served.output()
    assert "level=debug" in output
    assert all(line.startswith("time=") for line in output.splitlines())
    assert "color_message" not in output and "\x1b" not in output  # uvicorn's coloured copy


def test_beyond_loopback_without_a_token_is_refused_in_one_line(data_dir: Path) -> None:
    """Stricter than a warning: without a token, an address others can reach is refused."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [CLI, "serve", "--data-dir", str(data_dir), "--listen", f"0.0.0.0:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--token-file" in result.stderr


def test_logfmt_values_quote_what_is_not_a_plain_word() -> None:
    assert logfmt_value("docker.io/library/alpine:3.20") == "docker.io/library/alpine:3.20"
    assert logfmt_value("two words") == '"two words"'
    assert logfmt_value('say "hi"\n\x1b[31m') == '"say \\"hi\\"\\n\\u001b[31m"'
    assert logfmt_value("k=v") == '"k=v"'

"""The CLI in a subprocess: exit codes, --json, plain progress when piped, help texts."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from support.commands import COMMANDS
from support.pushed import PushedImage
from support.service import CLI
from support.terminal import run_in_terminal

from hypeman_images.errors import exit_codes

ANSI = re.compile(r"\x1b\[")
NO_JSON = {"serve", "login", "logout"}  # they print no data


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
    )


def test_top_level_help_lists_commands_and_exit_codes() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert "exit codes:" in result.stdout and "3 not found" in result.stdout


def test_the_exit_code_table_in_help_is_the_one_of_errors_py() -> None:
    """``--help`` prints errors.exit_codes(), not a list of its own that could drift."""
    result = run("--help")
    lines = result.stdout.split("exit codes:\n", 1)[1].splitlines()
    rows = [re.fullmatch(r" +(\d+) (.+)", line) for line in lines]
    printed = [(int(row[1]), row[2]) for row in itertools.takewhile(bool, rows) if row]
    assert printed == exit_codes()
    assert (0, "ok") in printed and (130, "interrupted") in printed


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_explains_itself_with_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout
    assert f"hypeman-images {command}" in result.stdout.split("examples:")[1]
    assert ("--json" in result.stdout) == (command not in NO_JSON)


@pytest.mark.parametrize(
    "args",
    [(), ("pull",), ("nope",), ("list", "--bogus"), ("serve", "--concurrency", "two")],
    ids=["no-command", "missing-image", "unknown-command", "unknown-option", "bad-int"],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "error:" in result.stderr and "--help" in result.stderr


def test_pull_on_a_terminal_draws_progress_bars(alpine_ref: PushedImage, data_dir: Path) -> None:
    drawn = run_in_terminal([CLI, "pull", "--data-dir", str(data_dir), alpine_ref.ref])
    code, screen, out = drawn.code, drawn.drawn, drawn.stdout
    assert code == 0, screen
    layer = alpine_ref.image.layers[0].digest
    assert ANSI.search(screen), "rich draws with escape sequences on a terminal"
    assert "━" in screen, "a bar"
    assert layer[7:19] in screen and "converting" in screen
    assert re.search(r"\d+(\.\d+)?/\d+(\.\d+)? [KM]iB", screen), "bytes done / total"
    assert f"layer {layer[7:19]}: downloading" not in screen, "not the plain lines of a pipe"
    # stdout, a pipe, stays plain: the disk's path only.
    assert not ANSI.search(out) and Path(out.strip()).is_file()


def test_pull_piped_is_plain_and_json_everywhere(alpine_ref: PushedImage, data_dir: Path) -> None:
    d = ("--data-dir", str(data_dir))
    pulled = run("pull", *d, alpine_ref.ref)
    assert pulled.returncode == 0, pulled.stderr
    assert not ANSI.search(pulled.stderr + pulled.stdout)
    assert "pulling:" in pulled.stderr and "converting" in pulled.stderr
    assert re.search(r"^layer \S+: (downloading|cached)", pulled.stderr, re.M)
    disk = Path(pulled.stdout.strip())
    assert disk.is_file()

    doc = json.loads(run("pull", *d, "--json", alpine_ref.ref).stdout)
    assert doc["status"] == "ready" and doc["disk"] == str(disk)

    listed = json.loads(run("list", *d, "--json").stdout)
    assert [i["digest"] for i in listed] == [alpine_ref.manifest_digest]
    assert listed[0]["size_bytes"] == disk.stat().st_size

    table = run("list", *d)
    assert table.returncode == 0 and "MiB" in table.stdout and "ready" in table.stdout
    assert not ANSI.search(table.stdout)

    inspected = json.loads(run("inspect", *d, "--json", alpine_ref.ref).stdout)
    assert inspected["cmd"] == ["/bin/sh"] and inspected["tags"] == ["3.20.3"]
    human = run("inspect", *d, alpine_ref.ref).stdout
    assert "status:" in human and "PATH=" in human

    gc = json.loads(run("gc", *d, "--json").stdout)
    assert set(gc) == {"blobs_removed", "directories_removed", "scans_removed", "bytes_freed"}

    removed = json.loads(run("rm", *d, "--json", alpine_ref.ref).stdout)
    assert removed == {"removed": [alpine_ref.ref, alpine_ref.digest_ref]}
    assert json.loads(run("list", *d, "--json").stdout) == []
    # The image is gone: its layer blob goes, and the layer's scan with it.
    gc = json.loads(run("gc", *d, "--json").stdout)
    assert gc["blobs_removed"] >= 1 and gc["scans_removed"] == 1, gc


@pytest.mark.parametrize(
    ("args", "code", "kind"),
    [
        (("inspect", "--json", "127.0.0.1:1/never/pulled:1"), 3, "not_found"),
        (("rm", "--json", "127.0.0.1:1/never/pulled:1"), 3, "not_found"),
        (("inspect", "--json", "Not/A/Name"), 2, "invalid_name"),
        (("pull", "--json", "--platform", "linux/", "alpine"), 2, "invalid_platform"),
    ],
    ids=["inspect-unknown", "rm-unknown", "invalid-name", "bad-platform"],
)
def test_errors_have_exit_codes_and_json(
    data_dir: Path, args: tuple[str, ...], code: int, kind: str
) -> None:
    result = run(*args, "--data-dir", str(data_dir))
    assert result.returncode == code, result.stderr
    assert json.loads(result.stdout)["code"] == kind
    assert result.stderr.count("\n") == 1


def test_unknown_tag_exits_3(alpine_ref: PushedImage, data_dir: Path) -> None:
    host = alpine_ref.registry.host
    result = run("pull", "--data-dir", str(data_dir), f"{host}/library/alpine:nope")
    assert result.returncode == 3
    assert "not found" in result.stderr.lower()


def test_verbose_logs_debug(alpine_ref: PushedImage, data_dir: Path) -> None:
    # An unknown tag: the command talks to the registry, then fails fast (exit 3).
    host = alpine_ref.registry.host
    ref = f"{host}/library/alpine:nope"
    quiet = run("pull", "--data-dir", str(data_dir), ref)
    loud = run("pull", "-v", "--data-dir", str(data_dir), ref)
    assert quiet.returncode == loud.returncode == 3
    assert "DEBUG" not in quiet.stderr and "INFO" not in quiet.stderr
    # What -v adds: how the registry is spoken to (loopback is insecure: TLS is probed).
    assert f"DEBUG hypeman_images.registry.transport: {host}: insecure registry" in loud.stderr
    assert (
        f"INFO hypeman_images.registry.schemes: {host}: insecure registry without TLS"
        in loud.stderr
    )
    # httpx's own request lines need -vv.
    assert "httpx" not in loud.stderr


def test_serve_refuses_a_readable_token_file(tmp_path: Path, data_dir: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)
    result = run("serve", "--data-dir", str(data_dir), "--token-file", str(token))
    assert result.returncode == 2
    assert "chmod 600" in result.stderr and "0644" in result.stderr
    token.chmod(0o600)
    token.write_text("")
    result = run("serve", "--data-dir", str(data_dir), "--token-file", str(token))
    assert result.returncode == 2 and "empty" in result.stderr


@pytest.mark.parametrize("listen", ["nohost", "127.0.0.1:", "127.0.0.1:99999", ":80"])
def test_serve_rejects_bad_listen(data_dir: Path, listen: str) -> None:
    result = run("serve", "--data-dir", str(data_dir), "--listen", listen)
    assert result.returncode == 2 and "--listen" in result.stderr


def test_serve_on_a_taken_port_says_so_and_touches_nothing(data_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 13
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "another process listens there" in result.stderr
    assert "serving on" not in result.stderr  # it never claimed to serve


def test_serve_on_an_address_this_host_lacks(tmp_path: Path, data_dir: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o600)  # without a token, serve refuses any address but loopback first
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a local interface.
    result = run(
        "serve",
        "--data-dir",
        str(data_dir),
        "--token-file",
        str(token),
        "--listen",
        "192.0.2.1:8080",
    )
    assert result.returncode == 13
    assert "no interface of this host has that address" in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_relative_data_dir_works_for_an_image_with_xattrs(
    how: str, multilayer_ref: PushedImage, tmp_path: Path
) -> None:
    # The xattrs go in through debugfs value files under the data dir: a relative
    # data dir must become absolute once, at the edge, not reach debugfs as given.
    # Relative to the test's own working directory, which the CLI inherits.
    reldir = os.path.relpath(tmp_path / "data")
    where = ["--data-dir", reldir] if how == "flag" else []
    pulled = run("pull", *where, multilayer_ref.ref, env={"HYPEMAN_DATA_DIR": reldir})
    assert pulled.returncode == 0, pulled.stderr
    disk = Path(pulled.stdout.strip())
    assert disk.is_absolute() and disk.is_relative_to(tmp_path / "data")
    assert disk.is_file()


def test_gc_refuses_a_symlinked_blob_directory_and_deletes_nothing(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("not a blob")
    data = tmp_path / "data"
    (data / "cache" / "blobs").mkdir(parents=True)
    (data / "cache" / "blobs" / "sha256").symlink_to(elsewhere)
    gc = run("gc", "--data-dir", str(data))
    assert gc.returncode == 10, gc.stderr
    assert "is a symlink" in gc.stderr and "replace it with a directory" in gc.stderr
    assert (elsewhere / "notes.txt").read_text() == "not a blob"

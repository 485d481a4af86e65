"""The disk cache on the command line: where it is configured, and ``disk push`` / ``disk pull``."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from support.fleet import cache_repo
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.service import CLI

from hypeman_images.cli.config import disk_cache
from hypeman_images.cli.parser import build_parser
from hypeman_images.errors import InvalidArgument, NotFound
from hypeman_images.fleet.cache import CacheMode, DiskCache


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def resolved(monkeypatch: pytest.MonkeyPatch, env: str | None, *argv: str) -> DiskCache | None:
    """The disk cache ``pull`` would use with ``argv`` and ``$HYPEMAN_DISK_CACHE`` = ``env``."""
    if env is None:
        monkeypatch.delenv("HYPEMAN_DISK_CACHE", raising=False)
    else:
        monkeypatch.setenv("HYPEMAN_DISK_CACHE", env)
    return disk_cache(build_parser().parse_args(["pull", *argv, "alpine"]))


def test_flag_then_environment_then_registries_conf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text('disk-cache = "conf.lan:5000/disks"\ndisk-cache-mode = "pull"\n')
    with_conf = ("--registries-conf", str(conf))
    assert resolved(monkeypatch, None) is None
    found = resolved(monkeypatch, None, *with_conf)
    assert found is not None and (str(found), found.mode) == ("conf.lan:5000/disks", "pull")
    found = resolved(monkeypatch, "env.lan/disks", *with_conf)
    assert found is not None and (str(found), found.mode) == ("env.lan/disks", "pull")
    found = resolved(monkeypatch, "env.lan/disks", "--disk-cache", "flag.lan/x/disks")
    assert found is not None and (str(found), found.mode) == ("flag.lan/x/disks", "both")
    found = resolved(monkeypatch, None, *with_conf, "--disk-cache-mode", "push")
    assert found is not None and found.mode is CacheMode.PUSH and not found.looks
    assert resolved(monkeypatch, "env.lan/disks", *with_conf, "--disk-cache", "") is None


@pytest.mark.parametrize(
    "value",
    ["disks", "alpine/disks", "reg.lan/disks:v1", "reg.lan/disks@sha256:" + "0" * 64, "Reg.lan"],
)
def test_a_cache_that_is_not_registry_slash_repository_is_refused(value: str) -> None:
    with pytest.raises(InvalidArgument):
        DiskCache.parse(value)


def test_a_malformed_registries_conf_key_names_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text("disk-cache = 5\n")
    result = run("pull", "--registries-conf", str(conf), "--data-dir", str(tmp_path), "alpine")
    assert result.returncode == InvalidArgument.exit_code
    assert str(conf) in result.stderr and "disk-cache" in result.stderr


def test_disk_commands_explain_themselves() -> None:
    for action in ("push", "pull"):
        result = run("disk", action, "--help")
        assert result.returncode == 0 and "--disk-cache" in result.stdout
    assert "examples:" in run("disk", "--help").stdout
    result = run("disk", "push", "--data-dir", "/nonexistent", "alpine")
    assert result.returncode == InvalidArgument.exit_code, result.stderr
    assert "--disk-cache" in result.stderr and result.stderr.count("\n") == 1


def test_push_by_hand_then_pull_by_hand_on_another_host(
    registry: RegistryServer, alpine_ref: PushedImage, tmp_path: Path
) -> None:
    cache = ("--disk-cache", cache_repo(registry.host, "by-hand").name)
    a, b = ("--data-dir", str(tmp_path / "a")), ("--data-dir", str(tmp_path / "b"))
    missing = run("disk", "pull", *b, *cache, alpine_ref.ref)
    assert missing.returncode == NotFound.exit_code, missing.stderr
    assert "holds no disk" in missing.stderr
    built = run("pull", *a, alpine_ref.ref)
    assert built.returncode == 0, built.stderr
    pushed = run("disk", "push", "--json", *a, *cache, alpine_ref.ref)
    assert pushed.returncode == 0, pushed.stderr
    artifact = json.loads(pushed.stdout)
    assert artifact["uploaded"] >= 2 and artifact["indexed"] == "tag"

    fetched = run("disk", "pull", *b, *cache, alpine_ref.ref)
    assert fetched.returncode == 0, fetched.stderr
    assert Path(fetched.stdout.strip()).read_bytes() == Path(built.stdout.strip()).read_bytes()
    table = run("list", *b).stdout.splitlines()
    header, row = (re.split(r"\s{2,}", line) for line in table)
    assert dict(zip(header, row, strict=True))["SOURCE"] == "disk-cache", table
    # An EROFS disk is never the ext4 one: none in the cache until one is pushed.
    erofs = run("disk", "pull", *b, *cache, "--format", "erofs", alpine_ref.ref)
    assert erofs.returncode == NotFound.exit_code, erofs.stderr
    assert "holds no disk" in erofs.stderr
    assert run("pull", *a, "--format", "erofs", alpine_ref.ref).returncode == 0
    pushed = run("disk", "push", *a, *cache, "--format", "erofs", alpine_ref.ref)
    assert pushed.returncode == 0, pushed.stderr
    erofs = run("disk", "pull", *b, *cache, "--format", "erofs", alpine_ref.ref)
    assert erofs.returncode == 0, erofs.stderr
    assert Path(erofs.stdout.strip()).name == "rootfs.erofs"
    shown = run("inspect", *b, alpine_ref.ref).stdout
    assert f"source:       disk-cache ({cache[1]}@{artifact['digest']})" in shown, shown
    assert run("inspect", *a, alpine_ref.ref).stdout.count("source:       build\n") == 1

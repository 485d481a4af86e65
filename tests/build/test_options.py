"""Where the data dir is by default, and what overrides it (docs/configuration.md)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support.pushed import PushedImage
from support.service import CLI

from hypeman_images.build.options import SYSTEM_DATA_DIR, DataDir, default_data_dir

USER = 1000


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        ({"HOME": "/root", "XDG_DATA_HOME": "/xdg"}, 0, SYSTEM_DATA_DIR),
        ({"HOME": "/home/u", "XDG_DATA_HOME": "/xdg"}, USER, Path("/xdg/hypeman")),
        ({"HOME": "/home/u"}, USER, Path("/home/u/.local/share/hypeman")),
        ({"HOME": "/home/u", "XDG_DATA_HOME": ""}, USER, Path("/home/u/.local/share/hypeman")),
        ({"HOME": "/home/u", "XDG_DATA_HOME": "rel"}, USER, Path("/home/u/.local/share/hypeman")),
        ({"HYPEMAN_DATA_DIR": "/d", "XDG_DATA_HOME": "/xdg"}, USER, Path("/d")),
        ({"HYPEMAN_DATA_DIR": "/d"}, 0, Path("/d")),
        ({"HYPEMAN_DATA_DIR": "", "HOME": "/home/u"}, USER, Path("/home/u/.local/share/hypeman")),
    ],
    ids=[
        "root-ignores-xdg",
        "user-xdg",
        "user-home-default",
        "empty-xdg-is-unset",
        "relative-xdg-is-ignored",
        "env-beats-xdg",
        "env-beats-root",
        "empty-env-is-unset",
    ],
)
def test_default_data_dir_rules(env: dict[str, str], euid: int, expected: Path) -> None:
    assert default_data_dir(env, euid) == expected


def test_default_data_dir_reads_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPEMAN_DATA_DIR", "/from/the/environment")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert default_data_dir() == Path("/from/the/environment")
    monkeypatch.delenv("HYPEMAN_DATA_DIR")
    assert default_data_dir(euid=USER) == Path("/xdg/hypeman")


def test_data_dir_option_overrides_everything(alpine_ref: PushedImage, tmp_path: Path) -> None:
    chosen, env_dir, xdg, home = (tmp_path / name for name in ("chosen", "env", "xdg", "home"))
    env = {
        **os.environ,
        "HYPEMAN_DATA_DIR": str(env_dir),
        "XDG_DATA_HOME": str(xdg),
        "HOME": str(home),
    }
    pulled = subprocess.run(
        [CLI, "pull", "--data-dir", str(chosen), alpine_ref.ref],
        capture_output=True,
        text=True,
        env=env,
    )
    assert pulled.returncode == 0, pulled.stderr
    assert Path(pulled.stdout.strip()).is_relative_to(chosen / "images")
    assert not env_dir.exists() and not xdg.exists() and not home.exists()
    # Without the option the environment's dir is used: it has nothing yet.
    listed = subprocess.run([CLI, "list", "--json"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    env["HYPEMAN_DATA_DIR"] = str(chosen)
    listed = subprocess.run([CLI, "list", "--json"], capture_output=True, text=True, env=env)
    assert [doc["digest"] for doc in json.loads(listed.stdout)] == [alpine_ref.manifest_digest]


def test_a_relative_data_dir_is_made_absolute_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/tmp")
    assert DataDir(Path("rel/../data")).root == Path("/tmp/data")
    assert DataDir(Path("rel")).images == Path("/tmp/rel/images")
    assert default_data_dir({"HYPEMAN_DATA_DIR": "rel"}) == Path("/tmp/rel")

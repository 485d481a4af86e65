"""What a command imports: the ones on local images start without the network's code.

Fleet operators script ``list``, ``inspect``, ``rm`` and ``tag``; they read
the store and need neither a registry nor a build, so they must not pay for
httpx, the decompressors, the conversion, the disk cache or the API at
start-up (docs/design.md, "Layout and the import rule": a command imports only
what it uses). Each case runs the CLI in a fresh interpreter and reads its
``sys.modules`` once the command is done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.commands import COMMANDS, SUBCOMMANDS
from support.pushed import PushedImage
from support.service import CLI

from hypeman_images.cli.parser import HANDLERS

# Run as ``python -c PROBE OUT ARGS...``: the CLI on ARGS, then what it imported, into OUT.
PROBE = """
import json, sys
from hypeman_images.cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    code = main(argv)
except SystemExit as exc:  # --help and --version exit from argparse
    code = exc.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(k for k, v in sys.modules.items() if v)}, f)
"""
# What only a registry, a build, the disk cache, ``serve`` or ``boot`` needs.
HEAVY = (
    "httpx",
    "httpcore",
    "h11",
    "zstandard",
    "isal",
    "rich",
    "fastapi",
    "starlette",
    "uvicorn",
    "hypeman_images.registry.client",
    "hypeman_images.build.pull",
    "hypeman_images.build.convert",
    "hypeman_images.build.diskcache",
    "hypeman_images.layers.compression",
    "hypeman_images.service.api",
    "hypeman_images.boot",
)
# The one module of the fleet package a command on local images loads:
# ``--disk-cache-mode``'s choices are its CacheMode (value types, no imports of
# their own); pushing, fetching and packing disks stay out.
FLEET_ALLOWED = {"hypeman_images.fleet", "hypeman_images.fleet.cache"}


def probe(*args: str, tmp_path: Path) -> dict[str, Any]:
    """Run ``hypeman-images ARGS`` in a fresh interpreter: its exit code and its modules."""
    out = tmp_path / "probe.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert out.exists(), result.stderr
    found: dict[str, Any] = json.loads(out.read_text())
    found["stdout"], found["stderr"] = result.stdout, result.stderr
    return found


def heavy(modules: list[str]) -> list[str]:
    """The modules of :data:`HEAVY` (and of the fleet beyond its cache's settings) loaded."""
    loaded = set(modules)
    fleet = {m for m in loaded if m.split(".")[:2] == ["hypeman_images", "fleet"]}
    return sorted((loaded & set(HEAVY)) | (fleet - FLEET_ALLOWED))


@pytest.fixture(scope="module")
def local(alpine_ref: PushedImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding one ready image, pulled from the session's registry."""
    data_dir = tmp_path_factory.mktemp("startup") / "data"
    pulled = subprocess.run(
        [CLI, "pull", "--data-dir", str(data_dir), alpine_ref.ref],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pulled.returncode == 0, pulled.stderr
    return data_dir


LOCAL_COMMANDS = {
    "list": ("list",),
    "list-json": ("list", "--json"),
    "inspect": ("inspect", "{ref}"),
    "inspect-by-id": ("inspect", "{image_id}"),
    "tag": ("tag", "{ref}", "startup:tagged"),
    "rm": ("rm", "startup:removed"),
    "gc": ("gc",),
    "verify": ("verify", "{ref}"),
    # A digest whose disk is ready needs no registry: pull's fast path.
    "pull-ready-digest": ("pull", "{digest_ref}"),
}


@pytest.mark.parametrize("case", list(LOCAL_COMMANDS))
def test_commands_on_local_images_load_no_network_code(
    case: str, local: Path, alpine_ref: PushedImage, tmp_path: Path
) -> None:
    names = {
        "ref": alpine_ref.ref,
        "digest_ref": alpine_ref.digest_ref,
        "image_id": alpine_ref.manifest_digest[7:19],
    }
    args = [arg.format(**names) for arg in LOCAL_COMMANDS[case]]
    if case == "rm":  # something of its own to remove, made beforehand
        tag = [CLI, "tag", "--data-dir", str(local), alpine_ref.ref, args[1]]
        made = subprocess.run(tag, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    found = probe(args[0], "--data-dir", str(local), *args[1:], tmp_path=tmp_path)
    assert found["code"] == 0, found["stderr"]
    assert heavy(found["modules"]) == []
    assert "hypeman_images.build.manager" in found["modules"]  # it did open the store


HELP_CASES = (
    [("--help",), ("--version",)]
    + [(c, "--help") for c in COMMANDS]
    + [(*s, "--help") for s in SUBCOMMANDS]
)


@pytest.mark.parametrize("args", HELP_CASES, ids=" ".join)
def test_help_and_version_load_no_command_code(args: tuple[str, ...], tmp_path: Path) -> None:
    """The grammar names each handler; none of them is imported to print help."""
    found = probe(*args, tmp_path=tmp_path)
    assert found["code"] == 0, found["stderr"]
    assert heavy(found["modules"]) == []
    handlers = {f"hypeman_images.cli.{h.module}" for h in HANDLERS.values()}
    assert handlers & set(found["modules"]) == set()
    assert found["stdout"].strip()


def test_pull_help_still_shows_its_flags(tmp_path: Path) -> None:
    found = probe("pull", "--help", tmp_path=tmp_path)
    assert found["code"] == 0
    for flag in ("--platform", "--disk-cache-mode", "--insecure-registry", "examples:"):
        assert flag in found["stdout"]


def test_the_probe_sees_a_command_that_reaches_a_registry(
    local: Path, alpine_ref: PushedImage, tmp_path: Path
) -> None:
    """A pull by tag resolves it at the registry: httpx is loaded, and the probe says so."""
    found = probe("pull", "--data-dir", str(local), alpine_ref.ref, tmp_path=tmp_path)
    assert found["code"] == 0, found["stderr"]
    assert {"httpx", "hypeman_images.registry.client"} <= set(heavy(found["modules"]))


def test_every_command_names_a_handler_that_loads() -> None:
    """One entry per command in ``parser.HANDLERS``, each a function of its area's module."""
    assert set(HANDLERS) == set(COMMANDS) | {" ".join(s) for s in SUBCOMMANDS}
    for handler in HANDLERS.values():
        assert callable(handler.load())

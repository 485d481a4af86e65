"""The README works as written: its Python example builds a disk, its links resolve, it stays short.

The example names its image in one assignment, ``IMAGE = "..."``; the test
points that line at the session's registry (``alpine_ref``: alpine 3.20.3 on
127.0.0.1) and runs the rest unchanged, in a fresh directory, as a user would
paste it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from support.disk import e2fsck_clean
from support.pushed import PushedImage

from hypeman_images import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250  # a newcomer reads it in two minutes; the rest is in docs/

_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_IMAGE_LINE = re.compile(r"^IMAGE = .*$", re.MULTILINE)
_DOCS_LINK = re.compile(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)")


def readme_example() -> str:
    """The README's one ```python block."""
    blocks = _PYTHON_BLOCK.findall(README.read_text())
    assert len(blocks) == 1, f"expected one ```python block in README.md, found {len(blocks)}"
    return str(blocks[0])


def pointed_at(code: str, image: str) -> str:
    """``code`` with its ``IMAGE = ...`` line naming ``image`` instead."""
    code, count = _IMAGE_LINE.subn(f"IMAGE = {image!r}", code)
    assert count == 1, "the README's example must name its image in one `IMAGE = ...` line"
    return code


def debugfs_cat(disk: Path, path: str) -> str:
    result = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True, text=True, check=True
    )
    return result.stdout


def test_python_example_builds_a_disk(
    alpine_ref: PushedImage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = pointed_at(readme_example(), alpine_ref.ref)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(code, str(README), "exec"), namespace)

    # What it printed: the status and the disk's path first.
    printed = capsys.readouterr().out.splitlines()
    image = namespace["image"]
    assert isinstance(image, Image) and image.disk is not None
    disk = tmp_path / image.disk  # relative, as the example's data dir is
    assert printed[0].split() == ["ready", str(image.disk), str(disk.stat().st_size)]

    # The disk is where the data dir's layout says, a clean ext4 holding the image.
    digest_hex = alpine_ref.manifest_digest.removeprefix("sha256:")
    repo_dir = tmp_path / "hypeman-data" / "images" / alpine_ref.registry.host / "library/alpine"
    assert disk == repo_dir / digest_hex / "rootfs.ext4"
    assert (repo_dir / alpine_ref.tag).readlink() == Path(digest_hex)
    e2fsck_clean(disk)
    assert debugfs_cat(disk, "/etc/alpine-release").strip() == "3.20.3"

    # metadata.json beside it says what a VM's init needs, and matches the disk.
    metadata = json.loads((disk.parent / "metadata.json").read_text())
    assert metadata["status"] == "ready"
    assert metadata["digest"] == alpine_ref.manifest_digest
    assert metadata["cmd"] == ["/bin/sh"] and metadata["entrypoint"] is None
    assert any(item.startswith("PATH=") for item in metadata["env"])
    assert metadata["platform"] == "linux/amd64"
    assert metadata["size_bytes"] == disk.stat().st_size
    assert metadata["disk_sha256"] == "sha256:" + hashlib.sha256(disk.read_bytes()).hexdigest()


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it to {MAX_LINES}"


def test_readme_links_into_docs_resolve() -> None:
    links = _DOCS_LINK.findall(README.read_text())
    assert links, "README.md links nowhere into docs/"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README.md links to missing files: {missing}"


_CODE_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# CamelCase words anywhere (code, comments, prose), and any capitalised name in backticks.
_CLASS_NAME = re.compile(r"\b([A-Z][a-z]+(?:[A-Z][a-z]+)+)\b|`([A-Z][A-Za-z]+)`")


def _documented_imports() -> list[tuple[str, str, str]]:
    """``(page, module, name)`` for every ``from hypeman_images… import name`` in the docs."""
    found = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for block in _CODE_BLOCK.findall(page.read_text()):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "hypeman_images"
                ):
                    found += [(page.name, node.module or "", a.name) for a in node.names]
    return found


def test_every_import_the_docs_show_works() -> None:
    imports = _documented_imports()
    assert ("README.md", "hypeman_images", "ImageManager") in imports
    broken = []
    for page, module, name in imports:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            broken.append(f"{page}: from {module} import {name}: {exc}")
    assert not broken, broken


def test_the_classes_the_readme_names_come_from_the_package() -> None:
    """``BuildOptions``, ``ImageManager``…: what the README calls by name, the facade has."""
    import hypeman_images

    names = {a or b for a, b in _CLASS_NAME.findall(README.read_text())} - {"PATH"}
    assert {"BuildOptions", "ImageManager", "HypemanError", "Image"} <= names
    missing = sorted(name for name in names if not hasattr(hypeman_images, name))
    assert not missing, f"README.md names {missing}, which `hypeman_images` does not export"
    assert set(hypeman_images.__all__) - {"__version__"} <= set(dir(hypeman_images)) | set(
        hypeman_images._LAZY
    )

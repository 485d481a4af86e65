"""docs/ says what the code does: links resolve, the exit codes and the flags match the code.

docs/cli.md's exit-code table is errors.py as a table, and every flag the
parser offers is documented there (and nothing else): checked against the
classes and against ``--help`` itself, so a renamed flag or a new error
class fails here until the docs follow.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
from pathlib import Path

import pytest
from support.commands import COMMANDS, SUBCOMMANDS

from hypeman_images import errors
from hypeman_images.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted(DOCS.glob("*.md"))]

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
_ANCHOR = re.compile(r'<a id="([^"]+)">')
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    return {slug(h) for h in _HEADING.findall(text)} | set(_ANCHOR.findall(text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def error_classes() -> list[type[errors.HypemanError]]:
    found = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.HypemanError)
    ]
    return sorted(found, key=lambda cls: (cls.exit_code, inspect.getsourcelines(cls)[1]))


def test_exit_code_table_is_errors_py() -> None:
    text = (DOCS / "cli.md").read_text()
    table = text.split("## Exit codes", 1)[1]
    rows = [
        [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| exit")
    ]
    documented = [(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]
    expected = [
        (cls.exit_code, cls.__name__, cls.__mro__[1].__name__, cls.code, cls.http_status)
        for cls in error_classes()
    ]
    assert documented == expected


def help_text(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def test_every_flag_is_documented_and_exists() -> None:
    offered = set(_FLAG.findall(help_text()))
    for command in COMMANDS:
        offered |= set(_FLAG.findall(help_text(command)))
    for argv in SUBCOMMANDS:
        offered |= set(_FLAG.findall(help_text(*argv)))
    text = (DOCS / "cli.md").read_text()
    documented = set(_FLAG.findall(text))
    assert offered - documented == set(), "flags missing from docs/cli.md"
    assert documented - offered == set(), "docs/cli.md names flags the CLI does not have"

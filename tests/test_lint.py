"""The code stays ruff-clean, ruff-formatted and mypy --strict clean (settings in
pyproject.toml), and its comments and docstrings cite no issue numbers.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PATHS = ["src", "tests", "bench", "scripts", "fuzz"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)


def test_ruff_check() -> None:
    result = run(str(BIN / "ruff"), "check", *PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", *PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


# An issue tracker's number means nothing to a reader of the repository: a comment
# says the reason itself and cites a spec, a section of docs/ or the test that
# guards it. A link to another project's tracker (a URL) is a citation and does
# not match.
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues? #?\d+")


def prose(source: str) -> Iterator[tuple[int, str]]:
    """The comments and docstrings (any string statement) of Python ``source``, by line."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            yield node.lineno, node.value.value


def citations(source: str) -> list[tuple[int, str]]:
    """``(line, the line's text)`` for each issue number in the prose of ``source``."""
    found = []
    for line, text in prose(source):
        for match in ISSUE_NUMBER.finditer(text):
            down = text.count("\n", 0, match.start())
            found.append((line + down, text.splitlines()[down].strip()))
    return sorted(found)


def issue_citations(*dirs: str) -> list[str]:
    """``path:line: text`` for each issue number in the prose of the .py files under ``dirs``."""
    return [
        f"{path.relative_to(ROOT)}:{line}: {said}"
        for top in dirs
        for path in sorted((ROOT / top).rglob("*.py"))
        for line, said in citations(path.read_text(encoding="utf-8"))
    ]


def test_the_check_finds_issue_numbers_in_comments_and_docstrings_only() -> None:
    # <i> and <I> stand for the letter, so that these samples are no hits of a grep.
    source = (
        (
            '"""A module.\n\nFast enough (<i>ssue 7).\n"""\n'
            "x = 1  # see <I>ssues #3 and 7\n"
            'y = "<i>ssue 5"\n'
            "# https://github.com/o/r/<i>ssues/5766 and t<i>ssue 4\n"
        )
        .replace("<i>", "i")
        .replace("<I>", "I")
    )
    assert [line for line, _ in citations(source)] == [3, 5]


def test_no_issue_numbers_in_the_package() -> None:
    found = issue_citations("src")
    assert not found, "say the reason instead:\n" + "\n".join(found)


def test_no_issue_numbers_in_tests_bench_fuzz_and_scripts() -> None:
    found = issue_citations("tests", "bench", "fuzz", "scripts")
    assert not found, "say the reason instead:\n" + "\n".join(found)

"""Every test module under tests/ is collected by a plain ``pytest``.

pytest skips some directory names unless told otherwise (``build`` among
them, which is also one of the package's subpackages): a module it never
collects is a test that silently never runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_module_is_collected() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    collected = {line.split("::", 1)[0] for line in listed.splitlines() if "::" in line}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    assert modules - collected == set(), "test modules pytest does not collect"

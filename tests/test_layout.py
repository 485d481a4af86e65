"""The house rules of ``src/hypeman_images`` (docs/design.md, "Layout").

Data flows one way: each subpackage imports only the ones below it, with no
cycles, and modules and functions stay small enough to read whole. The rules
are checked on the real tree, and each check is shown to catch a planted
violation, so that a rule that silently stopped checking would fail here.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hypeman_images"

# What each part of the package may import, besides itself. The top-level
# helpers (errors, fsutil) are the floor everybody stands on; the facade
# (__init__) loads the public names lazily and is exempt.
BASE = {"errors", "fsutil"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "fsutil": {"errors"},
    "oci": {"errors"},
    "registry": BASE | {"oci"},
    "store": BASE | {"oci"},
    "disk": BASE | {"oci"},
    "layers": BASE | {"oci", "store"},
    "fleet": BASE | {"oci", "registry", "store", "disk"},
    "build": BASE | {"oci", "registry", "store", "layers", "disk", "fleet"},
    "service": BASE | {"oci", "registry", "store", "layers", "disk", "build", "fleet"},
    "boot": BASE,
    "cli": BASE
    | {"oci", "registry", "store", "layers", "disk", "build", "service", "boot", "fleet"},
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# argparse wants the whole command tree declared in one place.
LONG_FUNCTIONS_ALLOWED = {("cli.parser", "build_parser")}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted, relative to the package
    target: str  # the imported module, dotted, relative to the package
    line: int
    top_level: bool  # imported when the module loads (not inside a function)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(root: Path, package: str = "hypeman_images") -> Iterator[Import]:
    """Every import of the package's own modules, relative imports resolved."""
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        # Imports under a plain ``if`` load with the module; those under
        # ``if TYPE_CHECKING:`` never do.
        top |= {
            id(n)
            for node in tree.body
            if isinstance(node, ast.If) and not _type_checking(node)
            for n in node.body
        }
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = name.split(".") if name else []
                    base = here if is_package else here[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join([package, *base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                # ``from pkg import module`` imports the module.
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for target in targets:
                if target == package or not target.startswith(package + "."):
                    continue
                rel = target[len(package) + 1 :]
                if (
                    not (root / rel.replace(".", "/")).with_suffix(".py").exists()
                    and not (root / rel.replace(".", "/") / "__init__.py").exists()
                ):
                    continue  # a name imported from a module, not a module
                yield Import(name, rel, node.lineno, id(node) in top)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def part(module: str) -> str:
    return module.split(".")[0]


def upward_imports(root: Path) -> list[str]:
    """Imports that break ``ALLOWED``, as readable lines."""
    bad = []
    for imp in imports(root):
        if imp.module == "" or part(imp.module) == part(imp.target):
            continue
        if part(imp.target) not in ALLOWED.get(part(imp.module), set()):
            bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
    return bad


def cycles(root: Path) -> list[list[str]]:
    """Cycles among the modules' load-time imports, and among the subpackages."""
    edges: dict[str, set[str]] = {}
    parts: dict[str, set[str]] = {}
    for imp in imports(root):
        if imp.module == "":
            continue
        if imp.top_level and imp.target != imp.module:
            edges.setdefault(imp.module, set()).add(imp.target)
        if part(imp.module) != part(imp.target):
            parts.setdefault(part(imp.module), set()).add(part(imp.target))
    return _cycles(edges) + _cycles(parts)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def long_functions(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                allowed = (name, node.name) in LONG_FUNCTIONS_ALLOWED
                if length > MAX_FUNCTION_LINES and not allowed:
                    out.append(f"{name}.{node.name}: {length} lines")
    return out


def long_modules(root: Path) -> list[str]:
    return [
        f"{module_name(p, root)}: {n} lines"
        for p in sorted(root.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]


def depth(root: Path) -> int:
    """The modules on the longest chain of load-time imports (the import depth)."""
    edges: dict[str, set[str]] = {}
    for imp in imports(root):
        if imp.top_level and imp.module and imp.target != imp.module:
            edges.setdefault(imp.module, set()).add(imp.target)
    memo: dict[str, int] = {}

    def longest(node: str, seen: frozenset[str]) -> int:
        if node in memo:
            return memo[node]
        best = 1 + max(
            (longest(n, seen | {n}) for n in edges.get(node, ()) if n not in seen), default=0
        )
        memo[node] = best
        return best

    return max((longest(n, frozenset({n})) for n in edges), default=0)


# --- the rules on the real tree ------------------------------------------------


def test_every_part_is_known() -> None:
    """A new subpackage or top-level module must be given its place in ALLOWED."""
    found = {part(module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")} - {""}
    assert found <= set(ALLOWED), sorted(found - set(ALLOWED))


def test_no_upward_imports() -> None:
    assert upward_imports(PACKAGE) == []


def test_no_import_cycles() -> None:
    assert cycles(PACKAGE) == []


def test_modules_are_small() -> None:
    assert long_modules(PACKAGE) == []


def test_functions_are_small() -> None:
    assert long_functions(PACKAGE) == []


def test_every_subpackage_says_what_it_owns() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.parent.name}/__init__.py has no docstring"
        if init.parent.name not in {"boot"}:
            assert "May import" in doc, f"{init.parent.name}/__init__.py does not state its imports"


# --- the checks catch what they are for -------------------------------------------


def plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return plant(
        tmp_path / "hypeman_images",
        {
            "__init__.py": "",
            "errors.py": "",
            "oci/__init__.py": "",
            "oci/digest.py": "from hypeman_images.errors import x\n",
            "store/__init__.py": "",
            "store/blobs.py": "from hypeman_images.oci.digest import Digest\n",
            "layers/__init__.py": "",
            "layers/scan.py": "from ..store import blobs\n",
        },
    )


def test_a_clean_planted_tree_passes(tree: Path) -> None:
    assert upward_imports(tree) == []
    assert cycles(tree) == []
    assert depth(tree) == 4  # layers.scan -> store.blobs -> oci.digest -> errors


def test_a_planted_upward_import_is_caught(tree: Path) -> None:
    plant(tree, {"store/blobs.py": "from hypeman_images.layers import scan\n"})
    assert "store.blobs:1 imports layers.scan" in upward_imports(tree)


def test_a_planted_relative_upward_import_is_caught(tree: Path) -> None:
    plant(tree, {"oci/digest.py": "def f():\n    from ..store.blobs import Blob\n"})
    assert upward_imports(tree) == ["oci.digest:2 imports store.blobs"]


def test_a_type_checking_import_is_no_cycle(tree: Path) -> None:
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import merge\n"
    plant(tree, {"layers/merge.py": "from . import plan\n", "layers/plan.py": typing_only})
    assert cycles(tree) == []


def test_a_planted_cycle_is_caught(tree: Path) -> None:
    plant(
        tree, {"layers/merge.py": "from . import plan\n", "layers/plan.py": "from . import merge\n"}
    )
    assert ["layers.merge", "layers.plan", "layers.merge"] in cycles(tree)


def test_a_planted_long_function_and_module_are_caught(tree: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    plant(tree, {"oci/big.py": f"def f():\n{body}\n" + "\n" * MAX_MODULE_LINES})
    assert long_functions(tree) == [f"oci.big.f: {MAX_FUNCTION_LINES + 1} lines"]
    lines = 1 + MAX_FUNCTION_LINES + MAX_MODULE_LINES
    assert long_modules(tree) == [f"oci.big: {lines} lines"]

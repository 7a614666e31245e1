"""The import floors (README, "Architecture"): no import runs back up, siblings stay apart, and
no circle among babelcap's modules.

Every .py file that the distribution installs is parsed with `ast`; files map to module names
through pyproject.toml's `[tool.setuptools] packages` and `package-dir`, so `training/data.py`
is `babelcap.training.data`. Imports anywhere in a file count for the floors (a function-level
import runs back up just as much); only module-level imports count for cycles (a function-level
import is the usual way out of a circle, and it runs after both modules are loaded).

import-linter would be the library for this, but its graph builder (grimp) scans only the
directory tree of the package it is given, so it cannot see subpackages that package-dir maps
in from other folders (`babelcap.training` lives in `training/`, not `babelcap/training/`).
"""

from __future__ import annotations

import ast
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
ROOT = "babelcap"

# The floors, bottom up. A module may import its own package and any package on a lower floor;
# on an `independent` floor the packages may not import each other. bench/, tests/,
# beam_runner.py and setup.py are outside the package and may import anything.
FLOORS: list[tuple[tuple[str, ...], bool]] = [
    (("babelcap.core",), False),  # 0: the shard contract and small shared helpers
    (("babelcap.translators", "babelcap.models"), True),  # 1: NMT engine, model layer
    (("babelcap.pipelines", "babelcap.training"), True),  # 2: the jobs
    (("babelcap.world",), False),  # 3: the test world (uses the trainer; nothing below uses it)
    (("babelcap.cli", "babelcap.commands", "babelcap.demo"), False),  # 4: the front door
]
# `babelcap/__init__.py` imports nothing of babelcap (except, maybe, a version module); every
# module may import `babelcap` itself (for `__version__`).
ROOT_MAY_IMPORT = {"babelcap._version", "babelcap.version"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported babelcap module (or package)
    path: Path
    line: int
    text: str  # the import statement as written
    module_level: bool  # runs when the module is imported (not inside a function)
    type_only: bool = False  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}: {self.text}"


# ---------------------------------------------------------------------------------------------
# files -> modules, through pyproject.toml


def _setuptools_config() -> tuple[list[str], dict[str, str]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool = data["tool"]["setuptools"]
    return list(tool["packages"]), dict(tool.get("package-dir", {}))


def package_dir(package: str, mapping: dict[str, str]) -> Path:
    """Where setuptools finds `package`: the longest mapped prefix, else the dotted path."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return REPO / mapping[prefix] / Path(*parts[i:])
    root = mapping.get("", "")
    return REPO / root / Path(*parts)


def package_modules() -> dict[str, Path]:
    """module name -> file, for every .py file under the installed packages' folders (walked
    recursively, so a subpackage missing from `packages` is still checked)."""
    packages, mapping = _setuptools_config()
    dirs = {package_dir(p, mapping): p for p in packages}
    for folder, package in dirs.items():
        assert folder.is_dir(), f"pyproject.toml: package {package} maps to missing {folder}"
    modules: dict[str, Path] = {}
    files = {f for folder in dirs for f in folder.rglob("*.py") if "__pycache__" not in f.parts}
    for path in sorted(files):
        # The nearest folder that a listed package maps to names the file.
        base = next(d for d in path.parents if d in dirs)
        parts = [dirs[base], *path.relative_to(base).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        assert name not in modules, f"{path} and {modules[name]} are both {name}"
        modules[name] = path
    return modules


# ---------------------------------------------------------------------------------------------
# imports


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(
    source: str, module: str, path: Path, is_package: bool, known: set[str]
) -> list[Import]:
    """Every import of a babelcap module in `source` (absolute, relative, function-level, and
    `importlib.import_module("literal")`)."""
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines()
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def resolve_from(node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        base = package.split(".")
        if node.level > 1:
            base = base[: -(node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def add(target: str, node: ast.AST, module_level: bool, type_only: bool) -> None:
        if target != ROOT and not target.startswith(ROOT + "."):
            return
        text = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
        found.append(Import(module, target, path, node.lineno, text, module_level, type_only))

    def visit(node: ast.AST, module_level: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, module_level, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(node)
            if base:
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    # `from pkg import sub` imports the submodule when there is one.
                    add(sub if sub in known else base, node, module_level, type_only)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value, node, False, type_only)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, module_level, True)
            for child in node.orelse:
                visit(child, module_level, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, module_level, type_only)

    visit(tree, True, False)
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def all_imports() -> list[Import]:
    modules = package_modules()
    known = set(modules)
    out: list[Import] = []
    for name, path in modules.items():
        out += imports_of(path.read_text(), name, path, path.name == "__init__.py", known)
    return out


# ---------------------------------------------------------------------------------------------
# the rules


def _group(module: str) -> tuple[int, str] | None:
    """(floor, package) of a module, or None when no floor claims it."""
    best: tuple[int, str] | None = None
    for floor, (packages, _) in enumerate(FLOORS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (
                best is None or len(package) > len(best[1])
            ):
                best = (floor, package)
    return best


def violation(imp: Import) -> str | None:
    """Why `imp` breaks the floors, or None when it is allowed."""
    if imp.source == ROOT:
        if imp.target in ROOT_MAY_IMPORT:
            return None
        return "babelcap/__init__.py may import nothing of babelcap but its version"
    if imp.target == ROOT:
        return None
    src, dst = _group(imp.source), _group(imp.target)
    if src is None:
        return f"{imp.source} is on no floor (add it to FLOORS in tests/test_architecture.py)"
    if dst is None:
        return f"{imp.target} is on no floor (add it to FLOORS in tests/test_architecture.py)"
    (src_floor, src_pkg), (dst_floor, dst_pkg) = src, dst
    if src_pkg == dst_pkg or dst_floor < src_floor:
        return None
    if dst_floor > src_floor:
        return f"upward: {src_pkg} (floor {src_floor}) imports {dst_pkg} (floor {dst_floor})"
    if FLOORS[src_floor][1]:
        return f"siblings: {src_pkg} and {dst_pkg} (floor {src_floor}) must stay independent"
    return None


def find_cycles(imports: list[Import], module_level_only: bool = True) -> list[list[Import]]:
    """Circles (each as its edges) of the import graph (of the module-level imports only,
    unless `module_level_only` is False): per knot (strongly connected component), enough
    shortest circles that every module of the knot is in one."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if (
            (imp.module_level or not module_level_only)
            and not imp.type_only
            and imp.source != imp.target
        ):
            edges.setdefault(imp.source, {}).setdefault(imp.target, imp)

    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        covered: set[str] = set()
        # Shortest circles through each module of the knot until every module is in one.
        for start in sorted(members):
            if start in covered:
                continue
            previous: dict[str, str] = {}
            frontier = [start]
            while frontier and start not in previous:  # breadth first, back to `start`
                nxt = []
                for v in frontier:
                    for w in sorted(edges.get(v, {})):
                        if w in members and w not in previous:
                            previous[w] = v
                            nxt.append(w)
                frontier = nxt
            path = [start]
            while True:
                path.append(previous[path[-1]])
                if path[-1] == start:
                    break
            path.reverse()
            covered.update(path)
            cycles.append([edges[a][b] for a, b in itertools.pairwise(path)])
    return cycles


# ---------------------------------------------------------------------------------------------
# tests


def test_every_package_is_on_a_floor():
    modules = package_modules()
    assert {"babelcap.core.schema", "babelcap.training.data", "babelcap.world.models"} <= set(
        modules
    )
    orphans = sorted(m for m in modules if m != ROOT and _group(m) is None)
    assert not orphans, f"modules on no floor (add them to FLOORS): {orphans}"


def test_no_import_runs_back_up_and_siblings_stay_apart():
    problems = [
        f"{imp.where()}\n    -> {reason}"
        for imp in all_imports()
        if (reason := violation(imp)) is not None
    ]
    assert not problems, f"{len(problems)} import(s) break the floors:\n" + "\n".join(problems)


def test_no_import_cycle_at_module_level():
    cycles = find_cycles(all_imports())
    report = [
        " -> ".join([c[0].source, *(imp.target for imp in c)])
        + "".join(f"\n    {imp.where()}" for imp in c)
        for c in cycles
    ]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(report)


def test_no_circle_even_through_function_level_imports():
    """Stricter than the module-level check: a function-level import on each side of a circle
    (trainer importing the methods that import the trainer, to register them) still ties the
    modules into one knot; the issue asks for no circle at all."""
    cycles = find_cycles(all_imports(), module_level_only=False)
    report = [
        " -> ".join([c[0].source, *(imp.target for imp in c)])
        + "".join(f"\n    {imp.where()}" for imp in c)
        for c in cycles
    ]
    assert not cycles, f"{len(cycles)} import circle(s):\n" + "\n".join(report)


def test_the_rules_catch_what_they_should(tmp_path):
    """The checker itself: function-level, relative and `from pkg import sub` imports are seen,
    and an upward, a sibling and a cyclic import are each reported."""
    known = {
        "babelcap.training",
        "babelcap.training.trainer",
        "babelcap.training.methods",
        "babelcap.world",
        "babelcap.world.scene",
    }
    source = (
        "from babelcap import __version__\n"
        "from . import methods\n"
        "from babelcap.core.schema import SCHEMA\n"
        "def f():\n"
        "    from babelcap.world import scene\n"
        "    import babelcap.pipelines.runner\n"
    )
    path = REPO / "training" / "trainer.py"
    found = imports_of(source, "babelcap.training.trainer", path, False, known)
    assert [(i.target, i.line, i.module_level) for i in found] == [
        ("babelcap", 1, True),
        ("babelcap.training.methods", 2, True),
        ("babelcap.core.schema", 3, True),
        ("babelcap.world.scene", 5, False),
        ("babelcap.pipelines.runner", 6, False),
    ]
    reasons = [violation(i) for i in found]
    assert reasons[:3] == [None, None, None]
    assert reasons[3] is not None and reasons[3].startswith("upward")
    assert reasons[4] is not None and reasons[4].startswith("siblings")
    assert "training/trainer.py:5: from babelcap.world import scene" in found[3].where()

    back = imports_of(
        "from babelcap.training.trainer import Trainer\n",
        "babelcap.training.methods",
        path.with_name("methods.py"),
        False,
        known,
    )
    cycles = find_cycles([*found, *back])
    assert [[(i.source, i.target) for i in c] for c in cycles] == [
        [
            ("babelcap.training.methods", "babelcap.training.trainer"),
            ("babelcap.training.trainer", "babelcap.training.methods"),
        ]
    ]
    root = imports_of("from babelcap.core import schema\n", ROOT, path, True, {"babelcap.core"})
    assert violation(root[0]) is not None

"""The world's small models, trained locally: `babelcap world models --world DIR`.

Each model has a builder `build(world_dir: Path, out_dir: Path, config: dict) -> dict`
(returning a small summary: metrics, sizes) and a default configuration (data, not code).
Built models land in `DIR/models/<name>/` in their libraries' normal formats, with a
`babelcap-build.json` stamp recording the world fingerprint, the configuration and the code
fingerprint (`code_fingerprint`: the builder's module and every babelcap module it imports,
transitively): a model whose stamp matches is skipped, so one call gives a world with
everything babelcap needs, and a change to any code that builds a model rebuilds it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STAMP = "babelcap-build.json"


@dataclass(frozen=True)
class ModelSpec:
    """How to build one world model: `module:function` and its default configuration."""

    name: str
    builder: str  # "package.module:function"
    config: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # names of models that must be built first


# Registry of the world's models, in build order. Later issues add theirs here.
MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


def world_fingerprint(world_dir: Path) -> str:
    """Fingerprint of a built world (from its world.json), so models follow their data."""
    from babelcap.world.build import world_meta

    if world_meta(world_dir) is None:
        raise FileNotFoundError(
            f"{world_dir} is not a babelcap world (no world.json); "
            "build one with `babelcap world build --out DIR`"
        )
    return hashlib.sha256((Path(world_dir) / "world.json").read_bytes()).hexdigest()[:16]


PACKAGE = "babelcap"
# path -> (mtime_ns, size, digest of the code, babelcap modules it imports)
_PARSED: dict[str, tuple[int, int, str, tuple[str, ...]]] = {}


def _source_file(module: str) -> str | None:
    """The .py file of `module` (None: not a Python source module, or no such module)."""
    parent = module.rpartition(".")[0]
    if parent and not (_source_file(parent) or "").endswith("__init__.py"):
        return None  # `pkg.module.function`: never import a module to look for a submodule
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None else None
    return origin if origin and origin.endswith(".py") else None


def _parse(module: str, path: str) -> tuple[str, tuple[str, ...]]:
    """(digest of the module's code, the babelcap modules it imports anywhere in its body).

    The digest is over the syntax tree, so comments and formatting do not count; docstrings
    and every statement do."""
    st = Path(path).stat()
    cached = _PARSED.get(path)
    if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2], cached[3]
    tree = ast.parse(Path(path).read_bytes(), filename=path)
    package = module if Path(path).name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):  # function-level imports too (builders import lazily)
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # submodules, if any
    ours = tuple(n for n in dict.fromkeys(names) if n == PACKAGE or n.startswith(PACKAGE + "."))
    digest = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    _PARSED[path] = (st.st_mtime_ns, st.st_size, digest, ours)
    return digest, ours


def code_modules(module: str) -> dict[str, str]:
    """`module` and every babelcap module it imports, transitively (with the packages above
    each, whose `__init__` runs on import): module name -> source file."""
    found: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _source_file(name)
        if path is None:  # `from pkg import function`: pkg.function is not a module
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += list(_parse(name, path)[1])
    return found


def code_fingerprint(module: str) -> str:
    """Fingerprint of the code a builder module runs: its source and that of every babelcap
    module it imports, transitively (see `code_modules`)."""
    h = hashlib.sha256()
    for name, path in sorted(code_modules(module).items()):
        h.update(f"{name}\0{_parse(name, path)[0]}\n".encode())
    return h.hexdigest()[:16]


def _stamp_for(world_dir: Path, spec: ModelSpec, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "model": spec.name,
        "world": world_fingerprint(world_dir),
        "config": json.loads(json.dumps(dict(config), sort_keys=True, default=str)),
        "code": code_fingerprint(spec.builder.partition(":")[0]),
    }


def model_dir(world_dir: Path, name: str) -> Path:
    return Path(world_dir) / "models" / name


def is_built(world_dir: Path, name: str, config: Mapping[str, Any] | None = None) -> bool:
    spec = MODELS[name]
    stamp_path = model_dir(world_dir, name) / STAMP
    if not stamp_path.exists():
        return False
    stamp = json.loads(stamp_path.read_text())
    want = _stamp_for(world_dir, spec, {**spec.config, **(config or {})})
    return all(stamp.get(k) == v for k, v in want.items())


def _load_builder(spec: ModelSpec):
    module, func = spec.builder.split(":")
    return getattr(importlib.import_module(module), func)


def _ordered(names: Iterable[str]) -> list[str]:
    seen: list[str] = []

    def visit(name: str) -> None:
        if name not in MODELS:
            raise ValueError(f"unknown world model {name!r}; known: {sorted(MODELS)}")
        for dep in MODELS[name].requires:
            visit(dep)
        if name not in seen:
            seen.append(name)

    for name in names:
        visit(name)
    return seen


def build_models(
    world_dir: str | Path,
    only: Iterable[str] | None = None,
    force: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Build (or skip, when already built) the world's models; return their stamps."""
    _register_all()
    world_dir = Path(world_dir)
    world_fingerprint(world_dir)  # fail early on a folder that is not a world
    results: dict[str, dict[str, Any]] = {}
    for name in _ordered(only or MODELS):
        spec = MODELS[name]
        config = {**spec.config, **((overrides or {}).get(name, {}))}
        out = model_dir(world_dir, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        # One builder per model at a time (two test sessions on one world): the second waits,
        # then finds the model built.
        with _locked(out.with_name(out.name + ".lock")):
            if not force and is_built(world_dir, name, config):
                log.info("world model %s: up to date in %s", name, out)
                results[name] = json.loads((out / STAMP).read_text())
                continue
            log.info("world model %s: building into %s", name, out)
            # The identity (code included) as it is when the build starts: code edited during
            # the build gives a stale stamp, hence a rebuild next time.
            identity = _stamp_for(world_dir, spec, config)
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            start = time.perf_counter()
            summary = _load_builder(spec)(world_dir, tmp, config)
            stamp = {
                **identity,
                "seconds": round(time.perf_counter() - start, 1),
                "summary": summary or {},
            }
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True))
            # Swap in atomically-ish: a crash mid-build never leaves a half model that looks
            # built.
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            results[name] = stamp
    return results


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` (POSIX; no lock elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _register_all() -> None:
    """Import the modules that register world models (each calls `register`)."""
    for module in _MODEL_MODULES:
        importlib.import_module(module)


# Modules that define world models; each registers its specs on import.
_MODEL_MODULES: list[str] = [
    "babelcap.world.models.translator",
    "babelcap.world.models.captioner",
    "babelcap.world.models.clip",
]

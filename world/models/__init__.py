"""The world's small models, trained locally: `babelcap world models --world DIR`.

Each model has a builder `build(world_dir: Path, out_dir: Path, config: dict) -> dict`
(returning a small summary: metrics, sizes) and a default configuration (data, not code).
Built models land in `DIR/models/<name>/` in their libraries' normal formats, with a
`babelcap-build.json` stamp recording the world fingerprint and the configuration: a model
whose stamp matches is skipped, so one call gives a world with everything babelcap needs.
"""

from __future__ import annotations

import hashlib
import importlib
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
    meta = Path(world_dir) / "world.json"
    if not meta.exists():
        raise FileNotFoundError(
            f"{world_dir} is not a babelcap world (no world.json); "
            "build one with `babelcap world build --out DIR`"
        )
    return hashlib.sha256(meta.read_bytes()).hexdigest()[:16]


def _stamp_for(world_dir: Path, spec: ModelSpec, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "model": spec.name,
        "world": world_fingerprint(world_dir),
        "config": json.loads(json.dumps(dict(config), sort_keys=True, default=str)),
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
        if not force and is_built(world_dir, name, config):
            log.info("world model %s: up to date in %s", name, out)
            results[name] = json.loads((out / STAMP).read_text())
            continue
        log.info("world model %s: building into %s", name, out)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        summary = _load_builder(spec)(world_dir, tmp, config)
        stamp = {
            **_stamp_for(world_dir, spec, config),
            "seconds": round(time.perf_counter() - start, 1),
            "summary": summary or {},
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True))
        # Swap in atomically-ish: a crash mid-build never leaves a half model that looks built.
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        results[name] = stamp
    return results


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

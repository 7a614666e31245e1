"""Build several world models at once, one process per CPU core.

The world's models are small and mostly train on one or two threads, so building them one
after another leaves cores idle; independent models (see `ModelSpec.requires`) go to separate
processes here. Each process runs `build_models` for one model, so caching, stamps and the
per-model lock are exactly `build_models`' own: a model already built (or being built by
another session, which holds its lock) is not built twice.

This lives beside `build_models` rather than in it on purpose: the package's `__init__` is part
of every model's code fingerprint, and the order in which models are built is no part of what
they are.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from babelcap.core.devices import available_cores
from babelcap.world.models import (
    MODELS,
    STAMP,
    ModelSpec,
    _ordered,
    _register_all,
    build_models,
    is_built,
    model_dir,
    register,
    world_fingerprint,
)

log = logging.getLogger(__name__)


def _build_one(
    world_dir: str,
    specs: list[ModelSpec],
    name: str,
    force: bool,
    overrides: Mapping[str, Mapping[str, Any]] | None,
    log_level: int,
    threads: int,
) -> dict[str, Any]:
    """In a child process: build model `name` (its requirements are built already) on
    `threads` torch threads, its share of the cores."""
    import torch

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(message)s")
    # More threads than cores across the builds makes torch's OpenMP workers spin against each
    # other: a captioner on 2 threads beside another build ran 5x slower than alone.
    torch.set_num_threads(threads)
    _register_all()  # first: importing the model modules registers their default specs
    for spec in specs:  # then the parent's (a spec replaced at run time included)
        register(spec)
    return build_models(world_dir, only=[name], force=force, overrides=overrides)[name]


def build_models_parallel(
    world_dir: str | Path,
    only: Iterable[str] | None = None,
    force: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    jobs: int | None = None,
) -> dict[str, dict[str, Any]]:
    """`build_models` with up to `jobs` models building at once (default: one per core), each
    started once the models it requires are built; returns their stamps.

    With one job, or at most one model left to build, it is `build_models` in this process.
    A failed build stops the models not yet started and raises, naming the model; the models
    already built keep their stamps."""
    _register_all()
    world_dir = Path(world_dir)
    world_fingerprint(world_dir)  # fail early on a folder that is not a world
    names = _ordered(only or MODELS)
    jobs = available_cores() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")

    def config(name: str) -> dict[str, Any]:
        return {**MODELS[name].config, **((overrides or {}).get(name, {}))}

    todo = [n for n in names if force or not is_built(world_dir, n, config(n))]
    if jobs == 1 or len(todo) <= 1:
        return build_models(world_dir, only=names, force=force, overrides=overrides)

    specs = [MODELS[n] for n in names]
    threads = max(1, available_cores() // min(jobs, len(todo)))
    done = {n for n in names if n not in todo}
    running: dict[Future, str] = {}
    # spawn, not fork: the parent may hold torch's thread pools and Beam's threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
        try:
            while todo or running:
                ready = [n for n in todo if all(d in done for d in MODELS[n].requires)]
                for name in ready[: max(0, jobs - len(running))]:
                    log.info("world model %s: building in a separate process", name)
                    args = (
                        str(world_dir),
                        specs,
                        name,
                        force,
                        overrides,
                        log.getEffectiveLevel(),
                        threads,
                    )
                    running[pool.submit(_build_one, *args)] = name
                    todo.remove(name)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    try:
                        future.result()
                    except Exception as exc:
                        raise RuntimeError(f"building world model {name!r} failed: {exc}") from exc
                    done.add(name)
        except BaseException:
            for future in running:
                future.cancel()
            raise
    # The stamps as written (and the models asked for, already built before this call).
    return {n: _read_stamp(world_dir, n) for n in names}


def _read_stamp(world_dir: Path, name: str) -> dict[str, Any]:
    import json

    return json.loads((model_dir(world_dir, name) / STAMP).read_text())

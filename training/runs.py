"""What `babelcap train` runs: methods and drivers by name.

`METHODS` maps each `method.name` to its method class (parameter selection + loss);
`DRIVERS` maps the methods whose runs are more than one plain training run to the function that
drives them: continual learning (one stage per language, `training.continual.driver`) and
translation alignment (the pairing's data selection and per-language adapters,
`training.alignment_driver`). `run(cfg)` looks the name up in both: a method without a driver
is one `train(cfg)`.

A new method is a `ClipMethod` subclass in its own module plus an entry in `METHODS` (and in
`DRIVERS` when a run needs more than the trainer). Both are plain mappings: nothing is found by
duck typing, the trainer imports neither, and the method modules import no driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from babelcap.models.clip import ClipBundle
from babelcap.training import trainer
from babelcap.training.alignment import AlignmentMethod
from babelcap.training.alignment_driver import run_alignment
from babelcap.training.config import MethodConfig, TrainConfig
from babelcap.training.continual.driver import run_continual
from babelcap.training.continual.method import ContinualMethod
from babelcap.training.methods import ClipMethod

Driver = Callable[[TrainConfig], dict[str, Any]]

METHODS: dict[str, type[ClipMethod]] = {
    "clip": ClipMethod,
    "capivara": ClipMethod,
    "alignment": AlignmentMethod,
    "continual": ContinualMethod,
}

DRIVERS: dict[str, Driver] = {
    "alignment": run_alignment,
    "continual": run_continual,
}


def method_class(name: str) -> type[ClipMethod]:
    """The method class registered under `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: MethodConfig, rank: int = 0, world_size: int = 1) -> ClipMethod:
    """The method `cfg.name` names, built from `cfg` (a `Trainer` method factory)."""
    return method_class(cfg.name)(cfg, rank=rank, world_size=world_size)


def train(cfg: TrainConfig, bundle: ClipBundle | None = None) -> dict[str, Any]:
    """One training run of the method `cfg.method.name` names (no driver)."""
    method_class(cfg.method.name)
    return trainer.train(cfg, bundle=bundle, method=build_method)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says: the method's driver when it has one, else one `train(cfg)`; returns
    the run summary. `cfg` is not changed."""
    method_class(cfg.method.name)
    driver = DRIVERS.get(cfg.method.name)
    return driver(cfg) if driver is not None else train(cfg)

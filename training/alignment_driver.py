"""The alignment driver: a translation-alignment run (PECTVLM) from a user's configuration.

The user names languages and a pairing; the run trains on the pairing's captions (with their
English source) and, for per-language adapters, one adapter per language of the selection
(`method.options.languages` when set, else `data.languages`). The configuration it trains with
is a copy (`TrainConfig.updated`); the user's object is not changed.

Per-language adapters are saved as `adapter/<lang>/`; the method declares that it has no
merged export (one checkpoint holds one adapter only), so the trainer writes none.
"""

from __future__ import annotations

from typing import Any

from babelcap.training.alignment import (
    AlignmentMethod,
    AlignmentOptions,
    check_world_size,
    pairing_changes,
)
from babelcap.training.config import TrainConfig
from babelcap.training.trainer import launched_world_size, train


def alignment_config(cfg: TrainConfig) -> TrainConfig:
    """The configuration an alignment run trains with (a new object; `cfg` is not changed)."""
    opts = AlignmentOptions.from_options(cfg.method.options)
    changes = pairing_changes(cfg.data, opts.pairing)
    if opts.adapters == "per_language" and not opts.languages:
        languages = changes.get("data.languages", cfg.data.languages)
        if not languages:
            raise ValueError("per-language adapters need data.languages (or --languages)")
        changes["method.options.languages"] = list(languages)
    return cfg.updated(changes)


def run_alignment(cfg: TrainConfig) -> dict[str, Any]:
    """Select the pairing's captions, name the adapters after the languages, train."""
    # Before anything is loaded: a launch that cannot run says so at once (the method checks
    # again, for a Trainer built without this driver).
    check_world_size(AlignmentOptions.from_options(cfg.method.options), launched_world_size())
    return train(alignment_config(cfg), method=AlignmentMethod)

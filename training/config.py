"""Training configuration as data: nested dataclasses, loaded from YAML and/or `key=value` flags.

The resolved configuration is saved next to the checkpoints (`config.yaml`), so a run
describes itself and `--resume` can pick it up again.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    # open_clip model name ("xlm-roberta-base-ViT-B-32"), a model config JSON (open_clip format,
    # or an open_clip_config.json with "model_cfg"), or a directory holding open_clip_config.json.
    name: str = "xlm-roberta-base-ViT-B-32"
    pretrained: str | None = None  # open_clip tag or checkpoint path (.safetensors / .pt)
    text_tower: str | None = None  # local Hugging Face directory replacing the text tower
    pretrained_text: bool = True  # load the HF text tower weights when no CLIP checkpoint is given


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard files, directories, globs or URIs
    languages: list[str] | None = None  # caption languages to train on (None: all)
    origins: list[str] | None = None  # caption origins to use (None: all but "gold")
    min_score: float | None = None  # keep captions with score >= this (unscored pass)
    top_k: int | None = None  # per image and language, keep the k best-scored captions
    captions: str = "one"  # "one": one caption per image per pass (CAPIVARA); "all"
    embeddings: str = "auto"  # "auto" | "always" | "never": use the embedding column
    image_root: str | None = None  # base for relative image paths (default: shard folder)
    with_source: bool = False  # also yield the caption each translation came from
    batch_size: int = 64
    shuffle_buffer: int = 2048
    num_workers: int = 0
    drop_last: bool = True
    augment: bool = False  # use open_clip's training transform instead of the eval one


@dataclass
class MethodConfig:
    name: str = "clip"  # a registered method (training.methods.METHODS)
    image_tower: str = "locked"  # "locked" (LiT) | "trainable"
    unlocked_groups: int = 0  # with "locked": unlock the last N groups of the image tower
    text_tower: str = "lora"  # "lora" | "full" | "frozen"
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] = field(default_factory=lambda: ["proj"])
    train_logit_scale: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # knobs for plugin methods


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float | None = 1.0


@dataclass
class RunConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    grad_checkpointing: bool = True
    log_every: int = 10
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir when present
    progress: bool = True
    plot: bool = True
    export: bool = True  # write export/ (merged open_clip) and adapter/ (peft) at the end
    threads: int | None = None  # torch CPU threads


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, data, "")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {sorted(unknown)} in {where or 'top level'}; "
            f"known: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _SECTIONS.get(fields[name].type) if isinstance(fields[name].type, str) else None
        if sub is not None:
            kwargs[name] = _build(sub, value or {}, f"{where}{name}.")
        elif name == "betas" and value is not None:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "ModelConfig": ModelConfig,
    "DataConfig": DataConfig,
    "MethodConfig": MethodConfig,
    "OptimConfig": OptimConfig,
    "RunConfig": RunConfig,
}


def options_from(cls: type, options: Mapping[str, Any] | None, what: str) -> Any:
    """Build a method's options dataclass from `method.options`; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    options = dict(options or {})
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown {what} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**options)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; learning rates are written that way (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _yaml(raw)
    return data


def expand_vars(value: Any) -> Any:
    """Expand `${VAR}` in every string (e.g. `${BABELCAP_WORLD}/models/clip-base`)."""
    if isinstance(value, dict):
        return {k: expand_vars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v) for v in value]
    if isinstance(value, str):
        expanded = os.path.expandvars(value)
        if "${" in expanded:
            raise ValueError(f"config value {value!r} uses an unset environment variable")
        return expanded
    return value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Load a YAML config (or start from defaults), apply `section.key=value` overrides and
    expand `${VAR}` environment variables in strings."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = _yaml(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a training config must be a mapping")
        data = loaded or {}
    return TrainConfig.from_dict(expand_vars(apply_overrides(data, overrides)))

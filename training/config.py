"""Training configuration as data: pydantic models (`babelcap.core.config`), loaded from YAML
and/or `section.key=value` overrides.

Five sections (model, data, method, optim, run); unknown keys are errors naming the key, values
are checked when the config is built, numbers are read the same way everywhere (`3e-4` is a
float). LoRA settings are defined once, in `LoraConfig`: the text tower's LoRA of the CLIP
method (`method.lora`) and the per-language adapters of the alignment method
(`method.options.adapter`, `training.adapters.AdapterSpec`) are both `LoraConfig`s.

The resolved configuration is saved next to the checkpoints (`config.yaml`), so a run
describes itself and `--resume` can pick it up again.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from babelcap.core.config import ConfigError, ConfigModel
from babelcap.core.lists import parse_list

__all__ = [
    "DEFAULT_FEEDFORWARD",
    "DEFAULT_TARGETS",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "options_from",
]

# peft's matching rules for Hugging Face BERT-style towers (XLM-R naming).
DEFAULT_TARGETS = {"lora": ["query", "value"], "ia3": ["key", "value", "output.dense"]}
DEFAULT_FEEDFORWARD = {"ia3": ["output.dense"]}


def _list_or_none(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expected a list or a comma-separated string")
    return parse_list(value)


class ModelConfig(ConfigModel):
    name: str = Field(
        "xlm-roberta-base-ViT-B-32",
        description="open_clip model name, model config JSON (open_clip format or an "
        "open_clip_config.json with model_cfg), or a folder holding open_clip_config.json",
    )
    pretrained: str | None = Field(
        None, description="open_clip tag or checkpoint path (.safetensors / .pt)"
    )
    text_tower: str | None = Field(
        None, description="local Hugging Face directory replacing the text tower"
    )
    pretrained_text: bool = Field(
        True, description="load the HF text tower weights when no CLIP checkpoint is given"
    )


class DataConfig(ConfigModel):
    train: list[str] = Field(
        default_factory=list, description="shard files, directories, globs or URIs"
    )
    languages: list[str] | None = Field(
        None, description='caption languages to train on, e.g. "pt, es" (None: all)'
    )
    origins: list[str] | None = Field(
        None, description='caption origins to use (None: all but "gold")'
    )
    splits: list[str] | None = Field(
        ["train"],
        description="rows of these `split` values (rows without a split are always read; "
        "None: every row)",
    )
    min_score: float | None = Field(None, description="keep captions with score >= this")
    top_k: int | None = Field(
        None, ge=1, description="per image and language, keep the k best-scored captions"
    )
    captions: Literal["one", "all"] = Field(
        "one", description='"one": one caption per image per pass (CAPIVARA); "all"'
    )
    embeddings: Literal["auto", "always", "never"] = Field(
        "auto", description="use the shards' image-embedding column"
    )
    image_root: str | None = Field(
        None, description="base for relative image paths (default: the shard's folder)"
    )
    with_source: bool = Field(False, description="also yield the caption each came from")
    batch_size: int = Field(64, ge=1)
    shuffle_buffer: int = Field(2048, ge=0)
    num_workers: int = Field(0, ge=0)
    streams: int | None = Field(
        None,
        ge=1,
        description="streams the row groups are dealt to, batch_size / streams samples of each "
        "per global batch (None: one per process); the same value gives the same batches on "
        "any number of processes dividing it",
    )
    drop_last: bool = True
    augment: bool = Field(False, description="open_clip's training transform, not the eval one")

    @field_validator("train", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("languages", "origins", "splits", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> list[str] | None:
        return _list_or_none(value)


class LoraConfig(ConfigModel):
    """A parameter-efficient module on the Hugging Face text tower (peft): LoRA or (IA)3.

    The one definition of LoRA settings: the CLIP method's text-tower LoRA (`method.lora`,
    which also trains the projection: `modules_to_save: [proj]`) and every per-language
    adapter (`method.options.adapter`; `training.adapters.AdapterSpec` is this class).
    """

    kind: Literal["lora", "ia3"] = Field("lora", description="lora | ia3")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(8, ge=1, description="LoRA alpha (scale alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | None = Field(
        None,
        description="module names to adapt (None: query, value for lora; "
        "key, value, output.dense for ia3)",
    )
    feedforward_modules: list[str] | None = Field(
        None, description="(IA)3 only: feed-forward modules (None: output.dense)"
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description='modules trained in full, e.g. ["proj"]'
    )

    @field_validator("target_modules", "feedforward_modules", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> list[str] | None:
        return _list_or_none(value)

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _saved(cls, value: Any) -> list[str]:
        return _list_or_none(value) or []

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> LoraConfig:
        """From a plain dict (e.g. `method.options.adapter`); unknown keys are an error."""
        return cls.from_dict(options or {}, prefix="method.options.adapter")

    @property
    def targets(self) -> list[str]:
        return list(self.target_modules or DEFAULT_TARGETS[self.kind])

    @property
    def feedforward(self) -> list[str]:
        return list(self.feedforward_modules or DEFAULT_FEEDFORWARD.get(self.kind, []))

    def peft_config(self):
        """The peft config object for these settings."""
        import peft

        save = list(self.modules_to_save) or None
        if self.kind == "ia3":
            return peft.IA3Config(
                target_modules=self.targets,
                feedforward_modules=self.feedforward,
                modules_to_save=save,
            )
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets,
            modules_to_save=save,
            bias="none",
        )


# The flat keys of earlier configs (`method.lora_r: 8`): read into `method.lora`, with a warning.
_FLAT_LORA_KEYS = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "modules_to_save": "modules_to_save",
}


def _method_lora_default() -> LoraConfig:
    # CAPIVARA: LoRA r=8, alpha=8 on query/value, the projection trained in full.
    return LoraConfig(modules_to_save=["proj"])


class MethodConfig(ConfigModel):
    name: str = Field("clip", description="a registered method (training.runs.METHODS)")
    image_tower: Literal["locked", "trainable"] = Field(
        "locked", description='"locked" (LiT) | "trainable"'
    )
    unlocked_groups: int = Field(
        0, ge=0, description='with "locked": unlock the last N groups of the image tower'
    )
    text_tower: Literal["lora", "full", "frozen"] = Field(
        "lora", description="lora | full | frozen"
    )
    lora: LoraConfig = Field(
        default_factory=_method_lora_default,
        description="the text tower's LoRA (with text_tower: lora)",
    )
    train_logit_scale: bool = False
    options: dict[str, Any] = Field(
        default_factory=dict, description="knobs for plugin methods (method.options.KEY)"
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_lora_keys(cls, data: Any) -> Any:
        return _fold_flat_lora(data) if isinstance(data, Mapping) else data

    @field_validator("lora")
    @classmethod
    def _lora_kind(cls, value: LoraConfig) -> LoraConfig:
        if value.kind != "lora":
            raise ValueError("the text tower's method.lora must be kind lora (ia3 is for adapters)")
        return value


def _fold_flat_lora(data: Mapping[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in data.items() if k in _FLAT_LORA_KEYS}
    if not flat:
        return dict(data)
    warnings.warn(
        f"method.{', method.'.join(flat)}: deprecated; write method.lora: "
        f"{{{', '.join(_FLAT_LORA_KEYS[k] for k in flat)}: ...}}",
        FutureWarning,
        stacklevel=2,
    )
    out = {k: v for k, v in data.items() if k not in _FLAT_LORA_KEYS}
    lora = out.get("lora")
    lora = dict(lora.model_dump() if isinstance(lora, BaseModel) else lora or {})
    for key, value in flat.items():
        lora[_FLAT_LORA_KEYS[key]] = value
    out["lora"] = lora
    return out


class OptimConfig(ConfigModel):
    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = Field(50, ge=0)
    max_steps: int = Field(1000, ge=0, description="optimizer steps")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, description="max gradient norm (None: no clipping)")


class RunConfig(ConfigModel):
    output_dir: str = "runs/train"
    seed: int = Field(0, description="the run's seed (data order, initialisation, sampling)")
    device: str = Field("auto", description='"auto" | "cpu" | "cuda" | "cuda:1"')
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description='"auto": bf16 on GPU, fp32 on CPU'
    )
    grad_checkpointing: bool = True
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = Field(
        True, description="continue from the newest checkpoint in output_dir when present"
    )
    progress: bool = True
    plot: bool = True
    export: bool = Field(
        True, description="write export/ (merged open_clip) and adapter/ (peft) at the end"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    release_memory: bool = Field(
        True,
        description="return freed tensor memory to the OS (glibc), map the CPU weights from "
        "a .safetensors checkpoint instead of copying them (frozen weights cost only the pages "
        "read) and read a frozen vocabulary table from it a batch's rows at a time",
    )
    record_training_images: bool = Field(
        True,
        description="write training_images.parquet (ids + perceptual hashes of the images "
        "trained on, the base model's included) so evaluations can refuse contaminated sets",
    )


class TrainConfig(ConfigModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)


def options_from(cls: type, options: Mapping[str, Any] | None, what: str) -> Any:
    """A method's options (`method.options`) as `cls`: a dataclass or a ConfigModel.

    Unknown keys are an error naming them; values are checked against the field types and
    numbers are read as everywhere else (`"3e-4"` is a float)."""
    options = dict(options or {})
    if isinstance(cls, type) and issubclass(cls, ConfigModel):
        return cls.from_dict(options, prefix="method.options")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is neither a dataclass nor a ConfigModel")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown {what} option(s) {unknown} in method.options; known: {sorted(known)}"
        )
    try:
        return TypeAdapter(cls).validate_python(options)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"method.options.{key}: {err['msg']} (got {err['input']!r})")
        raise ConfigError(f"invalid {what} options: " + "; ".join(lines)) from None


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    variables: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Load a YAML config (or start from defaults), apply `section.key=value` overrides and
    `${name}` variables (from `variables`, else the environment; see babelcap.core.config)."""
    return TrainConfig.load(path, overrides, variables)

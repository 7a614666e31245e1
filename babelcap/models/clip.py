"""CLIP models through open_clip's own factory: by name + pretrained tag, from a checkpoint, from
a model config JSON (open_clip's format), or with a Hugging Face text tower in a local directory.

Relative `hf_model_name` / `hf_tokenizer_name` paths in a config file are resolved against the
file's folder, so a saved model folder can move. Resolved configs are registered with
`open_clip.add_model_config`, so everything downstream is plain open_clip.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's local-dir / hub format
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
)

_REGISTRY_DIR: Path | None = None


@dataclass
class ClipBundle:
    """A model with everything needed to feed it."""

    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any  # open_clip tokenizer (callable: list[str] -> LongTensor), or None
    name: str  # the open_clip model name it was created under
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    source: str | None = None  # the folder or config file it was loaded from, if local


def _registry_dir() -> Path:
    global _REGISTRY_DIR
    if _REGISTRY_DIR is None:
        _REGISTRY_DIR = Path(tempfile.mkdtemp(prefix="babelcap-open_clip-configs-"))
    return _REGISTRY_DIR


def register_model_config(cfg: dict[str, Any], name: str) -> str:
    """Register a model config with open_clip under a unique name derived from `name`."""
    import open_clip

    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    reg_name = f"{name}-{digest}"
    path = _registry_dir() / f"{reg_name}.json"
    if not path.exists():
        path.write_text(json.dumps(cfg, indent=2))
        open_clip.add_model_config(path)
    return reg_name


def _resolve_paths(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    text_cfg = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if not value:
            continue
        if not os.path.isabs(value) and (base / value).exists():
            text_cfg[key] = str((base / value).resolve())
        elif (
            os.path.isabs(value)
            and not os.path.exists(value)
            and (base / Path(value).name).is_dir()
        ):
            # The folder moved (or was renamed after the build): its text tower moved with it.
            text_cfg[key] = str((base / Path(value).name).resolve())
    return cfg


def read_model_config(name: str) -> tuple[str, dict[str, Any], dict[str, Any], str | None]:
    """Resolve `name` to (base name, model_cfg, preprocess_cfg, default checkpoint or None)."""
    import open_clip

    path = Path(name)
    checkpoint = None
    if path.is_dir():
        cfg_path = path / OPEN_CLIP_CONFIG
        if not cfg_path.exists():
            raise FileNotFoundError(
                f"{path}: no {OPEN_CLIP_CONFIG} (not an open_clip model folder)"
            )
        checkpoint = next((str(path / c) for c in CHECKPOINT_NAMES if (path / c).exists()), None)
        path = cfg_path
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        model_cfg = data.get("model_cfg", data)
        if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(
                f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)"
            )
        base = path.parent.name if path.name == OPEN_CLIP_CONFIG else path.stem
        return (
            base,
            _resolve_paths(copy.deepcopy(model_cfg), path.parent),
            data.get("preprocess_cfg", {}),
            checkpoint,
        )
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown open_clip model {name!r}: not a registered name, a config "
            "JSON file or a folder with open_clip_config.json"
        )
    return name, cfg, {}, None


def load_clip(
    name: str,
    pretrained: str | None = None,
    *,
    text_tower: str | None = None,
    pretrained_text: bool = True,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
) -> ClipBundle:
    """Create an open_clip model (+ transforms + tokenizer) through `create_model_and_transforms`."""
    import open_clip

    base, model_cfg, preprocess_cfg, default_ckpt = read_model_config(name)
    pretrained = pretrained or default_ckpt
    if text_tower:
        model_cfg["text_cfg"]["hf_model_name"] = str(Path(text_tower).resolve())
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(Path(text_tower).resolve())
    builtin = open_clip.get_model_config(name)
    if builtin is not None and builtin == model_cfg:
        reg_name = name  # keep built-in names so pretrained tags still resolve
    else:
        reg_name = register_model_config(model_cfg, base)
    model, pre_train, pre_val = open_clip.create_model_and_transforms(
        reg_name,
        pretrained=pretrained,
        device=device,
        pretrained_text=pretrained_text,
        **{
            f"image_{k}": v
            for k, v in preprocess_cfg.items()
            if k in ("mean", "std", "interpolation", "resize_mode")
        },
    )
    tokenizer = open_clip.get_tokenizer(reg_name) if with_tokenizer else None
    pad_id = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
    if model_cfg.get("text_cfg", {}).get("hf_model_name") and pad_id is not None:
        tokenizer = TrimmedTokenizer(tokenizer)  # attention-masked: padding changes nothing
    return ClipBundle(
        model,
        pre_train,
        pre_val,
        tokenizer,
        reg_name,
        model_cfg,
        preprocess_cfg=dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
        pretrained=pretrained,
        source=str(Path(name).resolve()) if Path(name).exists() else None,
    )


def trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the padding columns past the longest text of the batch (at least one column)."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return tokens[:, :length]


class TrimmedTokenizer:
    """open_clip's HF tokenizer pads every text to the context length (77 for the published
    models). An attention-masked HF tower gives the same features without the padding columns
    past the batch's longest text, for a fraction of the time and activation memory (a caption
    is ~15-25 tokens). Everything else is the wrapped tokenizer's (read and written through)."""

    _own = ("inner",)

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "inner", inner)

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = self.inner(texts, *args, **kwargs)
        return trim_padding(tokens, self.inner.tokenizer.pad_token_id)

    def __getattr__(self, name: str) -> Any:
        if name in self._own or name.startswith("__"):  # during unpickling: no inner yet
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)  # e.g. a continual run's grown vocabulary

    def __getstate__(self) -> dict[str, Any]:
        return {"inner": self.inner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "inner", state["inner"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip model inside DDP / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def image_tower_id(model: torch.nn.Module) -> str:
    """Content id of the image tower: which tower made an embedding column.

    A hash of the visual weights (names, shapes, dtypes and values), so embeddings from one tower
    are never mixed with another's, whatever the tower was called.
    """
    visual = unwrap(model).visual
    cached = getattr(visual, "_babelcap_id", None)
    if cached is not None:
        return cached
    visual._babelcap_id = visual_tower_id(visual)
    return visual._babelcap_id


def visual_tower_id(visual: torch.nn.Module) -> str:
    """`image_tower_id` of an image tower itself, computed afresh (never the cached id)."""
    return f"open_clip-visual-{weights_id(visual)}"


def weights_id(module: torch.nn.Module) -> str:
    """Content hash of a module's weights (names, shapes and values)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}

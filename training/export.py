"""Export: a merged open_clip checkpoint and the peft adapter.

`export_open_clip` writes a folder that open_clip loads on its own and that can be moved:

    out/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}  (local-dir format)
    out/<name>.json                  the plain model config, for open_clip.add_model_config
    out/open_clip_model.safetensors  weights (LoRA merged into the text tower)
    out/text/                        the HF text tower's config + tokenizer (no weights needed)
    out/tokenizer*.json ...          the tokenizer again, where get_tokenizer("local-dir:") looks

No absolute path is written: both configs name the text tower `text`, a path relative to the
folder. babelcap's loader (`babelcap.models.clip.load_clip(out)`) resolves it against the folder
from any working directory; plain open_clip resolves it against the working directory, so run
it from the folder (`local-dir:.`):

    open_clip.get_tokenizer("local-dir:out")                 # any working directory
    open_clip.create_model_and_transforms("local-dir:.")     # working directory: out/
    open_clip.add_model_config("out/<name>.json")            # then, from out/:
    open_clip.create_model_and_transforms("<name>", pretrained="open_clip_model.safetensors")

`export_adapter` writes peft's adapter folder (adapter_config.json + adapter_model.safetensors)
that `peft.PeftModel.from_pretrained(base_model.text, adapter_dir)` loads, with a model card
(README.md: base model, languages, adapter settings, data, training metrics) and a logical
base model name in `base_model_name_or_path` (see `training.adapters.write_adapter_card`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from babelcap.models.clip import ClipBundle, unwrap
from babelcap.training.lit import is_peft_text

CHECKPOINT = "open_clip_model.safetensors"


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with LoRA merged into the text tower (the original stays as it is)."""
    model = copy.deepcopy(unwrap(model)).cpu()
    if is_peft_text(model):
        model.text = model.text.merge_and_unload()
    return model


TEXT_DIR = "text"  # the text tower's folder inside an export, named relatively in its configs


def _save_text_files(bundle: ClipBundle, out: Path) -> None:
    """Keep the HF config + tokenizer next to the weights so the export is self-contained; the
    tokenizer also at the top, where open_clip's `get_tokenizer("local-dir:...")` looks."""
    text_dir = out / TEXT_DIR
    text_dir.mkdir(parents=True, exist_ok=True)
    raw = unwrap(bundle.model)
    text = raw.text.get_base_model() if is_peft_text(raw) else raw.text
    text.config.save_pretrained(text_dir)
    tok = getattr(bundle.tokenizer, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(text_dir)
        tok.save_pretrained(out)


def export_open_clip(
    bundle: ClipBundle,
    out_dir: str | Path,
    name: str | None = None,
    model: torch.nn.Module | None = None,
) -> Path:
    """Write a merged open_clip checkpoint + configs; returns the checkpoint path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or "babelcap-" + bundle.name
    merged = merged_model(model if model is not None else bundle.model)
    state = {k: v.detach().contiguous().clone() for k, v in merged.state_dict().items()}
    save_file(state, str(out / CHECKPOINT), metadata={"format": "pt", "babelcap": name})

    model_cfg = copy.deepcopy(bundle.model_cfg)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        _save_text_files(bundle, out)
        # Relative: the folder moves as a whole (see the module doc for how each loader
        # resolves it).
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = TEXT_DIR
    (out / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
    local = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(merged)}
    (out / "open_clip_config.json").write_text(json.dumps(local, indent=2))
    return out / CHECKPOINT


def _preprocess_cfg(model: torch.nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def export_adapter(
    model: torch.nn.Module,
    out_dir: str | Path,
    base_model: str | None = None,
    run_dir: str | Path | None = None,
) -> Path:
    """Save the peft adapter of the text tower (adapter_config.json + adapter_model.safetensors)
    with its model card. `base_model` is the logical name recorded for the base (default: the
    base CLIP's folder name); the card's data and metrics come from the training run folder
    `run_dir` (default: the adapter folder's parent, where the trainer writes it)."""
    from babelcap.training.adapters import write_adapter_card

    raw = unwrap(model)
    if not is_peft_text(raw):
        raise ValueError("this model has no peft adapter (text tower not trained with LoRA)")
    out = Path(out_dir)
    raw.text.save_pretrained(str(out), safe_serialization=True)
    write_adapter_card(raw, out, base_model=base_model, run_dir=run_dir)
    return out


def load_adapter(bundle: ClipBundle, adapter_dir: str | Path, merge: bool = False) -> ClipBundle:
    """Attach a saved peft adapter to a base model's text tower (optionally merged)."""
    from peft import PeftModel

    model = unwrap(bundle.model)
    model.text = PeftModel.from_pretrained(model.text, str(adapter_dir))
    if merge:
        model.text = model.text.merge_and_unload()
    return bundle

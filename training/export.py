"""Export: a merged open_clip checkpoint and the peft adapter.

`export_open_clip` writes a folder that open_clip loads on its own:

    out/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}  (local-dir format)
    out/<name>.json                  the plain model config, for open_clip.add_model_config
    out/open_clip_model.safetensors  weights (LoRA merged into the text tower)
    out/text/                        the HF text tower's config + tokenizer (no weights needed)

    open_clip.create_model_and_transforms("local-dir:out")
    open_clip.add_model_config("out/<name>.json")
    open_clip.create_model_and_transforms("<name>", pretrained="out/open_clip_model.safetensors")

`export_adapter` writes peft's adapter folder (adapter_config.json + adapter_model.safetensors)
that `peft.PeftModel.from_pretrained(base_model.text, adapter_dir)` loads.
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


def _save_text_files(bundle: ClipBundle, text_dir: Path) -> None:
    """Keep the HF config + tokenizer next to the weights so the export is self-contained."""
    text_dir.mkdir(parents=True, exist_ok=True)
    raw = unwrap(bundle.model)
    text = raw.text.get_base_model() if is_peft_text(raw) else raw.text
    text.config.save_pretrained(text_dir)
    tok = getattr(bundle.tokenizer, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(text_dir)


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
        _save_text_files(bundle, out / "text")
        # Absolute paths so open_clip finds the tower from any working directory; our own
        # loader (babelcap.models.clip) also accepts the folder after it has moved.
        text_cfg["hf_model_name"] = str((out / "text").resolve())
        text_cfg["hf_tokenizer_name"] = str((out / "text").resolve())
    (out / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
    local = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(merged)}
    (out / "open_clip_config.json").write_text(json.dumps(local, indent=2))
    return out / CHECKPOINT


def _preprocess_cfg(model: torch.nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def export_adapter(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Save the peft adapter of the text tower (adapter_config.json + adapter_model.safetensors)."""
    raw = unwrap(model)
    if not is_peft_text(raw):
        raise ValueError("this model has no peft adapter (text tower not trained with LoRA)")
    out = Path(out_dir)
    raw.text.save_pretrained(str(out), safe_serialization=True)
    return out


def load_adapter(bundle: ClipBundle, adapter_dir: str | Path, merge: bool = False) -> ClipBundle:
    """Attach a saved peft adapter to a base model's text tower (optionally merged)."""
    from peft import PeftModel

    model = unwrap(bundle.model)
    model.text = PeftModel.from_pretrained(model.text, str(adapter_dir))
    if merge:
        model.text = model.text.merge_and_unload()
    return bundle

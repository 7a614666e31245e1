"""Which parameters train: LiT (locked image tower), LoRA through peft, full or frozen text tower.

LoRA wraps the open_clip Hugging Face text tower (`HFTextEncoder`: transformer + pooler + proj)
with `peft.get_peft_model`, so the adapter peft saves also holds the modules to save (the
projection) and `PeftModel.from_pretrained(text_tower, adapter_dir)` restores it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def lock_image_tower(model: torch.nn.Module, unlocked_groups: int = 0) -> None:
    """LiT: no gradients in the image tower (except the last `unlocked_groups` groups)."""
    if unlocked_groups:
        model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=True)
    else:
        for p in model.visual.parameters():
            p.requires_grad = False


def image_tower_locked(model: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in model.visual.parameters())


def is_hf_text(model: torch.nn.Module) -> bool:
    return hasattr(model, "text") and hasattr(model.text, "transformer")


def apply_lora(
    model: torch.nn.Module,
    r: int = 8,
    alpha: int = 8,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("query", "value"),
    modules_to_save: Sequence[str] = ("proj",),
) -> torch.nn.Module:
    """Replace `model.text` by a peft LoRA model; only LoRA weights + modules_to_save train."""
    from peft import LoraConfig, get_peft_model

    if not is_hf_text(model):
        raise ValueError(
            "LoRA needs an open_clip model with a Hugging Face text tower "
            "(text_cfg.hf_model_name), e.g. xlm-roberta-base-ViT-B-32"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )
    model.text = get_peft_model(model.text, config)
    return model


def is_peft_text(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(getattr(model, "text", None), PeftModel)


def text_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face transformer inside the (possibly peft-wrapped) text tower."""
    text = model.text
    if is_peft_text(model):
        text = text.get_base_model()
    return text.transformer


def enable_grad_checkpointing(model: torch.nn.Module, image_tower: bool = False) -> None:
    """Gradient checkpointing on the text tower (and the image tower when it trains)."""
    if is_hf_text(model) or is_peft_text(model):
        hf = text_transformer(model)
        enable = getattr(hf, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # open_clip's own text transformer: its switch covers both towers
        model.set_grad_checkpointing(True)
    if image_tower:
        model.visual.set_grad_checkpointing(True)


def select_parameters(
    model: torch.nn.Module,
    image_tower: str = "locked",
    unlocked_groups: int = 0,
    text_tower: str = "lora",
    lora: dict | None = None,
    train_logit_scale: bool = False,
) -> torch.nn.Module:
    """Set requires_grad for a tuning strategy; returns the model (its text tower may be wrapped)."""
    if text_tower not in ("lora", "full", "frozen"):
        raise ValueError(f"text_tower must be lora, full or frozen, got {text_tower!r}")
    if image_tower not in ("locked", "trainable"):
        raise ValueError(f"image_tower must be locked or trainable, got {image_tower!r}")
    for p in model.parameters():
        p.requires_grad = True
    if image_tower == "locked":
        lock_image_tower(model, unlocked_groups)
    if text_tower == "lora":
        for p in model.text.parameters():
            p.requires_grad = False
        model = apply_lora(model, **(lora or {}))
    elif text_tower == "frozen":
        for p in model.text.parameters():
            p.requires_grad = False
    model.logit_scale.requires_grad = train_logit_scale or (
        image_tower == "trainable" and text_tower == "full"
    )
    if getattr(model, "logit_bias", None) is not None:
        model.logit_bias.requires_grad = model.logit_scale.requires_grad
    return model


def lora_parameter_formula(
    model: torch.nn.Module, r: int, target_modules: Sequence[str], modules_to_save: Sequence[str]
) -> int:
    """Expected trainable count: r*(d_in+d_out) per adapted Linear + the saved modules' params.

    Computed on the model *before* `apply_lora` (plain HF text tower).
    """
    count = 0
    for name, module in model.text.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(module, torch.nn.Linear) and leaf in target_modules:
            count += r * (module.in_features + module.out_features)
    for name in modules_to_save:
        count += sum(p.numel() for p in getattr(model.text, name).parameters())
    return count

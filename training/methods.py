"""Training methods: a method decides which parameters train and which loss they minimise.

The trainer calls `setup`, `attach`, `train_mode` and `loss` (and saves `state_dict` in its
checkpoints), so new methods (translation alignment, per-language adapters, continual learning)
plug in by subclassing `ClipMethod`; `training.runs.METHODS` maps the names used in
`method.name` to the classes. A method never imports the trainer or a driver: runs of several
stages, or runs that derive their data selection from the method's options, are drivers
(`training.runs.DRIVERS`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from babelcap.models.clip import unwrap
from babelcap.training.config import MethodConfig
from babelcap.training.lit import image_tower_locked, select_parameters
from babelcap.training.losses import clip_loss_fn

# The names `method.name` gives this module's method (CLIP contrastive training).
CLIP_METHOD_NAMES = ("clip", "capivara")


class ClipMethod:
    """CLIP contrastive training with a tuning strategy: LiT + LoRA (CAPIVARA), full, frozen."""

    name = "clip"

    def __init__(self, cfg: MethodConfig, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.clip_loss = clip_loss_fn(rank, world_size)

    @property
    def grad_checkpointing_safe(self) -> bool:
        """Whether re-running the forward in the backward pass (checkpointing) gives the same
        computation; not so when the forward switches modules mid-batch (per-language adapters)."""
        return True

    @property
    def merged_export(self) -> bool:
        """Whether the trained model is one model the trainer can export merged (`export/`); not
        so when each language has its own adapter (a merged checkpoint holds one only)."""
        return True

    # -- parameters
    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Choose the trainable parameters (may wrap submodules); returns the model."""
        cfg = self.cfg
        return select_parameters(
            model,
            image_tower=cfg.image_tower,
            unlocked_groups=cfg.unlocked_groups,
            text_tower=cfg.text_tower,
            lora={
                "r": cfg.lora.r,
                "alpha": cfg.lora.alpha,
                "dropout": cfg.lora.dropout,
                "target_modules": tuple(cfg.lora.targets),
                "modules_to_save": tuple(cfg.lora.modules_to_save),
            },
            train_logit_scale=cfg.train_logit_scale,
        )

    def attach(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        """Called by the trainer once its optimizer exists (e.g. to hook the updates)."""
        return None

    def train_mode(self, model: torch.nn.Module) -> None:
        """Train mode, but frozen towers stay in eval mode (no dropout, fixed norm stats)."""
        model.train()
        raw = unwrap(model)
        if image_tower_locked(raw):
            raw.visual.eval()
        if self.cfg.text_tower == "frozen":
            raw.text.eval()

    # -- loss
    def encode(self, model: torch.nn.Module, batch: dict[str, Any]):
        """(normalised image features, normalised text features, logit scale) for a batch."""
        raw = unwrap(model)
        images = batch.get("images")
        if "image_features" in batch:
            image_features = F.normalize(batch["image_features"].float(), dim=-1)
            images = None
        elif image_tower_locked(raw):
            with torch.no_grad():  # LiT: nothing to learn there, keep no activations
                image_features = raw.encode_image(images, normalize=True)
            images = None
        else:
            image_features = None
        # The text (and a training image tower) go through the possibly DDP-wrapped model.
        out = model(image=images, text=batch["text"])
        if isinstance(out, dict):
            img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            img, txt, scale = out[0], out[1], out[2]
        if image_features is None:
            image_features = img
        return image_features, txt, scale

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        image_features, text_features, scale = self.encode(model, batch)
        loss = self.clip_loss(image_features.to(text_features.dtype), text_features, scale)
        return loss, {"loss_clip": float(loss.detach())}

    # -- extra state for plugins that carry some (teachers, language registries...)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

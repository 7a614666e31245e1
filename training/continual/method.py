"""One stage of continual language learning as a method: only the token embeddings train, on
MSE to a frozen teacher's English embedding plus a little image-text InfoNCE.

The stages themselves (vocabulary, growth, one training run per language, evaluation) are the
driver's job (`training.continual.driver`); this module knows nothing of it or of the trainer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from babelcap.models.clip import ClipBundle, unwrap
from babelcap.training.config import MethodConfig, options_from
from babelcap.training.continual.token_embeddings import (
    RowScaledUpdate,
    only_token_embeddings,
    word_embeddings,
)
from babelcap.training.methods import ClipMethod


@dataclass
class ContinualOptions:
    """`method.options` of `method.name: continual`."""

    languages: list[str] | None = None  # order of arrival (default: data.languages)
    teir: bool = True
    mse_weight: float = 1.0
    clip_weight: float = 0.01
    normalize_mse: bool = False  # MSE on normalised embeddings instead of raw ones
    vocab_size: int = 400  # sentencepiece pieces trained per language (before dropping known)
    max_vocab_captions: int = 200_000
    base_language: str = "en"
    count_base_language: bool = True  # the base language counts as an earlier user of tokens
    teacher: str | None = None  # frozen teacher model (default: the model of the first stage)
    steps_per_language: int | None = None  # default: optim.max_steps
    # Evaluation after every stage (the accuracy matrix): an evaluation dataset spec for
    # `training.eval_data.load_eval_data` ("world:DIR", "shards:PATH" or a shard path);
    # None: no evaluation, no matrix.
    eval_data: str | None = None
    eval_split: str | None = "test"
    eval_max_captions: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ContinualOptions:
        return options_from(cls, options, "continual")


class ContinualMethod(ClipMethod):
    """One stage of continual language learning: only token embeddings train.

    `teacher` (a ClipBundle) is the frozen model the English side comes from and `row_scale` the
    per-row gradient / update scale (TEIR); the driver passes both. Without a teacher the English
    side is the model's own embedding of the source caption before training (a frozen copy).
    """

    name = "continual"

    def __init__(
        self,
        cfg: MethodConfig,
        rank: int = 0,
        world_size: int = 1,
        teacher: ClipBundle | None = None,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__(cfg, rank, world_size)
        self.opts = ContinualOptions.from_options(cfg.options)
        self.teacher = teacher
        self.row_scale = row_scale
        self.scaler: RowScaledUpdate | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.teacher is None:  # a frozen copy of the model as it is now
            raw = unwrap(model)
            self.teacher = ClipBundle(copy.deepcopy(raw).eval(), None, None, None, "teacher", {})
        for p in self.teacher.model.parameters():
            p.requires_grad = False
        only_token_embeddings(model)
        return model

    def attach(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        """Install the per-row gradient / update scaling on the trainer's optimizer."""
        if self.row_scale is not None:
            self.scaler = RowScaledUpdate(word_embeddings(model).weight, self.row_scale)
            self.scaler.attach(optimizer)

    def train_mode(self, model: torch.nn.Module) -> None:
        # Everything but the embeddings is frozen: no dropout, the same function as the teacher.
        model.eval()
        self.teacher.model.eval()

    @torch.no_grad()
    def _teacher_text(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            teacher = self.teacher.model
            if next(teacher.parameters()).device != device:
                teacher.to(device)
            tokenizer = self.teacher.tokenizer
            tokens = tokenizer(missing) if tokenizer is not None else None
            if tokens is None:
                raise ValueError("the continual teacher needs its tokenizer")
            feats = teacher.encode_text(tokens.to(device)).float()
            for t, f in zip(missing, feats, strict=True):
                self._cache[t] = f.cpu()
        return torch.stack([self._cache[t] for t in texts]).to(device)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        if "source_captions" not in batch:
            raise ValueError(
                "continual learning needs each caption's English source: set data.with_source: true"
            )
        raw = unwrap(model)
        opts = self.opts
        text = raw.encode_text(batch["text"]).float()
        device = text.device
        target = self._teacher_text(batch["source_captions"], device)
        if opts.normalize_mse:
            l_mse = F.mse_loss(F.normalize(text, dim=-1), F.normalize(target, dim=-1))
        else:
            l_mse = F.mse_loss(text, target)
        if "image_features" in batch:
            image = F.normalize(batch["image_features"].float(), dim=-1)
        else:
            with torch.no_grad():  # the teacher's image tower (= the student's, frozen)
                image = self.teacher.model.encode_image(batch["images"], normalize=True).float()
        scale = raw.logit_scale.exp().detach()
        l_clip = self.clip_loss(image, F.normalize(text, dim=-1), scale)
        loss = opts.mse_weight * l_mse + opts.clip_weight * l_clip
        return loss, {"loss_mse": float(l_mse.detach()), "loss_clip": float(l_clip.detach())}

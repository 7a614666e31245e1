"""Translation-based alignment (PECTVLM): image-text contrastive loss on target-language captions
plus a loss pulling each caption's text embedding toward the embedding of its parallel English
text, with per-language parameter-efficient modules (`training.adapters`).

    loss = clip_weight * InfoNCE(image, text) + weight * align(text, english)
    align = "mse":     mean over pairs of ||t - e||^2 (normalised embeddings, = 2 - 2 cos)
            "infonce": symmetric text-text InfoNCE at `temperature` (in-batch negatives)

The English side comes from a frozen teacher (a copy of the text tower taken before training)
by default, or from the model itself (`teacher: self`: both sides move, as in PECTVLM).

Parallel pairs come from the shards: a caption's English partner is the end of its
`source_index` chain (the data reader's `with_source`). The pairing decides which captions are
the student side (`PAIRINGS`):

    native-en       native target caption (origin gold/source)      <-> original English
    native-mt       MT(English -> target) caption (origin translated) <-> its English source
    translate-test  MT(target -> English) caption (English, translated) <-> original English

Adapters (`method.options.adapters`): `per_language` (one per language, each trained only on
its language's captions: the batch is split by language and each part goes through its own
adapter), `shared` (one adapter for all languages: the baseline), or `none` (the base method's
text tower setting, e.g. CAPIVARA's LoRA, plus the alignment loss).

Config (`method.name: alignment`, knobs under `method.options`): loss, weight, clip_weight,
teacher, pairing, temperature, adapters, adapter {kind, r, alpha, dropout, target_modules,
feedforward_modules, modules_to_save}, languages.

This module is the method (parameters + loss) and the pairings' data selection; a run from a
user's configuration (the pairing's captions, adapters named after `data.languages`) is
`training.alignment_driver.run_alignment`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from babelcap.models.clip import unwrap
from babelcap.training import adapters as ad
from babelcap.training.config import LoraConfig, MethodConfig, TrainConfig, options_from
from babelcap.training.lit import image_tower_locked, select_parameters
from babelcap.training.methods import ClipMethod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pairing:
    """Which captions are the student side of the alignment (data selection)."""

    origins: tuple[str, ...]
    english_student: bool  # the student captions are English (translate-test)
    description: str


PAIRINGS: dict[str, Pairing] = {
    "native-en": Pairing(("gold", "source"), False, "native target caption <-> original English"),
    "native-mt": Pairing(
        ("translated",), False, "MT(English -> target) caption <-> its English source"
    ),
    "translate-test": Pairing(
        ("translated",), True, "MT(target -> English) caption <-> original English"
    ),
}


@dataclass
class AlignmentOptions:
    loss: str = "mse"  # "mse" | "infonce"
    weight: float = 1.0
    clip_weight: float = 1.0
    teacher: str = "frozen"  # "frozen" | "self"
    pairing: str = "native-en"
    temperature: float = 0.05
    adapters: str = "per_language"  # "per_language" | "shared" | "none"
    adapter: dict[str, Any] = field(default_factory=dict)  # config.LoraConfig fields
    languages: list[str] | None = None  # languages with an adapter (default: data.languages)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> AlignmentOptions:
        opts = options_from(cls, options, "alignment")
        checks = {
            "loss": ("mse", "infonce"),
            "teacher": ("frozen", "self"),
            "pairing": tuple(PAIRINGS),
            "adapters": ("per_language", "shared", "none"),
        }
        for name, allowed in checks.items():
            if getattr(opts, name) not in allowed:
                raise ValueError(
                    f"method.options.{name} must be one of {allowed}, got {getattr(opts, name)!r}"
                )
        return opts


def alignment_loss(
    student: torch.Tensor, anchor: torch.Tensor, kind: str = "mse", temperature: float = 0.05
) -> torch.Tensor:
    """Loss between normalised student and anchor embeddings (rows are parallel pairs)."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    s = F.normalize(student.float(), dim=-1)
    a = F.normalize(anchor.float(), dim=-1)
    if kind == "mse":
        return ((s - a) ** 2).sum(-1).mean()
    if kind == "infonce":
        logits = s @ a.T / temperature
        labels = torch.arange(len(s), device=s.device)
        if a.requires_grad:  # both sides learn: symmetric
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return F.cross_entropy(logits, labels)
    raise ValueError(f"alignment loss must be 'mse' or 'infonce', got {kind!r}")


def pairing_changes(data: Any, pairing: str) -> dict[str, Any]:
    """The data selection of a pairing, as changes to a configuration's `data` section
    (`TrainConfig.updated` keys): its captions, always with their English source."""
    spec = PAIRINGS[pairing]
    changes: dict[str, Any] = {"data.with_source": True}
    if data.origins is None:
        changes["data.origins"] = list(spec.origins)
    if spec.english_student:
        changes["data.languages"] = ["en"]
    elif data.languages:
        changes["data.languages"] = [lang for lang in data.languages if lang != "en"] or list(
            data.languages
        )
    return changes


def apply_pairing(cfg: TrainConfig, pairing: str) -> TrainConfig:
    """A copy of `cfg` whose data selection is the pairing's captions (`cfg` is not changed)."""
    return cfg.updated(pairing_changes(cfg.data, pairing))


def check_world_size(opts: AlignmentOptions, world_size: int) -> None:
    """Per-language adapters cannot run in several processes: raise a clear error."""
    if opts.adapters == "per_language" and world_size > 1:
        raise ValueError(
            "per-language adapters train in one process (the batch is split "
            "by language outside DDP); use adapters: shared with several GPUs"
        )


class AlignmentMethod(ClipMethod):
    """LiT + per-language (or shared) adapters + translation-based alignment loss."""

    name = "alignment"

    def __init__(self, cfg: MethodConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(cfg, rank, world_size)
        self.opts = AlignmentOptions.from_options(cfg.options)
        self.teacher: torch.nn.Module | None = None
        check_world_size(self.opts, world_size)

    @property
    def grad_checkpointing_safe(self) -> bool:
        # Checkpointed layers re-run their forward in the backward pass with whatever adapter
        # is active THEN (the batch's last language): the other languages' gradients would go
        # through the wrong adapter.
        return self.opts.adapters != "per_language"

    @property
    def merged_export(self) -> bool:
        # A merged checkpoint holds one adapter only: per-language models are the base model +
        # adapter/<lang>/ (training.adapters.load_language_adapters).
        return self.opts.adapters != "per_language"

    # -- parameters
    @property
    def adapter_names(self) -> list[str]:
        if self.opts.adapters == "shared":
            return [ad.SHARED]
        langs = list(self.opts.languages or [])
        if not langs:
            raise ValueError(
                "per-language adapters need the languages: set "
                "method.options.languages (or data.languages with `babelcap "
                "train`)"
            )
        return langs

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        raw = unwrap(model)
        if self.opts.teacher == "frozen":
            self.teacher = copy.deepcopy(raw.text).eval()
            for p in self.teacher.parameters():
                p.requires_grad = False
        if self.opts.adapters == "none":
            return super().setup(model)
        cfg = self.cfg
        model = select_parameters(
            model,
            image_tower=cfg.image_tower,
            unlocked_groups=cfg.unlocked_groups,
            text_tower="frozen",
            train_logit_scale=cfg.train_logit_scale,
        )
        spec = LoraConfig.from_options(self.opts.adapter)
        ad.add_language_adapters(model, self.adapter_names, spec)
        for name in self.adapter_names:
            size = ad.adapter_size(model, name)
            log.info(
                "adapter %s: %d parameters (%.3f%% of the model)",
                name,
                size["parameters"],
                size["percent"],
            )
        return model

    def train_mode(self, model: torch.nn.Module) -> None:
        model.train()
        raw = unwrap(model)
        if image_tower_locked(raw):
            raw.visual.eval()
        if self.teacher is not None:
            self.teacher.eval()

    # -- loss
    def _image_features(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        raw = unwrap(model)
        if "image_features" in batch:
            return F.normalize(batch["image_features"].float(), dim=-1)
        if image_tower_locked(raw):
            with torch.no_grad():
                return raw.encode_image(batch["images"], normalize=True)
        return raw.encode_image(batch["images"], normalize=True)

    def _anchors(self, raw: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:  # the model itself: both sides move
            return raw.encode_text(tokens, normalize=True)
        device = tokens.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return F.normalize(self.teacher(tokens).float(), dim=-1)

    def _groups(self, batch: dict[str, Any]) -> list[tuple[str | None, list[int]]]:
        n = len(batch["captions"])
        if self.opts.adapters != "per_language":
            return [(None, list(range(n)))]
        groups: dict[str, list[int]] = {}
        for i, lang in enumerate(batch["languages"]):
            groups.setdefault(lang, []).append(i)
        return sorted(groups.items())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        if "source_text" not in batch:
            raise ValueError(
                "the alignment method needs each caption's English source: set "
                "data.with_source: true"
            )
        raw = unwrap(model)
        opts = self.opts
        image_features = self._image_features(model, batch)
        scale = raw.logit_scale.exp()
        # Captions without a link come back as their own source: nothing to align there.
        linked = torch.tensor(
            [s != c for s, c in zip(batch["source_captions"], batch["captions"], strict=True)],
            device=batch["text"].device,
        )
        n = len(batch["captions"])
        total = image_features.new_zeros(())
        clip_sum, align_sum = 0.0, 0.0
        for lang, idx in self._groups(batch):
            if lang is not None:
                ad.set_language(raw, lang)
            index = torch.tensor(idx, device=batch["text"].device)
            text = raw.encode_text(batch["text"][index], normalize=True)
            img = image_features[index].to(text.dtype)
            l_clip = self.clip_loss(img, text, scale)
            mask = linked[index]
            anchors = self._anchors(raw, batch["source_text"][index][mask])
            l_align = alignment_loss(text[mask], anchors, opts.loss, opts.temperature)
            part = len(idx) / n
            total = total + part * (opts.clip_weight * l_clip + opts.weight * l_align)
            clip_sum += part * float(l_clip.detach())
            align_sum += part * float(l_align.detach())
        return total, {"loss_clip": clip_sum, "loss_align": align_sum}

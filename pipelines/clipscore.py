"""CLIP scores of English captions and (optionally) image embeddings, through RunInference.

One open_clip model serves both jobs, so an image goes through the image tower once: the
cosine similarity between the image and each English caption lands in the caption's `score`
(what `filters.SelectCaptions` filters on, CAPIVARA style), and with `embed_images` the
normalised image embedding lands in the row's `embedding` column with `embedding_model`.

The model is loaded by the trainer's own loader (`training.models.load_clip`), so scores and
cached embeddings come from exactly the model the trainer will use; `load_clip_model` is the
one place to swap that. The loaded model is a `ClipScorer` (a `ServedModel`): the handler sends
it the batch's encoded images and English captions and gets scores and embeddings back, so it
can be shared between worker processes (`model_copies`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference

from babelcap.core.devices import resolve_device
from babelcap.core.images import decode_rgb
from babelcap.models.clip import image_tower_id, load_clip
from babelcap.pipelines.accounting import bump
from babelcap.pipelines.captioning import FailedBatch
from babelcap.pipelines.models import (
    ModelSharing,
    ServedModel,
    limit_model_threads,
    local_model_path,
    served_method,
)
from babelcap.pipelines.options import ClipConfig

log = logging.getLogger(__name__)

STAGE = "clip"


def load_clip_model(cfg: ClipConfig, copies: int = 0) -> tuple[Any, Any, Any, str, str]:
    """(model, preprocess, tokenizer, device, model id) for `cfg`; `copies`: the model's copies
    shared per machine (0: this process's own), for its threads."""
    device = resolve_device(cfg.device)
    limit_model_threads(copies)
    name = local_model_path(cfg.model)
    pretrained = local_model_path(cfg.pretrained) if cfg.pretrained else None
    bundle = load_clip(name, pretrained, device=device)
    model, preprocess, tokenizer = bundle.model, bundle.preprocess_val, bundle.tokenizer
    model_id = image_tower_id(model)
    model.eval()
    return model, preprocess, tokenizer, device, model_id


class ClipScorer(ServedModel):
    """A loaded open_clip model: `score` gives a batch's image-caption scores and image
    embeddings (what `ClipModelHandler.load_model` returns; see `ServedModel`)."""

    def __init__(self, config: ClipConfig, max_image_pixels: int = 64_000_000, copies: int = 0):
        super().__init__()
        self.max_image_pixels = max_image_pixels
        self.net, self.preprocess, self.tokenizer, self.device, self.model_id = load_clip_model(
            config, copies
        )

    @served_method
    def score(
        self, images: list[bytes], texts: list[str], rows: list[int], embed: bool
    ) -> dict[str, Any]:
        """The encoded `images` through the image tower once: `scores[i]` is the cosine
        similarity of `texts[i]` with image `rows[i]`; with `embed`, `embeddings` holds the
        normalised image embeddings (float32, one row per image); `model_id` names the image
        tower."""
        import torch

        # Decoded and preprocessed outside the lock (a shared copy serves other callers
        # meanwhile); only the small preprocessed tensors are kept.
        pixels = torch.stack(
            [self.preprocess(decode_rgb(data, self.max_image_pixels)) for data in images]
        ).to(self.device)
        with self._lock, torch.inference_mode():
            img = self.net.encode_image(pixels)
            img = img / img.norm(dim=-1, keepdim=True)
            scores: list[float] = []
            if texts:
                txt = self.net.encode_text(self.tokenizer(texts).to(self.device))
                txt = txt / txt.norm(dim=-1, keepdim=True)
                where = torch.tensor(rows, device=self.device)
                scores = (img[where] * txt).sum(-1).float().cpu().tolist()
        return {
            "scores": scores,
            "embeddings": img.float().cpu().numpy() if embed else None,
            "model_id": self.model_id,
        }


class ClipModelHandler(ModelSharing, ModelHandler[dict, dict, Any]):
    """RunInference handler: records in, records with CLIP scores on their English captions
    (and image embeddings) out. `copies` >= 1 shares that many `ClipScorer`s per machine."""

    def __init__(self, config: ClipConfig, max_image_pixels: int = 64_000_000, copies: int = 0):
        super().__init__()
        self.config = config
        self.max_image_pixels = max_image_pixels
        self.copies = copies

    def load_model(self) -> ClipScorer:
        log.info("loading CLIP %s", self.config.model)
        return ClipScorer(self.config, self.max_image_pixels, self.copies)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self.config.batch_size, "max_batch_size": self.config.batch_size}

    def get_metrics_namespace(self) -> str:
        return "babelcap.clip"

    def run_inference(
        self, batch: Sequence[dict], model: Any, inference_args: dict | None = None
    ) -> Iterable[dict]:
        where: list[tuple[int, int]] = []
        texts: list[str] = []
        if self.config.score:
            for r, rec in enumerate(batch):
                for j, cap in enumerate(rec["captions"]):
                    if cap["language"] == "en":
                        where.append((r, j))
                        texts.append(cap["text"])
        got = model.score(
            [rec["data"] for rec in batch],
            texts,
            [r for r, _ in where],
            self.config.embed_images,
        )
        out = [dict(rec, captions=[dict(c) for c in rec["captions"]]) for rec in batch]
        for (r, j), score in zip(where, got["scores"], strict=True):
            out[r]["captions"][j]["score"] = round(float(score), 6)
        if self.config.embed_images:
            for rec, emb in zip(out, got["embeddings"], strict=True):
                rec["embedding"] = emb.tolist()
                rec["embedding_model"] = got["model_id"]
        per_record = [0] * len(out)
        for r, _ in where:
            per_record[r] += 1
        for rec, n in zip(out, per_record, strict=True):
            bump(rec, "clip.scored", n)
        return out


class ClipScore(beam.PTransform):
    """records -> (records with caption scores / embeddings, dead letters)."""

    def __init__(self, config: ClipConfig, max_image_pixels: int, model_copies: int = 0):
        super().__init__()
        self.handler = ClipModelHandler(config, max_image_pixels, copies=model_copies)

    def expand(self, records):
        main, other = (
            records | "RunInference" >> RunInference(self.handler).with_exception_handling()
        )
        dead = other.failed_inferences | "FailedToDead" >> beam.ParDo(
            FailedBatch(STAGE, "clip_failed")
        )
        return main, dead

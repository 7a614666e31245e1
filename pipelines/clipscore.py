"""CLIP scores of English captions and (optionally) image embeddings, through RunInference.

One open_clip model serves both jobs, so an image goes through the image tower once: the
cosine similarity between the image and each English caption lands in the caption's `score`
(what `filters.SelectCaptions` filters on, CAPIVARA style), and with `embed_images` the
normalised image embedding lands in the row's `embedding` column with `embedding_model`.

The model is loaded by the trainer's own loader (`training.models.load_clip`), so scores and
cached embeddings come from exactly the model the trainer will use; `load_clip_model` is the
one place to swap that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference

from babelcap.core.devices import limit_torch_threads, resolve_device
from babelcap.core.images import decode_rgb
from babelcap.models.clip import image_tower_id, load_clip
from babelcap.pipelines.accounting import bump
from babelcap.pipelines.captioning import FailedBatch
from babelcap.pipelines.models import Loaded, local_model_path
from babelcap.pipelines.options import ClipConfig

log = logging.getLogger(__name__)

STAGE = "clip"


def load_clip_model(cfg: ClipConfig) -> tuple[Any, Any, Any, str, str]:
    """(model, preprocess, tokenizer, device, model id) for `cfg`."""
    device = resolve_device(cfg.device)
    limit_torch_threads()
    name = local_model_path(cfg.model)
    pretrained = local_model_path(cfg.pretrained) if cfg.pretrained else None
    bundle = load_clip(name, pretrained, device=device)
    model, preprocess, tokenizer = bundle.model, bundle.preprocess_val, bundle.tokenizer
    model_id = image_tower_id(model)
    model.eval()
    return model, preprocess, tokenizer, device, model_id


class ClipModelHandler(ModelHandler[dict, dict, Any]):
    def __init__(self, config: ClipConfig, max_image_pixels: int = 64_000_000):
        super().__init__()
        self.config = config
        self.max_image_pixels = max_image_pixels

    def load_model(self) -> Any:
        log.info("loading CLIP %s", self.config.model)
        net, preprocess, tokenizer, device, model_id = load_clip_model(self.config)
        return Loaded(
            net=net, preprocess=preprocess, tokenizer=tokenizer, device=device, model_id=model_id
        )

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self.config.batch_size, "max_batch_size": self.config.batch_size}

    def share_model_across_processes(self) -> bool:
        return False

    def get_metrics_namespace(self) -> str:
        return "babelcap.clip"

    def run_inference(
        self, batch: Sequence[dict], model: Any, inference_args: dict | None = None
    ) -> Iterable[dict]:
        import torch

        net, preprocess, tokenizer = model.net, model.preprocess, model.tokenizer
        device, model_id = model.device, model.model_id
        images = torch.stack(
            [preprocess(decode_rgb(r["data"], self.max_image_pixels)) for r in batch]
        ).to(device)
        with torch.inference_mode():
            img = net.encode_image(images)
            img = img / img.norm(dim=-1, keepdim=True)
        where: list[tuple[int, int]] = []
        texts: list[str] = []
        if self.config.score:
            for r, rec in enumerate(batch):
                for j, cap in enumerate(rec["captions"]):
                    if cap["language"] == "en":
                        where.append((r, j))
                        texts.append(cap["text"])
        scores: list[float] = []
        if texts:
            with torch.inference_mode():
                txt = net.encode_text(tokenizer(texts).to(device))
                txt = txt / txt.norm(dim=-1, keepdim=True)
            rows = torch.tensor([r for r, _ in where], device=device)
            scores = (img[rows] * txt).sum(-1).float().cpu().tolist()
        out = [dict(rec, captions=[dict(c) for c in rec["captions"]]) for rec in batch]
        for (r, j), score in zip(where, scores, strict=True):
            out[r]["captions"][j]["score"] = round(float(score), 6)
        if self.config.embed_images:
            emb = img.float().cpu().numpy()
            for r, rec in enumerate(out):
                rec["embedding"] = emb[r].tolist()
                rec["embedding_model"] = model_id
        per_record = [0] * len(out)
        for r, _ in where:
            per_record[r] += 1
        for rec, n in zip(out, per_record, strict=True):
            bump(rec, "clip.scored", n)
        return out


class ClipScore(beam.PTransform):
    """records -> (records with caption scores / embeddings, dead letters)."""

    def __init__(self, config: ClipConfig, max_image_pixels: int):
        super().__init__()
        self.handler = ClipModelHandler(config, max_image_pixels)

    def expand(self, records):
        main, other = (
            records | "RunInference" >> RunInference(self.handler).with_exception_handling()
        )
        dead = other.failed_inferences | "FailedToDead" >> beam.ParDo(
            FailedBatch(STAGE, "clip_failed")
        )
        return main, dead

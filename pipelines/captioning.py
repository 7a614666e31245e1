"""Synthetic English captions through Beam's RunInference with a Hugging Face image-to-text model.

`CaptionModelHandler` loads any transformers image-to-text model (BLIP, BLIP-2, GIT,
VisionEncoderDecoder...) by hub name or path, through `AutoProcessor` and
`AutoModelForImageTextToText` (or the class named in the config), as a `Captioner`.
RunInference loads it once per worker process (or shares `model_copies` copies per machine
between the worker processes) and batches records. For each batch it writes `num_captions`
captions per image, one per prompt prefix (CAPIVARA's ten by default; prompts cycle when more
captions than prompts are asked for, which makes sense with sampling). Greedy / beam decoding
is deterministic; sampling is seeded per image and prompt, so a seed fixes the output whatever
the batching. With BLIP, the image work (decoding, preprocessing, the vision tower, the
decoder's cross-attention keys/values) is done once per batch and shared by the prompts, which
on a full-size BLIP-base is most of the cost of ten captions.

The handler sends the `Captioner` the batch's encoded images (the bytes it already holds: far
smaller than decoded pixels when the model is shared and they are pickled to its process),
the prompts and the seeds; it gets the texts back and builds the captions.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference

from babelcap.core import schema
from babelcap.core.devices import resolve_device
from babelcap.core.images import decode_rgb
from babelcap.core.paths import portable_ref
from babelcap.pipelines.accounting import bump
from babelcap.pipelines.deadletter import DEAD, reject
from babelcap.pipelines.models import (
    ModelSharing,
    ServedModel,
    limit_model_threads,
    local_model_path,
    served_method,
)

log = logging.getLogger(__name__)

STAGE = "caption"


def load_captioner(
    model: str, model_class: str | None, device: str, copies: int = 0
) -> tuple[Any, Any, str]:
    """(processor, model, device) through transformers' own loaders; fp16 on GPU. `copies`:
    the model's copies shared per machine (0: this process's own), for its threads."""
    import torch
    import transformers

    path = local_model_path(model)
    processor = transformers.AutoProcessor.from_pretrained(path)
    if model_class:
        klass = getattr(transformers, model_class)
    else:
        klass = getattr(transformers, "AutoModelForImageTextToText", None)
        klass = klass or transformers.AutoModelForVision2Seq  # transformers < 4.46
    device = resolve_device(device)
    limit_model_threads(copies)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    net = klass.from_pretrained(path, dtype=dtype)
    net.to(device).eval()
    return processor, net, device


def prompts_for(prompts: Sequence[str], num_captions: int) -> list[str]:
    """The prompt of each caption: the list cycled to `num_captions`."""
    if num_captions <= 0:
        return []
    items = list(prompts) or [""]
    return [items[i % len(items)] for i in range(num_captions)]


def _seed(seed: int, image_id: str, k: int) -> int:
    return int(hashlib.sha256(f"{seed}:{image_id}:{k}".encode()).hexdigest()[:8], 16)


class Captioner(ServedModel):
    """A loaded image-to-text model: `caption` writes a batch's captions (what
    `CaptionModelHandler.load_model` returns; see `ServedModel`)."""

    def __init__(self, config, max_image_pixels: int = 64_000_000, copies: int = 0):
        super().__init__()
        self.config = config  # options.CaptionerConfig
        self.max_image_pixels = max_image_pixels
        self.processor, self.net, self.device = load_captioner(
            config.model, config.model_class, config.device, copies
        )

    @served_method
    def caption(
        self, images: list[bytes], prompts: list[str], seeds: list[list[int]] | None = None
    ) -> list[list[str]]:
        """texts[prompt][image] for the encoded `images`, raw as the model decodes them;
        `seeds[k][i]` seeds the sampling of prompt k for image i (None: no sampling).

        BLIP: each image is decoded and preprocessed once and goes through the vision tower
        once per batch, and the decoder's cross-attention keys/values are computed once,
        whatever the number of prompts (the generic path repeats all three per prompt); the
        decoder then runs per prompt on them, exactly as `BlipForConditionalGeneration.generate`
        does (tests/test_captioning.py)."""
        from transformers import BlipForConditionalGeneration

        if not isinstance(self.net, BlipForConditionalGeneration):
            pics = [decode_rgb(data, self.max_image_pixels) for data in images]
            with self._lock:
                return [
                    self._generate(pics, p, None if seeds is None else seeds[k])
                    for k, p in enumerate(prompts)
                ]
        import torch

        processor, device, net = self.processor, self.device, self.net
        # One full-resolution image alive at a time: decode, preprocess, let it go. (Outside
        # the lock: a shared copy decodes one caller's images while it runs another's batch.)
        pixels = torch.cat(
            [
                processor(images=[decode_rgb(data, self.max_image_pixels)], return_tensors="pt")[
                    "pixel_values"
                ]
                for data in images
            ]
        ).to(device, dtype=net.dtype)
        with self._lock:
            return self._blip_captions(pixels, prompts, seeds)

    def _generate_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens}
        if cfg.sampling:
            kwargs.update(do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature)
        else:
            kwargs.update(do_sample=False, num_beams=cfg.num_beams)
        return kwargs

    def _generate(self, images: list[Any], prompt: str, seeds: list[int] | None) -> list[str]:
        """Any image-to-text model: the processor and `generate` per prompt."""
        import torch

        processor, net, device = self.processor, self.net, self.device
        kwargs = self._generate_kwargs()
        text = [prompt] * len(images) if prompt else None
        if seeds is None:
            inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
            inputs = inputs.to(device, dtype=net.dtype) if device.startswith("cuda") else inputs
            with torch.inference_mode():
                out = net.generate(**inputs, **kwargs)
            return processor.batch_decode(out, skip_special_tokens=True)
        texts = []
        for image, seed in zip(images, seeds, strict=True):  # sampling: one seeded call per image
            torch.manual_seed(seed)
            inputs = processor(images=[image], text=text[:1] if text else None, return_tensors="pt")
            inputs = inputs.to(device, dtype=net.dtype) if device.startswith("cuda") else inputs
            with torch.inference_mode():
                out = net.generate(**inputs, **kwargs)
            texts.extend(processor.batch_decode(out, skip_special_tokens=True))
        return texts

    def _blip_captions(
        self, pixels: Any, prompts: list[str], seeds: list[list[int]] | None
    ) -> list[list[str]]:
        """BLIP's captions from the batch's preprocessed `pixels` (see `caption`)."""
        import torch

        processor, device, net = self.processor, self.device, self.net
        text_cfg = net.config.text_config
        kwargs = self._generate_kwargs()
        with torch.inference_mode():
            embeds = net.vision_model(pixel_values=pixels)[0]
            # The decoder's cross-attention keys/values over the image tokens (577 at 384 px)
            # cost about half a vision pass; compute them once per batch, not once per prompt.
            # (Beam search expands the batch inside generate: it keeps generate's own cache.)
            cross = _cross_keys_values(net, embeds) if self.config.num_beams == 1 else None
        n = len(pixels)
        out: list[list[str]] = []
        for k, prompt in enumerate(prompts):
            if prompt:
                tok = processor(text=[prompt] * n, return_tensors="pt", padding=True)
                ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
            else:
                ids = torch.tensor([[text_cfg.bos_token_id, text_cfg.eos_token_id]] * n)
                ids, mask = ids.to(device), None
            ids[:, 0] = text_cfg.bos_token_id

            def decode(rows: slice, ids=ids, mask=mask) -> Any:
                feats = embeds[rows]
                return net.text_decoder.generate(
                    input_ids=ids[rows, :-1],
                    attention_mask=None if mask is None else mask[rows, :-1],
                    eos_token_id=text_cfg.sep_token_id,
                    pad_token_id=text_cfg.pad_token_id,
                    encoder_hidden_states=feats,
                    encoder_attention_mask=torch.ones(
                        feats.shape[:-1], dtype=torch.long, device=feats.device
                    ),
                    past_key_values=_cross_cache(cross, rows),
                    **kwargs,
                )

            with torch.inference_mode():
                if seeds is None:
                    texts = processor.batch_decode(decode(slice(None)), skip_special_tokens=True)
                else:  # sampling: one seeded call per image, so batching changes nothing
                    texts = []
                    for i, seed in enumerate(seeds[k]):
                        torch.manual_seed(seed)
                        texts += processor.batch_decode(
                            decode(slice(i, i + 1)), skip_special_tokens=True
                        )
            out.append(texts)
        return out


class CaptionModelHandler(ModelSharing, ModelHandler[dict, dict, Any]):
    """RunInference handler: records in, records with synthetic captions appended out.
    `copies` >= 1 shares that many `Captioner`s per machine between the worker processes."""

    def __init__(self, config, seed: int = 0, max_image_pixels: int = 64_000_000, copies: int = 0):
        super().__init__()
        self.config = config  # options.CaptionerConfig: light and picklable
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self.copies = copies
        # Written into every synthetic caption: a Hub id as it is, a local folder by its name
        # (the output carries no folder of this machine).
        self.model_id = portable_ref(config.model)

    def load_model(self) -> Captioner:
        log.info("loading captioner %s", self.config.model)
        return Captioner(self.config, self.max_image_pixels, self.copies)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self.config.batch_size, "max_batch_size": self.config.batch_size}

    def get_metrics_namespace(self) -> str:
        return "babelcap.caption"

    def _seeds(self, batch: Sequence[dict], k: int) -> list[int] | None:
        if not self.config.sampling:
            return None
        return [_seed(self.seed, r["image_id"], k) for r in batch]

    def run_inference(
        self, batch: Sequence[dict], model: Any, inference_args: dict | None = None
    ) -> Iterable[dict]:
        prompts = prompts_for(self.config.prompts, self.config.num_captions)
        seeds = (
            [self._seeds(batch, k) for k in range(len(prompts))] if self.config.sampling else None
        )
        texts_per_prompt = model.caption([r["data"] for r in batch], prompts, seeds)
        captions: list[list[dict]] = [[] for _ in batch]
        for prompt, texts in zip(prompts, texts_per_prompt, strict=True):
            for i, text in enumerate(texts):
                text = " ".join(text.split())
                if prompt and not text.lower().startswith(prompt.lower()):
                    # Models that return only the continuation: keep CAPIVARA's "prefix + text".
                    text = f"{prompt} {text}".strip()
                captions[i].append(
                    schema.caption(
                        text,
                        "en",
                        schema.ORIGIN_SYNTHETIC,
                        model=self.model_id,
                        prompt=prompt or None,
                    )
                )
        out = []
        for rec, caps in zip(batch, captions, strict=True):
            rec = dict(rec)
            rec["captions"] = [*rec.get("captions", []), *caps]
            bump(rec, "caption.generated", len(caps))
            out.append(rec)
        return out


def _cross_keys_values(net: Any, embeds: Any) -> list[tuple[Any, Any]]:
    """Per decoder layer, the cross-attention (keys, values) of BLIP's text decoder over
    `embeds`, shaped as its attention computes them."""
    out = []
    for layer in net.text_decoder.bert.encoder.layer:
        att = layer.crossattention.self
        shape = (*embeds.shape[:-1], -1, att.attention_head_size)
        out.append(
            (
                att.key(embeds).view(shape).transpose(1, 2),
                att.value(embeds).view(shape).transpose(1, 2),
            )
        )
    return out


def _cross_cache(cross: list[tuple[Any, Any]] | None, rows: slice) -> Any:
    """A fresh generation cache whose cross-attention part is already filled (rows `rows`)."""
    if cross is None:
        return None
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for i, (keys, values) in enumerate(cross):
        cache.cross_attention_cache.update(keys[rows], values[rows], i)
        cache.is_updated[i] = True
    return cache


class FailedBatch(beam.DoFn):
    """RunInference's failed batches `(batch, exception)` -> one dead letter per record."""

    def __init__(self, stage: str, kind: str):
        self.stage, self.kind = stage, kind

    def process(self, item: Any) -> Iterator[Any]:
        batch, exc = item
        for rec in batch if isinstance(batch, (list, tuple)) else [batch]:
            yield reject(rec, self.stage, self.kind, f"{type(exc).__name__}: {exc}")


class Caption(beam.PTransform):
    """records -> (records with synthetic captions, dead letters)."""

    def __init__(self, config, seed: int, max_image_pixels: int, model_copies: int = 0):
        super().__init__()
        self.handler = CaptionModelHandler(
            config, seed=seed, max_image_pixels=max_image_pixels, copies=model_copies
        )

    def expand(self, records):
        main, other = (
            records | "RunInference" >> RunInference(self.handler).with_exception_handling()
        )
        dead = other.failed_inferences | "FailedToDead" >> beam.ParDo(
            FailedBatch(STAGE, "caption_failed")
        )
        return main, dead


__all__ = [
    "DEAD",
    "Caption",
    "CaptionModelHandler",
    "Captioner",
    "load_captioner",
    "prompts_for",
]

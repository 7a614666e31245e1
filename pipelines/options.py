"""Configuration of the augmentation pipeline, as data.

`AugmentConfig` is a frozen dataclass: the CLI, beam_runner.py and tests all build one and hand
it to `pipelines.builder`. It serialises to a plain dict (`to_dict`), which is what lands in the
Parquet file metadata and in the run manifest, so every shard records how it was made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# CAPIVARA's ten prompt prefixes for BLIP-2 synthetic captions.
CAPIVARA_PROMPTS: tuple[str, ...] = (
    "a photo of",
    "a picture of",
    "an image of",
    "a photograph of",
    "an illustration of",
    "a rendering of",
    "a snapshot of",
    "a close-up photo of",
    "a drawing of",
    "a painting of",
)

INPUT_FORMATS = ("auto", "folder", "manifest", "webdataset")
STORE_IMAGE = ("bytes", "reencode", "path", "none")


@dataclass(frozen=True)
class CaptionerConfig:
    """An image-to-text model loaded by name or path through transformers' loaders."""

    model: str  # hub name or local / gs:// path
    model_class: str | None = None  # e.g. "BlipForConditionalGeneration"; auto when None
    prompts: tuple[str, ...] = CAPIVARA_PROMPTS
    num_captions: int = 10  # prompts are cycled when num_captions > len(prompts)
    sampling: bool = False  # sample instead of greedy/beam search (seeded per image)
    num_beams: int = 1
    max_new_tokens: int = 30
    top_p: float = 0.9
    temperature: float = 1.0
    batch_size: int = 16
    device: str = "auto"  # "auto" = cuda when available; fp16 on GPU


@dataclass(frozen=True)
class TranslatorConfig:
    """The translators engine (CTranslate2 model directory, local or gs://)."""

    model: str
    batch_size: int = 64  # rows per RunInference batch (each row holds several captions)
    device: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)  # passed to the engine config


@dataclass(frozen=True)
class TextFilterConfig:
    min_chars: int = 3
    min_words: int = 2
    max_chars: int = 300
    max_source_chars: int = 1000  # longer source alt-text is dropped (reason "too_long")
    near_duplicate_threshold: float = 0.9  # TF-IDF cosine >= this is a near duplicate
    min_keep: int = 1  # near-duplicate pruning keeps at least this many captions
    language_check: bool = True  # lingua check of each translation


@dataclass(frozen=True)
class ClipConfig:
    """CLIP model used for scoring and/or image embeddings (open_clip)."""

    model: str  # open_clip model name, "hf-hub:...", or a local directory
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint path
    score_threshold: float | None = None  # keep English captions scoring >= this
    top_k: int | None = None  # or keep the top k per image
    score: bool = True  # compute CLIP scores (and filter when threshold/top_k is set)
    embed_images: bool = False  # write image embeddings to the `embedding` column
    batch_size: int = 32
    device: str = "auto"


@dataclass(frozen=True)
class AugmentConfig:
    input: str
    output: str
    languages: tuple[str, ...] = ()
    captioner: CaptionerConfig | None = None
    translator: TranslatorConfig | None = None
    clip: ClipConfig | None = None
    input_format: str = "auto"
    source_language: str = "en"  # language of source captions when the manifest has none
    image_column: str | None = None  # manifest column with the image path/URI (auto-detected)
    caption_column: str | None = None
    language_column: str | None = None
    image_extensions: tuple[str, ...] = (
        ".jpg",
        ".jpeg",
        ".png",
        ".gif",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
    )
    max_image_pixels: int = 64_000_000  # decompression-bomb limit (width * height)
    max_file_bytes: int = 64 * 1024 * 1024
    store_image: str = "bytes"  # bytes | reencode | path | none
    resize_max_side: int | None = None  # with store_image="reencode"
    text: TextFilterConfig = field(default_factory=TextFilterConfig)
    num_shards: int | None = None  # fixed shard count; default: from rows_per_shard
    rows_per_shard: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}")
        if self.store_image not in STORE_IMAGE:
            raise ValueError(f"store_image must be one of {STORE_IMAGE}")
        if self.languages and self.translator is None:
            raise ValueError("target languages given but no translator model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        data = dict(data)
        subs = {
            "captioner": CaptionerConfig,
            "translator": TranslatorConfig,
            "clip": ClipConfig,
            "text": TextFilterConfig,
        }
        for key, klass in subs.items():
            if isinstance(data.get(key), Mapping):
                sub = dict(data[key])
                if "prompts" in sub:
                    sub["prompts"] = tuple(sub["prompts"])
                data[key] = klass(**sub)
        for key in ("languages", "image_extensions"):
            if key in data and isinstance(data[key], Sequence):
                data[key] = tuple(data[key])
        return cls(**data)


def parse_languages(value: str | Sequence[str]) -> tuple[str, ...]:
    """'pt, es' or ['pt', 'es'] -> ('pt', 'es'), order kept, duplicates removed."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        code = item.strip()
        if code and code not in out:
            out.append(code)
    return tuple(out)

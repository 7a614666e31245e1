"""Configuration of the augmentation pipeline, as data.

`AugmentConfig` and its sections are frozen pydantic models (`babelcap.core.config`): the CLI,
beam_runner.py and tests all build one and hand it to `pipelines.builder`; they pickle into the
Beam DoFns. A config is validated when it is built (unknown keys and bad values are errors
naming the key, before any work starts). It serialises to JSON-plain data (`to_dict`), which is
what lands in the Parquet file metadata and in the run manifest, so every shard records how it
was made; `AugmentConfig.from_dict(config.to_dict()) == config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from babelcap.core.config import FrozenConfigModel
from babelcap.core.lists import parse_list

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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class CaptionerConfig(FrozenConfigModel):
    """An image-to-text model loaded by name or path through transformers' loaders."""

    model: str = Field(description="image-to-text model: hub name or local / gs:// path")
    model_class: str | None = Field(
        None, description="transformers class, e.g. Blip2ForConditionalGeneration (auto: None)"
    )
    prompts: tuple[str, ...] = Field(
        CAPIVARA_PROMPTS, description="prompt prefixes, cycled (default: CAPIVARA's ten)"
    )
    num_captions: int = Field(10, ge=1, description="captions per image")
    sampling: bool = Field(False, description="sample captions (seeded per image)")
    num_beams: int = Field(1, ge=1, description="beam search width")
    max_new_tokens: int = Field(30, ge=1, description="longest caption, in tokens")
    top_p: float = Field(0.9, description="nucleus sampling mass (with sampling)")
    temperature: float = Field(1.0, description="sampling temperature (with sampling)")
    batch_size: int = Field(16, ge=1, description="images per captioning batch")
    device: str = Field("auto", description="auto | cpu | cuda (auto: cuda when there; fp16)")


class TranslationStageConfig(FrozenConfigModel):
    """The pipeline's translation stage: which translators (CTranslate2) model, batch, device.
    (The engine's own settings are `babelcap.translators.TranslatorConfig`; `options` passes
    extra ones to it.)"""

    model: str = Field(description="translators (CTranslate2) model folder, local or gs://")
    batch_size: int = Field(
        64, ge=1, description="rows per RunInference batch (each row holds several captions)"
    )
    device: str = Field("auto", description="auto | cpu | cuda")
    options: dict[str, Any] = Field(
        default_factory=dict, description="passed to the engine's TranslatorConfig"
    )
    score: bool = Field(
        True,
        description="score each translation (translation_score, roundtrip_chrf, "
        "translation_logprob in the shard)",
    )
    roundtrip: bool = Field(
        True,
        description="round-trip chrF: translate back with reverse_model, or with the "
        "translator itself when it serves target -> source (else confidence only)",
    )
    reverse_model: str | None = Field(
        None, description="translators (CTranslate2) model for the round trip (target -> source)"
    )


class TextFilterConfig(FrozenConfigModel):
    """Rule-based caption filters (English captions and translations)."""

    min_chars: int = Field(3, description="shorter captions are dropped")
    min_words: int = Field(2, description="captions with fewer words are dropped")
    max_chars: int = Field(300, description="longer captions are dropped")
    max_source_chars: int = Field(
        1000, description='longer source alt-text is dropped (reason "too_long")'
    )
    near_duplicate_threshold: float = Field(
        0.9, description="TF-IDF cosine >= this is a near duplicate"
    )
    min_keep: int = Field(1, description="near-duplicate pruning keeps at least this many")
    language_check: bool = Field(True, description="lingua check of each translation")
    language_candidates: Literal["wide", "all"] = Field(
        "wide",
        description='lingua\'s candidate languages: "wide" (a fixed set of 33 common '
        'languages, plus any target outside it) or "all" (every lingua language; slower)',
    )
    language_margin: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="wrong language only when lingua's confidence in the target is below "
        "(1 - margin) x its confidence in the top language",
    )
    degenerate_check: bool = Field(
        True, description="drop translations with repetition loops or a bad length ratio"
    )
    max_ngram_repeats: int = Field(
        2, ge=1, description="a word 4-gram occurring more often is a repetition loop"
    )
    min_length_ratio: float = Field(
        0.2, ge=0.0, description="shorter translations (characters vs source) are dropped"
    )
    max_length_ratio: float = Field(
        3.0, gt=0.0, description="longer translations (characters vs source) are dropped"
    )
    min_translation_score: float | None = Field(
        None, description="drop translations whose translation_score (0-1) is below this"
    )
    min_roundtrip_chrf: float | None = Field(
        None, description="drop translations whose round-trip chrF (0-1) is below this"
    )
    min_translation_logprob: float | None = Field(
        None, description="drop translations whose mean token log-probability is below this"
    )
    translation_top_k: int | None = Field(
        None, ge=1, description="keep the k best-scoring translations per image and language"
    )


class ClipConfig(FrozenConfigModel):
    """CLIP model used for scoring and/or image embeddings (open_clip)."""

    model: str = Field(description='open_clip model: name, "hf-hub:...", config JSON or folder')
    pretrained: str | None = Field(None, description="open_clip pretrained tag or checkpoint")
    score_threshold: float | None = Field(
        None, description="keep English captions with CLIP score >= this"
    )
    top_k: int | None = Field(None, ge=1, description="keep the k best captions per image")
    score: bool = Field(True, description="compute CLIP scores (filter with threshold/top_k)")
    source_filter: bool = Field(
        True,
        description="drop source alt-text that does not match its image before it is "
        "translated (source_min_score / source_relative)",
    )
    source_min_score: float | None = Field(
        None, description="drop source alt-text whose CLIP score is below this"
    )
    source_relative: float | None = Field(
        0.5,
        description="drop source alt-text scoring below this share of the mean CLIP score of "
        "the image's synthetic captions (when there are any)",
    )
    embed_images: bool = Field(False, description="write CLIP image embeddings (`embedding`)")
    batch_size: int = Field(32, ge=1, description="images per CLIP batch")
    device: str = Field("auto", description="auto | cpu | cuda")


class DecontaminateConfig(FrozenConfigModel):
    """Keep an evaluation set's images out of the output (stage "decontaminate")."""

    fingerprints: str = Field(
        description="Parquet file of the evaluation images' ids, pHashes and thumbnails "
        "(`babelcap augment --decontaminate SPEC` writes it from an evaluation dataset)"
    )
    mode: Literal["drop", "flag"] = Field(
        "drop",
        description='"drop": dead-letter matches (matches_eval_set); "flag": keep them with '
        'split "eval_overlap", which the trainer never reads by default',
    )
    source: str | None = Field(None, description="the evaluation dataset it was made from")


class AugmentConfig(FrozenConfigModel):
    """One augmentation run: input, models, filters, output."""

    input: str = Field(description="image folder, manifest (.jsonl/.csv/.parquet) or .tar shards")
    output: str = Field(description="output folder (local or gs://)")
    languages: tuple[str, ...] = Field(
        (), description='target languages, comma-separated ("pt, es")'
    )
    captioner: CaptionerConfig | None = None
    translator: TranslationStageConfig | None = None
    clip: ClipConfig | None = None
    input_format: Literal["auto", "folder", "manifest", "webdataset"] = Field(
        "auto", description="how to read --input (auto: from the path)"
    )
    source_language: str = Field(
        "en", description="language of source captions when the manifest has none"
    )
    image_column: str | None = Field(
        None, description="manifest column with the image path/URI (auto-detected)"
    )
    caption_column: str | None = Field(None, description="manifest caption column (auto)")
    language_column: str | None = Field(None, description="manifest language column (auto)")
    image_extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS, description="image files of a folder input, comma-separated"
    )
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="decompression-bomb limit (width * height)"
    )
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1, description="larger files are refused")
    allow_outside_paths: bool = Field(
        False,
        description="let a manifest's relative paths climb out of its folder (`..`)",
    )
    store_image: Literal["bytes", "reencode", "path", "none"] = Field(
        "bytes", description="what the `image` column holds"
    )
    resize_max_side: int | None = Field(
        None, ge=1, description='with store_image "reencode": longest side in pixels'
    )
    text: TextFilterConfig = Field(default_factory=TextFilterConfig)
    decontaminate: DecontaminateConfig | None = None
    num_shards: int | None = Field(
        None, ge=1, description="fixed number of shards (default: from rows_per_shard)"
    )
    rows_per_shard: int = Field(1000, ge=1, description="target rows per shard")
    seed: int = Field(0, description="seed of everything random (sampled captions)")
    unit_size: int = Field(
        1000, ge=1, description="inputs per work unit (fixed for an output at its first run)"
    )
    units_per_wave: int = Field(
        4, ge=1, description="work units per pipeline run; each is committed when its wave ends"
    )
    units_per_translation_wave: int = Field(
        20,
        ge=1,
        description="work units per pipeline run when only translating (adding a language, "
        "retranslating): a unit costs a fraction of a full one there, while every pipeline "
        "pays its start-up and model loads",
    )
    model_copies: int = Field(
        0,
        ge=0,
        description="copies of each model (captioner, CLIP, translator) per machine, shared by "
        "its worker processes (a local run's --workers, a Dataflow VM's SDK processes) through "
        "Beam's multi-process shared models: 1 loads each model once instead of once per "
        "worker process; 0: every worker process loads its own. Changes no output",
    )
    max_dead_letter_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="fail (committing nothing more) when more of the run's inputs than this "
        "are dead-lettered (duplicates not counted); 1 turns the guard off",
    )
    overwrite: bool = Field(
        False,
        description="replace an output made with another configuration (swapped in only "
        "when the whole new run succeeded)",
    )
    retry_failed: bool = Field(
        False,
        description="reprocess the committed inputs dead-lettered with transient kinds "
        "(read errors: pipelines.deadletter.TRANSIENT_KINDS; model failures), turning those "
        "that now succeed into rows",
    )
    retranslate: tuple[str, ...] = Field(
        (),
        description="target languages whose committed translations were made with another "
        "translator configuration: translate them again with this one (the English captions "
        "as they were selected; no captioning, no CLIP); other languages are kept as they are",
    )

    @field_validator("languages", "image_extensions", "retranslate", mode="before")
    @classmethod
    def _list(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, bool) or value is None:
            raise ValueError("expected a list or a comma-separated string")
        return tuple(parse_list(value))

    @model_validator(mode="after")
    def _translator_for_languages(self) -> AugmentConfig:
        if self.languages and self.translator is None:
            raise ValueError("target languages given but no translator model")
        if extra := [lang for lang in self.retranslate if lang not in self.languages]:
            raise ValueError(
                f"retranslate {', '.join(extra)}: not among the target languages "
                f"({', '.join(self.languages) or 'none'})"
            )
        return self

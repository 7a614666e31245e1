"""Caption filters. Each one counts what it drops, per stage and reason
(`caption_drop.<stage>.<reason>` in the stats and Beam counters, hence in the run manifest).

- `text_problem`: empty / too short / too long.
- exact duplicates per image (after case and punctuation folding) and TF-IDF near duplicates
  (scikit-learn `TfidfVectorizer`, cosine >= threshold; pruning keeps at least `min_keep`).
- CAPIVARA selection of synthetic English captions by CLIP score: keep >= threshold, or the
  top k per image, then near-duplicate pruning.
- the source alt-text CLIP filter (`SelectCaptions`, before translation, on whenever CLIP
  scores are computed): alt-text scoring below `source_min_score`, or below `source_relative`
  times the mean score of the image's synthetic captions, is dropped ("stock image" is not
  translated into "a small red star").
- translations (`FilterTranslations`): text checks (an empty translation is counted by cause:
  `empty_source` or `empty_output`), degenerate output (repetition loops, length ratio to the
  source), a lingua language check whose verdict on a caption does not depend on the run's other
  languages (a fixed candidate set, and a confidence margin), thresholds on the translation
  scores and the best k per image and language.

Source captions are the user's own data: they are checked at decode time (UTF-8, empty,
overlong) and pruned here only by the source CLIP filter; synthetic captions that repeat them
are pruned too.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam

from babelcap.core import schema
from babelcap.pipelines.accounting import bump, caption_drop
from babelcap.pipelines.options import ClipConfig, TextFilterConfig
from babelcap.translators.scoring import degenerate

log = logging.getLogger(__name__)

_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def text_problem(text: str, cfg: TextFilterConfig) -> str | None:
    """Why `text` is not a usable caption (None when it is)."""
    if not text or not text.strip():
        return "empty"
    if len(text) < cfg.min_chars or len(text.split()) < cfg.min_words:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    return None


def exact_key(text: str) -> str:
    """Case-, accent-form- and punctuation-insensitive key for exact-duplicate checks."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


def near_duplicates(
    texts: Sequence[str],
    order: Sequence[int],
    threshold: float,
    min_keep: int,
    anchors: Sequence[str] = (),
) -> list[int]:
    """Indices of `texts` kept by greedy TF-IDF pruning in `order` (best first).

    A text is pruned when its cosine similarity to a kept text (or an anchor) is >= threshold;
    pruned texts come back, best first, until at least `min_keep` are kept.
    """
    if not texts:
        return []
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    corpus = [*anchors, *texts]
    try:
        matrix = TfidfVectorizer().fit_transform(corpus)
    except ValueError:  # empty vocabulary (only stop-words / 1-char tokens)
        return list(order)
    sims = cosine_similarity(matrix)
    n_anchor = len(anchors)
    kept: list[int] = []
    pruned: list[int] = []
    for i in order:
        row = sims[n_anchor + i]
        against = [*range(n_anchor), *(n_anchor + j for j in kept)]
        if any(row[j] >= threshold for j in against):
            pruned.append(i)
        else:
            kept.append(i)
    while len(kept) < min_keep and pruned:
        kept.append(pruned.pop(0))
    return sorted(kept, key=list(order).index)


class FilterEnglish(beam.DoFn):
    """Synthetic English captions: text checks, exact duplicates (also of the source caption)."""

    STAGE = "filter_en"

    def __init__(self, cfg: TextFilterConfig):
        self.cfg = cfg

    def process(self, rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        rec = dict(rec)
        kept: list[dict] = []
        seen: set[str] = set()
        for cap in rec.get("captions", []):
            if cap["origin"] != schema.ORIGIN_SYNTHETIC:
                kept.append(cap)
                seen.add(exact_key(cap["text"]))
                continue
            reason = text_problem(cap["text"], self.cfg)
            if (
                reason is None
                and cap.get("prompt")
                and (exact_key(cap["text"]) == exact_key(cap["prompt"]))
            ):
                reason = "prompt_only"  # the captioner added nothing to the prefix
            if reason is None and exact_key(cap["text"]) in seen:
                reason = "exact_duplicate"
            if reason:
                caption_drop(rec, self.STAGE, reason)
                continue
            seen.add(exact_key(cap["text"]))
            kept.append(cap)
        rec["captions"] = kept
        yield rec


class SelectCaptions(beam.DoFn):
    """CAPIVARA selection of synthetic captions: CLIP threshold / top-k, then TF-IDF pruning."""

    STAGE = "select"

    def __init__(self, text: TextFilterConfig, clip: ClipConfig | None):
        self.text = text
        self.clip = clip

    def process(self, rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        rec = dict(rec)
        caps = rec.get("captions", [])
        fixed = [c for c in caps if c["origin"] != schema.ORIGIN_SYNTHETIC]
        synth = [c for c in caps if c["origin"] == schema.ORIGIN_SYNTHETIC]
        idx = list(range(len(synth)))
        scored = all(c.get("score") is not None for c in synth)
        if scored:
            idx.sort(key=lambda i: -synth[i]["score"])  # stable: ties keep prompt order
        clip = self.clip
        fixed = self._filter_source(rec, fixed, synth)
        if scored and clip is not None and clip.score_threshold is not None:
            low = [i for i in idx if synth[i]["score"] < clip.score_threshold]
            idx = [i for i in idx if synth[i]["score"] >= clip.score_threshold]
            caption_drop(rec, self.STAGE, "clip_below_threshold", len(low))
        if scored and clip is not None and clip.top_k is not None and len(idx) > clip.top_k:
            caption_drop(rec, self.STAGE, "clip_not_top_k", len(idx) - clip.top_k)
            idx = idx[: clip.top_k]
        anchors = [c["text"] for c in fixed if c["language"] == "en"]
        before = len(idx)
        idx = near_duplicates(
            [c["text"] for c in synth],
            idx,
            self.text.near_duplicate_threshold,
            self.text.min_keep,
            anchors=anchors,
        )
        caption_drop(rec, self.STAGE, "near_duplicate", before - len(idx))
        # Keep the prompt order in the row (deterministic, independent of scores).
        rec["captions"] = fixed + [synth[i] for i in sorted(idx)]
        bump(rec, "select.kept", len(idx))
        yield rec

    def _filter_source(self, rec: dict, fixed: list[dict], synth: list[dict]) -> list[dict]:
        """Source alt-text whose CLIP score says it does not describe the image (counted)."""
        clip = self.clip
        if clip is None or not clip.source_filter:
            return fixed
        synth_scores = [c["score"] for c in synth if c.get("score") is not None]
        relative = None
        mean = sum(synth_scores) / len(synth_scores) if synth_scores else 0.0
        if clip.source_relative is not None and mean > 0:  # a share of nothing means nothing
            relative = clip.source_relative * mean
        kept = []
        for cap in fixed:
            score = cap.get("score")
            if cap["origin"] == schema.ORIGIN_SOURCE and score is not None:
                if clip.source_min_score is not None and score < clip.source_min_score:
                    caption_drop(rec, self.STAGE, "source_clip_below_threshold")
                    continue
                if relative is not None and score < relative:
                    caption_drop(rec, self.STAGE, "source_clip_below_synthetic")
                    continue
            kept.append(cap)
        return kept


def lingua_language(code: str):
    """lingua's Language for an ISO 639-1 code, or None when lingua does not know it."""
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(IsoCode639_1.from_str(code))
    except (ValueError, AttributeError):
        return None


# The language check's fixed candidates: common languages, so a caption's verdict does not
# depend on which other languages a run targets (Portuguese is not taken for Spanish because
# Spanish happens to be among the targets). A target outside this set is added to it.
WIDE_LANGUAGES: tuple[str, ...] = (
    "ar", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi", "hu",
    "id", "it", "ja", "ko", "mr", "nb", "nl", "pl", "pt", "ro", "ru", "sv", "th", "tr", "uk",
    "ur", "vi", "zh",
)  # fmt: skip


def language_detector(candidates: str = "wide", extra: Sequence[str] = ()):
    """A lingua detector over WIDE_LANGUAGES (+ `extra` that lingua knows) or all of lingua's
    languages (`candidates="all"`)."""
    from lingua import LanguageDetectorBuilder

    if candidates == "all":
        return LanguageDetectorBuilder.from_all_languages().build()
    known = {lingua_language(c) for c in (*WIDE_LANGUAGES, *extra)} - {None}
    return LanguageDetectorBuilder.from_languages(*known).build()


def wrong_language(detector: Any, text: str, lang: str, margin: float) -> bool:
    """True when lingua's top language is another one and its confidence in `lang` is below
    (1 - `margin`) times its confidence in that top language (a close call, such as short
    Portuguese that also reads as Spanish, passes; English left untranslated does not)."""
    target = lingua_language(lang)
    if detector is None or target is None:
        return False
    values = detector.compute_language_confidence_values(text)
    if not values or values[0].language == target:
        return False
    own = next((v.value for v in values if v.language == target), 0.0)
    return own < (1.0 - margin) * values[0].value


class FilterTranslations(beam.DoFn):
    """Translations: text checks (empty ones by cause), exact duplicates per language,
    degenerate output, lingua language check, translation-score thresholds and top k."""

    STAGE = "filter_tr"

    def __init__(self, cfg: TextFilterConfig, languages: Sequence[str]):
        self.cfg = cfg
        self.languages = tuple(languages)
        self._detector = None

    def setup(self) -> None:
        if not self.cfg.language_check:
            return
        self._detector = language_detector(self.cfg.language_candidates, self.languages)
        unknown = sorted(c for c in self.languages if lingua_language(c) is None)
        if unknown:
            log.warning("lingua has no model for %s: their translations are not checked", unknown)

    def _wrong_language(self, text: str, lang: str) -> bool:
        return wrong_language(self._detector, text, lang, self.cfg.language_margin)

    def _score_problem(self, cap: dict) -> str | None:
        cfg = self.cfg
        for field, limit in (
            ("translation_score", cfg.min_translation_score),
            ("roundtrip_chrf", cfg.min_roundtrip_chrf),
            ("translation_logprob", cfg.min_translation_logprob),
        ):
            value = cap.get(field)
            if limit is not None and value is not None and value < limit:
                return f"{field}_below_threshold"
        return None

    def _problem(self, cap: dict, source: str | None) -> str | None:
        cfg = self.cfg
        reason = text_problem(cap["text"], cfg)
        if reason == "empty":  # why: nothing to translate, or the model produced nothing
            return "empty_source" if not (source or "").strip() else "empty_output"
        if reason is None and cfg.degenerate_check and source:
            reason = degenerate(
                source,
                cap["text"],
                max_repeats=cfg.max_ngram_repeats,
                min_ratio=cfg.min_length_ratio,
                max_ratio=cfg.max_length_ratio,
            )
        return reason or self._score_problem(cap)

    def process(self, rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        rec = dict(rec)
        caps = rec.get("captions", [])
        kept: list[dict] = []
        seen: set[tuple[str, str]] = set()
        for cap in caps:
            if cap["origin"] != schema.ORIGIN_TRANSLATED:
                kept.append(cap)
                seen.add((cap["language"], exact_key(cap["text"])))
                continue
            key = (cap["language"], exact_key(cap["text"]))
            j = cap.get("source_index")
            source = caps[j]["text"] if j is not None and 0 <= j < len(caps) else None
            reason = self._problem(cap, source)
            if reason is None and key in seen:
                reason = "exact_duplicate"
            if reason is None and self._wrong_language(cap["text"], cap["language"]):
                reason = "wrong_language"
            if reason:
                caption_drop(rec, self.STAGE, reason)
                continue
            seen.add(key)
            kept.append(cap)
        rec["captions"] = self._top_k(rec, kept)
        yield rec

    def _top_k(self, rec: dict, caps: list[dict]) -> list[dict]:
        """The best `translation_top_k` translations per language by translation_score
        (unscored ones rank last; ties keep row order); the row keeps its order."""
        k = self.cfg.translation_top_k
        if k is None:
            return caps
        by_lang: dict[str, list[int]] = {}
        for i, cap in enumerate(caps):
            if cap["origin"] == schema.ORIGIN_TRANSLATED:
                by_lang.setdefault(cap["language"], []).append(i)
        drop: set[int] = set()
        for idx in by_lang.values():
            score = [caps[i].get("translation_score") for i in idx]
            ranked = sorted(
                range(len(idx)), key=lambda n: -(score[n] if score[n] is not None else -1)
            )
            drop |= {idx[n] for n in ranked[k:]}
        caption_drop(rec, self.STAGE, "translation_not_top_k", len(drop))
        return [c for i, c in enumerate(caps) if i not in drop]

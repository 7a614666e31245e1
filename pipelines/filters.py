"""Caption filters. Each one counts what it drops, per stage and reason
(`caption_drop.<stage>.<reason>` in the stats and Beam counters, hence in the run manifest).

- `text_problem`: empty / too short / too long.
- exact duplicates per image (after case and punctuation folding) and TF-IDF near duplicates
  (scikit-learn `TfidfVectorizer`, cosine >= threshold; pruning keeps at least `min_keep`).
- CAPIVARA selection of synthetic English captions by CLIP score: keep >= threshold, or the
  top k per image, then near-duplicate pruning.
- a language check of every translation with lingua (offline), its detector built only for the
  configured languages, once per worker.

Source captions are the user's own data: they are checked at decode time (UTF-8, empty,
overlong) and never pruned here, but synthetic captions that repeat them are.
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


def lingua_language(code: str):
    """lingua's Language for an ISO 639-1 code, or None when lingua does not know it."""
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(IsoCode639_1.from_str(code))
    except (ValueError, AttributeError):
        return None


class FilterTranslations(beam.DoFn):
    """Translations: text checks, exact duplicates per language, lingua language check."""

    STAGE = "filter_tr"

    def __init__(self, cfg: TextFilterConfig, languages: Sequence[str]):
        self.cfg = cfg
        self.languages = tuple(languages)
        self._detector = None
        self._codes: dict[Any, str] = {}

    def setup(self) -> None:
        if not self.cfg.language_check:
            return
        from lingua import LanguageDetectorBuilder

        langs = {c: lingua_language(c) for c in {"en", *self.languages}}
        known = {c: lang for c, lang in langs.items() if lang is not None}
        if len(known) >= 2:
            self._detector = LanguageDetectorBuilder.from_languages(*known.values()).build()
            self._codes = {lang: c for c, lang in known.items()}
        unknown = sorted(c for c, lang in langs.items() if lang is None)
        if unknown:
            log.warning("lingua has no model for %s: their translations are not checked", unknown)

    def _wrong_language(self, text: str, lang: str) -> bool:
        if self._detector is None or lingua_language(lang) is None:
            return False
        found = self._detector.detect_language_of(text)
        return found is not None and self._codes.get(found) != lang

    def process(self, rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        rec = dict(rec)
        kept: list[dict] = []
        seen: set[tuple[str, str]] = set()
        for cap in rec.get("captions", []):
            if cap["origin"] != schema.ORIGIN_TRANSLATED:
                kept.append(cap)
                seen.add((cap["language"], exact_key(cap["text"])))
                continue
            key = (cap["language"], exact_key(cap["text"]))
            reason = text_problem(cap["text"], self.cfg)
            if reason is None and key in seen:
                reason = "exact_duplicate"
            if reason is None and self._wrong_language(cap["text"], cap["language"]):
                reason = "wrong_language"
            if reason:
                caption_drop(rec, self.STAGE, reason)
                continue
            seen.add(key)
            kept.append(cap)
        rec["captions"] = kept
        yield rec

"""Translation quality signals, per translated caption, from what babelcap already has.

- **round trip**: the translation translated back into the source language (the same
  multilingual engine, or a given reverse model) and compared with the source by chrF
  (sacreBLEU's sentence chrF, on a 0-1 scale): a translation that says something else comes
  back as something else;
- **confidence**: the translator's own mean log-probability per token of the translation
  (`Translator.score`, CTranslate2 `score_batch`); `exp` of it (the geometric-mean token
  probability) is on a 0-1 scale;
- **combined** `translation_score`: the mean of the available signals on their 0-1 scales.

And text-only checks of degenerate output: repetition loops (a word n-gram repeated) and the
length ratio of translation to source.

`TranslationScorer` runs the model-based signals batched, through the engines' translation
memory (back-translations and scores of sentences seen before are not recomputed).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from babelcap.translators.engine import Translator


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (sacreBLEU, default chrF2) of `hypothesis` against `reference`, in [0, 1]."""
    from sacrebleu.metrics import CHRF

    if not hypothesis.strip() or not reference.strip():
        return 0.0
    return round(CHRF().sentence_score(hypothesis, [reference]).score / 100.0, 6)


def confidence(logprob: float | None) -> float | None:
    """A mean log-probability per token as a probability (geometric mean over tokens)."""
    return None if logprob is None else round(math.exp(min(0.0, logprob)), 6)


def combine(roundtrip: float | None, logprob: float | None) -> float | None:
    """The combined translation score: mean of the available signals on a 0-1 scale."""
    parts = [p for p in (roundtrip, confidence(logprob)) if p is not None]
    return round(sum(parts) / len(parts), 6) if parts else None


def repeated_ngram(text: str, n: int = 4) -> int:
    """How often the most frequent word n-gram of `text` occurs (overlapping; 0 when the text
    has fewer than n words). A loop such as "a b c d a b c d a b c d" gives 3."""
    words = text.split()
    if len(words) < n:
        return 0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(counts.values())


def degenerate(
    source: str,
    translation: str,
    ngram: int = 4,
    max_repeats: int = 2,
    min_ratio: float = 0.2,
    max_ratio: float = 3.0,
) -> str | None:
    """Why `translation` is degenerate output rather than a translation of `source`:
    "repetition_loop" (a word `ngram` occurring more than `max_repeats` times while the source
    has no such loop) or "length_ratio" (characters, outside [min_ratio, max_ratio]);
    None when it is neither."""
    if repeated_ngram(translation, ngram) > max_repeats >= repeated_ngram(source, ngram):
        return "repetition_loop"
    src_len, tr_len = len(source.strip()), len(translation.strip())
    if src_len and tr_len and not (min_ratio <= tr_len / src_len <= max_ratio):
        return "length_ratio"
    return None


@dataclass(frozen=True)
class Scores:
    """The signals of one translation (None: not available)."""

    roundtrip_chrf: float | None
    logprob: float | None

    @property
    def combined(self) -> float | None:
        return combine(self.roundtrip_chrf, self.logprob)


class TranslationScorer:
    """Scores translations made by `forward`; round trips through `reverse` (default: the
    forward engine itself, which must then translate tgt -> src)."""

    def __init__(
        self,
        forward: Translator,
        reverse: Translator | None = None,
        roundtrip: bool = True,
        logprob: bool = True,
    ) -> None:
        self.forward = forward
        self.reverse = reverse or forward
        self.roundtrip = roundtrip
        self.logprob = logprob

    def back_translate(self, translations: Sequence[str], src: str, tgt: str) -> list[str]:
        """`translations` (in `tgt`) translated back into `src`."""
        return self.reverse.translate(translations, tgt, src)

    def score(
        self,
        sources: Sequence[str],
        translations: Sequence[str],
        src: str,
        tgt: str,
        roundtrip: bool | None = None,
    ) -> list[Scores]:
        """One `Scores` per (source, translation) pair, batched; `roundtrip` overrides the
        scorer's setting for this call (a pair the reverse engine does not serve)."""
        n = len(sources)
        if len(translations) != n:
            raise ValueError(f"{n} sources but {len(translations)} translations")
        rt: list[float | None] = [None] * n
        lp: list[float | None] = [None] * n
        live = [i for i in range(n) if sources[i].strip() and translations[i].strip()]
        if live and (self.roundtrip if roundtrip is None else roundtrip):
            back = self.back_translate([translations[i] for i in live], src, tgt)
            for i, b in zip(live, back, strict=True):
                rt[i] = chrf(b, sources[i])
        if live and self.logprob:
            got = self.forward.score(
                [sources[i] for i in live], [translations[i] for i in live], src, tgt
            )
            for i, v in zip(live, got, strict=True):
                lp[i] = v
        return [Scores(r, p) for r, p in zip(rt, lp, strict=True)]

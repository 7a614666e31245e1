"""Translation of every English caption (source and synthetic) into every target language,
through Beam's RunInference with the translators engine (CTranslate2).

`TranslateModelHandler` carries only the engine's configuration (plain data); RunInference
loads the engine (`Engines`, a `ServedModel`) once per worker process, or shares `model_copies`
copies per machine between the worker processes. A batch of records becomes one engine call per
target language over all their English captions, so the engine can sort by length, skip
repeated sentences and answer from its translation memory (on by default). Each translation
links back to its English caption through `source_index`.

With `score` (the default) every translation is scored in the same batch
(`translators.scoring.TranslationScorer`): its round-trip chrF (through `reverse_model`, or the
translator itself when it serves target -> source) and the translator's mean token
log-probability (`score_batch`), combined into `translation_score`; `filters` filter on them.

`check_languages` resolves the target codes and checks the model serves them: it runs in
the driver before the pipeline starts, so a typo fails at once with a clear message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from babelcap.core import schema
from babelcap.pipelines.accounting import NAMESPACE, bump
from babelcap.pipelines.captioning import FailedBatch
from babelcap.pipelines.models import (
    ModelSharing,
    ServedModel,
    local_model_path,
    model_threads,
    served_method,
)
from babelcap.pipelines.options import TranslationStageConfig

log = logging.getLogger(__name__)

STAGE = "translate"


def engine_config(cfg: TranslationStageConfig, model_dir: str | None = None, copies: int = 0):
    """The engine's configuration for the stage's `cfg`; `copies`: the model's copies shared
    per machine (0: each worker process's own), for its threads (`models.model_threads`)."""
    from babelcap.translators import TranslatorConfig as EngineConfig

    options = dict(cfg.options)
    # CTranslate2 takes 4 threads by default: on a worker given a share of the cores, its share
    # (2 workers x 4 threads on 2 cores made them fight), unless the options say otherwise.
    if (threads := model_threads(copies)) and "intra_threads" not in options:
        options["intra_threads"] = threads
    return EngineConfig(model_dir=model_dir or cfg.model, device=cfg.device, **options)


def check_languages(cfg: TranslationStageConfig, languages: Sequence[str]) -> tuple[str, ...]:
    """Canonical codes of `languages`; ValueError for codes unknown or not served by the model."""
    from babelcap.translators import Translator, resolve

    codes = []
    for code in languages:
        try:
            codes.append(resolve(code).code)
        except ValueError as exc:
            raise ValueError(f"unknown target language {code!r}: {exc}") from None
    if "://" not in cfg.model:  # remote models are checked on the workers
        _, targets = Translator(engine_config(cfg)).supported_languages()
        if targets:
            served = set()
            for token in targets:  # codes, or language tokens (>>pt<<, __pt__, por_Latn)
                try:
                    served.add(resolve(re.sub(r"^(>>|__)(.+?)(<<|__)$", r"\2", token)).code)
                except ValueError:
                    continue
            missing = [c for c in codes if c not in served]
            if missing:
                raise ValueError(
                    f"target language(s) {missing} not served by translator {cfg.model}; "
                    f"it translates into {sorted(served)}"
                )
    return tuple(codes)


def _serves(engine: Any, src: str, tgt: str) -> bool:
    from babelcap.translators import resolve

    try:
        engine.codec.language_tokens(resolve(src), resolve(tgt))
    except ValueError:
        return False
    return True


class Engines(ServedModel):
    """What one worker loads (or the worker processes of a machine share): the translator and,
    when scoring, its scorer. `translate` does a batch's engine work (see `ServedModel`)."""

    def __init__(
        self,
        config: TranslationStageConfig,
        languages: Sequence[str],
        source: str = "en",
        copies: int = 0,
    ):
        from babelcap.translators import Translator

        super().__init__()
        cfg, self.languages, self.source = config, tuple(languages), source
        log.info("loading translator %s", cfg.model)
        self.translator = Translator(engine_config(cfg, local_model_path(cfg.model), copies))
        self.translator.load()
        self.scorer = None  # translators.scoring.TranslationScorer, when scoring
        self.roundtrip_ok: dict[str, bool] = {}  # target -> can the round trip be made
        if not cfg.score:
            return
        from babelcap.translators.scoring import TranslationScorer

        reverse = self.translator
        if cfg.roundtrip and cfg.reverse_model:
            log.info("loading round-trip translator %s", cfg.reverse_model)
            reverse = Translator(engine_config(cfg, local_model_path(cfg.reverse_model), copies))
            reverse.load()
        ok = {t: cfg.roundtrip and _serves(reverse, t, source) for t in self.languages}
        if cfg.roundtrip and not all(ok.values()):
            log.warning(
                "no round trip into %s for %s (translator %s does not serve it; give "
                "reverse_model): those translations are scored by confidence only",
                source,
                sorted(t for t, v in ok.items() if not v),
                cfg.reverse_model or cfg.model,
            )
        self.scorer = TranslationScorer(self.translator, reverse)
        self.roundtrip_ok = ok

    @served_method
    def translate(self, texts: list[str]) -> dict[str, Any]:
        """`texts` (in the source language) into every target language: `translations[tgt]`
        holds one (text, signals) pair per text, signals being the scores'
        {translation_score, roundtrip_chrf, translation_logprob} or None when not scoring;
        `stats` what this call added to the engine's counters; `model_id` the translator's."""
        engine = self.translator
        out: dict[str, list[tuple[str, dict[str, Any] | None]]] = {}
        with self._lock:  # the counters' before/after is this call's alone
            before = engine.stats.as_dict()
            for tgt in self.languages:
                outputs = engine.translate_batch(texts, self.source, tgt) if texts else []
                outputs = [" ".join(text.split()) for text in outputs]
                scores: list[Any] = [None] * len(outputs)
                if self.scorer is not None and outputs:
                    scores = self.scorer.score(
                        texts, outputs, self.source, tgt, roundtrip=self.roundtrip_ok[tgt]
                    )
                out[tgt] = [
                    (
                        text,
                        None
                        if sc is None
                        else {
                            "translation_score": sc.combined,
                            "roundtrip_chrf": sc.roundtrip_chrf,
                            "translation_logprob": sc.logprob,
                        },
                    )
                    for text, sc in zip(outputs, scores, strict=True)
                ]
            after = engine.stats.as_dict()
        return {
            "translations": out,
            "stats": {k: after[k] - before.get(k, 0) for k in after},
            "model_id": engine.info.model_id,
        }


class TranslateModelHandler(ModelSharing, ModelHandler[dict, dict, Any]):
    """RunInference handler: records in, records with their English captions' translations
    appended out. `copies` >= 1 shares that many `Engines` per machine."""

    def __init__(
        self,
        config: TranslationStageConfig,
        languages: Sequence[str],
        source: str = "en",
        copies: int = 0,
    ):
        super().__init__()
        self.config = config
        self.languages = tuple(languages)
        self.source = source
        self.copies = copies

    def load_model(self) -> Engines:
        return Engines(self.config, self.languages, self.source, self.copies)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self.config.batch_size, "max_batch_size": self.config.batch_size}

    def get_metrics_namespace(self) -> str:
        return "babelcap.translate"

    def run_inference(
        self, batch: Sequence[dict], model: Any, inference_args: dict | None = None
    ) -> Iterable[dict]:
        where: list[tuple[int, int]] = []  # (record, caption index) of each English caption
        texts: list[str] = []
        for r, rec in enumerate(batch):
            for j, cap in enumerate(rec.get("captions", [])):
                if cap["language"] == self.source and cap["origin"] != schema.ORIGIN_TRANSLATED:
                    where.append((r, j))
                    texts.append(cap["text"])
        new: list[list[dict]] = [[] for _ in batch]
        if texts:  # else nothing to ask the engine
            got = model.translate(texts)
            for tgt in self.languages:
                for (r, j), (text, signals) in zip(where, got["translations"][tgt], strict=True):
                    new[r].append(
                        schema.caption(
                            text,
                            tgt,
                            schema.ORIGIN_TRANSLATED,
                            model=got["model_id"],
                            source_index=j,
                            **(signals or {}),
                        )
                    )
            for key in ("translated", "cache_hits", "duplicates", "empty", "truncated", "split"):
                if n := got["stats"].get(key, 0):
                    Metrics.counter(NAMESPACE, f"translate.engine.{key}").inc(n)
        out = []
        for rec, caps in zip(batch, new, strict=True):
            rec = dict(rec)
            rec["captions"] = [*rec["captions"], *caps]
            bump(rec, "translate.translations", len(caps))
            bump(rec, "translate.scored", sum(c["translation_score"] is not None for c in caps))
            out.append(rec)
        return out


class Translate(beam.PTransform):
    """records -> (records with translations appended, dead letters)."""

    def __init__(
        self, config: TranslationStageConfig, languages: Sequence[str], model_copies: int = 0
    ):
        super().__init__()
        self.handler = TranslateModelHandler(config, languages, copies=model_copies)

    def expand(self, records):
        main, other = (
            records | "RunInference" >> RunInference(self.handler).with_exception_handling()
        )
        dead = other.failed_inferences | "FailedToDead" >> beam.ParDo(
            FailedBatch(STAGE, "translate_failed")
        )
        return main, dead

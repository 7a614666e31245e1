"""Translation of every English caption (source and synthetic) into every target language,
through Beam's RunInference with the translators engine (CTranslate2).

`TranslateModelHandler` carries only the engine's configuration (plain data); RunInference
loads the engine once per worker process. A batch of records becomes one engine call per
target language over all their English captions, so the engine can sort by length, skip
repeated sentences and answer from its translation memory (on by default). Each translation
links back to its English caption through `source_index`.

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
from babelcap.pipelines.models import local_model_path
from babelcap.pipelines.options import TranslationStageConfig

log = logging.getLogger(__name__)

STAGE = "translate"


def engine_config(cfg: TranslationStageConfig, model_dir: str | None = None):
    from babelcap.translators import TranslatorConfig as EngineConfig

    return EngineConfig(model_dir=model_dir or cfg.model, device=cfg.device, **dict(cfg.options))


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


class TranslateModelHandler(ModelHandler[dict, dict, Any]):
    def __init__(
        self, config: TranslationStageConfig, languages: Sequence[str], source: str = "en"
    ):
        super().__init__()
        self.config = config
        self.languages = tuple(languages)
        self.source = source

    def load_model(self) -> Any:
        from babelcap.translators import Translator

        log.info("loading translator %s", self.config.model)
        return Translator(engine_config(self.config, local_model_path(self.config.model))).load()

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self.config.batch_size, "max_batch_size": self.config.batch_size}

    def share_model_across_processes(self) -> bool:
        return False

    def get_metrics_namespace(self) -> str:
        return "babelcap.translate"

    def run_inference(
        self, batch: Sequence[dict], model: Any, inference_args: dict | None = None
    ) -> Iterable[dict]:
        before = model.stats.as_dict()
        where: list[tuple[int, int]] = []  # (record, caption index) of each English caption
        texts: list[str] = []
        for r, rec in enumerate(batch):
            for j, cap in enumerate(rec.get("captions", [])):
                if cap["language"] == self.source and cap["origin"] != schema.ORIGIN_TRANSLATED:
                    where.append((r, j))
                    texts.append(cap["text"])
        new: list[list[dict]] = [[] for _ in batch]
        model_id = model.info.model_id
        for tgt in self.languages:
            outputs = model.translate_batch(texts, self.source, tgt) if texts else []
            for (r, j), text in zip(where, outputs, strict=True):
                new[r].append(
                    schema.caption(
                        " ".join(text.split()),
                        tgt,
                        schema.ORIGIN_TRANSLATED,
                        model=model_id,
                        source_index=j,
                    )
                )
        after = model.stats.as_dict()
        for key in ("translated", "cache_hits", "duplicates", "empty", "truncated", "split"):
            if after.get(key, 0) - before.get(key, 0):
                Metrics.counter(NAMESPACE, f"translate.engine.{key}").inc(after[key] - before[key])
        out = []
        for rec, caps in zip(batch, new, strict=True):
            rec = dict(rec)
            rec["captions"] = [*rec["captions"], *caps]
            bump(rec, "translate.translations", len(caps))
            out.append(rec)
        return out


class Translate(beam.PTransform):
    """records -> (records with translations appended, dead letters)."""

    def __init__(self, config: TranslationStageConfig, languages: Sequence[str]):
        super().__init__()
        self.handler = TranslateModelHandler(config, languages)

    def expand(self, records):
        main, other = (
            records | "RunInference" >> RunInference(self.handler).with_exception_handling()
        )
        dead = other.failed_inferences | "FailedToDead" >> beam.ParDo(
            FailedBatch(STAGE, "translate_failed")
        )
        return main, dead

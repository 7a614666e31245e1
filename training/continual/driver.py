"""The continual driver: one stage per language, in order of arrival, each starting from the
previous stage's saved model; resume; evaluation after every stage; the report.

Every stage is a training run of its own (`training.trainer.Trainer` with a `ContinualMethod`)
on a configuration derived from the user's (`TrainConfig.updated`, a copy): the stage's
language, `with_source`, its own output folder `stage-<k>-<lang>/` and seed. Its export holds
`continual_state.json` (languages so far, each language's token ids, sizes, the weights the run
started from): the next stage reads it, and `resume` reuses a stage whose state says it grew
from the same start weights with the same languages before it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from babelcap.core import schema
from babelcap.models.clip import ClipBundle, load_clip, weights_id
from babelcap.training import cl_metrics
from babelcap.training.config import TrainConfig
from babelcap.training.continual.method import ContinualMethod, ContinualOptions
from babelcap.training.continual.token_embeddings import grow_embeddings, teir_row_scale
from babelcap.training.continual.vocabulary import extend_tokenizer, token_usage, train_vocabulary
from babelcap.training.data import shard_captions
from babelcap.training.lit import image_tower_locked
from babelcap.training.plots import plot_accuracy_matrix
from babelcap.training.trainer import Trainer, launched_world_size

log = logging.getLogger(__name__)

STATE_FILE = "continual_state.json"  # in every stage's export: languages + token usage


def run_continual(cfg: TrainConfig) -> dict[str, Any]:
    """All stages, one language after another (see `training.continual`); `cfg` is not changed."""
    return ContinualRun(cfg).run()


def _image_tower_check(model: torch.nn.Module) -> None:
    if not image_tower_locked(model):
        raise AssertionError("continual stage left the image tower trainable")


class ContinualRun:
    """Drives the stages: vocabulary, growth, training, evaluation, saving."""

    def __init__(self, cfg: TrainConfig) -> None:
        if launched_world_size() > 1:
            # Stages grow the vocabulary, evaluate and write between trainings: one process.
            raise ValueError(
                "continual learning runs in one process: launch it without torchrun "
                f"(this launch has {launched_world_size()} processes)"
            )
        self.cfg = cfg
        self.opts = ContinualOptions.from_options(cfg.method.options)
        self.languages = list(self.opts.languages or cfg.data.languages or [])
        if not self.languages:
            raise ValueError(
                "continual learning needs languages: --languages pt,de,hi "
                "(or data.languages / method.options.languages)"
            )
        if self.opts.base_language in self.languages:
            raise ValueError(
                f"the base language {self.opts.base_language!r} is where the "
                "model starts; list only the new languages"
            )
        self.out = Path(cfg.run.output_dir)
        self.start_id: str | None = None

    # -- evaluation
    def _eval_data(self, languages: Sequence[str]):
        o = self.opts
        if not o.eval_data:
            return None
        from babelcap.training.eval_data import load_eval_data

        return load_eval_data(
            o.eval_data, languages, split=o.eval_split, max_captions=o.eval_max_captions
        )

    def _evaluate(self, bundle: ClipBundle, data, name: str) -> dict[str, float]:
        from babelcap.training.evaluate import evaluate

        if data is None:
            return {}
        result = evaluate(bundle, data, name=name, zero_shot=False)
        return {lang: m["mean_recall"] for lang, m in result["languages"].items()}

    # -- state carried from stage to stage (inside each stage's export)
    def _initial_state(self, model_dir: str, bundle: ClipBundle) -> dict[str, Any]:
        path = Path(model_dir) / STATE_FILE
        if path.is_file():
            return json.loads(path.read_text())
        usage: dict[str, list[int]] = {}
        base = self.opts.base_language
        if self.opts.count_base_language:
            texts = shard_captions(
                self.cfg.data.train,
                base,
                schema.ORIGINS,
                self.opts.max_vocab_captions,
                splits=self.cfg.data.splits,
            )
            if texts:
                usage[base] = sorted(token_usage(bundle.tokenizer.tokenizer, texts))
        return {"teacher": model_dir, "languages": [base], "usage": usage}

    def run(self) -> dict[str, Any]:
        cfg, opts = self.cfg, self.opts
        self.out.mkdir(parents=True, exist_ok=True)
        start = cfg.model.name
        bundle = load_clip(
            start,
            cfg.model.pretrained,
            text_tower=cfg.model.text_tower,
            pretrained_text=cfg.model.pretrained_text,
        )
        state = self._initial_state(start, bundle)
        # Finished stages are reused only when they grew from these very weights.
        self.start_id = weights_id(bundle.model)
        teacher_dir = opts.teacher or state.get("teacher") or start
        # The frozen teacher: the model before the first stage (its own tokenizer included).
        teacher = load_clip(teacher_dir, cfg.model.pretrained if teacher_dir == start else None)
        teacher.model.eval()
        base = opts.base_language
        eval_langs = [base, *[lang for lang in state["languages"] if lang != base], *self.languages]
        eval_langs = list(dict.fromkeys(eval_langs))
        eval_data = self._eval_data(eval_langs)

        stages = ["start"]
        acc_rows = [self._evaluate(bundle, eval_data, "start")]
        summaries = []
        current = start
        for k, lang in enumerate(self.languages, 1):
            stage_dir = self.out / f"stage-{k}-{lang}"
            summary = self._finished_stage(stage_dir, lang, state) if cfg.run.resume else None
            if summary is not None:
                log.info("continual stage %d (%s): already done in %s", k, lang, stage_dir)
            else:
                summary = self._stage(current, lang, state, teacher, stage_dir, k)
            current = str(stage_dir / "export")
            state = json.loads((Path(current) / STATE_FILE).read_text())
            reloaded = load_clip(current)  # the saved model, grown vocabulary included
            stages.append(f"+{lang}")
            acc_rows.append(self._evaluate(reloaded, eval_data, f"+{lang}"))
            summaries.append(summary)
            log.info("continual stage %d (%s): %s", k, lang, acc_rows[-1])
        return self._report(stages, eval_langs, acc_rows, summaries, current, state)

    def _finished_stage(
        self, stage_dir: Path, lang: str, state: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The summary of a stage already trained from the same start weights after the same
        languages (its folder may have moved since), else None."""
        done_file = stage_dir / "export" / STATE_FILE
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        if done.get("languages") != [*state["languages"], lang]:
            return None
        if done.get("run_start") != self.start_id:
            return None
        summary = json.loads((stage_dir / "summary.json").read_text())
        if summary.get("export"):  # the folder may have moved since: use where it is
            summary["export"] = str(stage_dir / "export" / Path(summary["export"]).name)
        summary.update(
            {
                "output_dir": str(stage_dir),
                "language": lang,
                "resumed": True,
                "new_tokens": done["added_tokens"][lang],
                "vocab_size": done["vocab_size"],
            }
        )
        return summary

    def _stage(
        self,
        current: str,
        lang: str,
        state: dict[str, Any],
        teacher: ClipBundle,
        stage_dir: Path,
        k: int,
    ) -> dict[str, Any]:
        cfg, opts = self.cfg, self.opts
        bundle = load_clip(current)
        hf_tok = bundle.tokenizer.tokenizer
        texts = shard_captions(
            cfg.data.train, lang, cfg.data.origins, opts.max_vocab_captions, cfg.data.splits
        )
        if not texts:
            raise ValueError(f"no {lang!r} captions in the shards {cfg.data.train}")
        pieces = train_vocabulary(texts, opts.vocab_size)
        grown, added = extend_tokenizer(hf_tok, pieces, stage_dir / "tokenizer")
        bundle.tokenizer.tokenizer = grown
        gen = torch.Generator().manual_seed(opts.seed + k)
        old = grow_embeddings(
            bundle.model,
            len(grown),
            "teir" if opts.teir else "plain",
            exclude_ids=grown.all_special_ids,
            generator=gen,
        )
        used = token_usage(grown, texts)
        earlier = [set(v) for v in state["usage"].values()]
        scale = teir_row_scale(len(grown), used, earlier, grown.all_special_ids, teir=opts.teir)
        log.info(
            "stage %d (%s): %d captions, %d new tokens (vocab %d -> %d), %d rows train",
            k,
            lang,
            len(texts),
            len(added),
            old,
            len(grown),
            int((scale > 0).sum()),
        )

        changes: dict[str, Any] = {
            "data.languages": [lang],
            "data.with_source": True,
            "run.output_dir": str(stage_dir),
            "run.export": True,
            "run.resume": False,
            "run.seed": cfg.run.seed + k,
        }
        if opts.steps_per_language:
            changes["optim.max_steps"] = opts.steps_per_language
        stage_cfg = cfg.updated(changes)
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        method = ContinualMethod(stage_cfg.method, teacher=teacher, row_scale=scale)
        trainer = Trainer(stage_cfg, bundle=bundle, method=method)
        summary = trainer.fit()
        _image_tower_check(trainer.raw_model)
        new_state = {
            "teacher": state.get("teacher"),
            "languages": [*state["languages"], lang],
            "usage": {**state["usage"], lang: sorted(used)},
            "added_tokens": {**state.get("added_tokens", {}), lang: len(added)},
            "vocab_size": len(grown),
            "run_start": self.start_id,
        }
        (stage_dir / "export" / STATE_FILE).write_text(json.dumps(new_state))
        summary.update(
            {
                "language": lang,
                "new_tokens": len(added),
                "vocab_size": len(grown),
                "trained_rows": int((scale > 0).sum()),
            }
        )
        return summary

    def _report(
        self,
        stages: list[str],
        languages: list[str],
        rows: list[dict[str, float]],
        summaries: list[dict[str, Any]],
        final: str,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        last = summaries[-1] if summaries else {}
        result: dict[str, Any] = {
            "model": final,
            "languages": self.languages,
            "teir": self.opts.teir,
            "vocab_size": state.get("vocab_size"),
            "stages": summaries,
            # The trainer's summary keys, over all stages (what `babelcap train` prints).
            "steps": sum(s.get("steps", 0) for s in summaries),
            "samples": sum(s.get("samples", 0) for s in summaries),
            "final_loss": last.get("final_loss", math.nan),
            "parameters": last.get("parameters", {}),
            "trainable_percent": last.get("trainable_percent", 0.0),
            "output_dir": str(self.out),
            "export": last.get("export"),
        }
        if rows and rows[0]:
            # Column order: base language, then languages in order of arrival.
            acc = [[row.get(lang, math.nan) for lang in languages] for row in rows]
            (self.out / "accuracy.csv").write_text(cl_metrics.matrix_to_csv(acc, stages, languages))
            plot_accuracy_matrix(
                acc,
                stages,
                languages,
                self.out / "accuracy.png",
                title=f"mean recall ({'TEIR' if self.opts.teir else 'plain'})",
            )
            # Metrics over the base language + the languages learned in this run.
            cols = [0, *[languages.index(lang) for lang in self.languages]]
            sub = [[r[c] for c in cols] for r in acc]
            result.update(cl_metrics.summarize(sub))
            result["matrix"] = {"stages": stages, "languages": languages, "mean_recall": acc}
            result["csv"] = str(self.out / "accuracy.csv")
            result["heatmap"] = str(self.out / "accuracy.png")
        (self.out / "continual.json").write_text(json.dumps(result, indent=2, default=str))
        if "AA" in result:
            log.info(
                "continual (%s) over %s: AA %.2f, F %.2f, F_en %.2f; matrix %s, heatmap %s",
                "TEIR" if self.opts.teir else "plain",
                ",".join(self.languages),
                result["AA"],
                result["F"],
                result["F_en"],
                result["csv"],
                result["heatmap"],
            )
        return result

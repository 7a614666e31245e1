"""Continual language learning (CLL-CLIP): languages arrive one after another.

`babelcap train --method continual --languages pt,es,de,hi` runs one stage per language, each
starting from the previous stage's model:

1. train a sentencepiece vocabulary on the language's captions in the shards and add the pieces
   the tokenizer lacks to its unigram vocabulary (the HF tokenizer then produces them, and the
   saved tokenizer reloads with them);
2. grow the token-embedding matrix (old rows kept); new rows from N(mean, std) of the existing
   rows (TEIR) or N(0, initializer_range) (plain);
3. train ONLY the token embeddings (everything else stays bit-identical) with
   mse_weight * MSE(student(target caption), teacher(parallel English caption))
   + clip_weight * InfoNCE(student text, teacher image embeddings), the teacher being the frozen
   model before the first stage;
4. TEIR: each embedding row's gradient and update (weight decay included) is scaled by
   1[token occurs in this language] / (1 + number of earlier languages that used it); special
   tokens never change;
5. evaluate every language (the accuracy matrix), then save the grown tokenizer + weights as an
   open_clip folder the next stage (and `babelcap eval`) loads.

At the end: `accuracy.csv`, `accuracy.png` (heatmap), `continual.json` (AA, F, F_en, per stage).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from babelcap.core import schema
from babelcap.models.clip import ClipBundle, unwrap, weights_id
from babelcap.training import cl_metrics
from babelcap.training.config import MethodConfig, TrainConfig, options_from
from babelcap.training.lit import image_tower_locked, text_transformer
from babelcap.training.methods import ClipMethod, register_method

log = logging.getLogger(__name__)

STATE_FILE = "continual_state.json"  # in every stage's export: languages + token usage


# ----------------------------------------------------------------------------- options


@dataclass
class ContinualOptions:
    languages: list[str] | None = None  # order of arrival (default: data.languages)
    teir: bool = True
    mse_weight: float = 1.0
    clip_weight: float = 0.01
    normalize_mse: bool = False  # MSE on normalised embeddings instead of raw ones
    vocab_size: int = 400  # sentencepiece pieces trained per language (before dropping known)
    max_vocab_captions: int = 200_000
    base_language: str = "en"
    count_base_language: bool = True  # the base language counts as an earlier user of tokens
    teacher: str | None = None  # frozen teacher model (default: the model of the first stage)
    steps_per_language: int | None = None  # default: optim.max_steps
    eval_world: str | None = None  # evaluate on a world's gold captions ...
    eval_shards: list[str] | None = None  # ... or on shards (gold captions)
    eval_split: str = "test"
    eval_max_captions: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ContinualOptions:
        return options_from(cls, options, "continual")


# ----------------------------------------------------------------------------- vocabulary


def train_vocabulary(texts: Sequence[str], vocab_size: int) -> list[tuple[str, float]]:
    """A sentencepiece unigram vocabulary of `texts`: [(piece, log-prob score)] (no specials)."""
    import sentencepiece as spm

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no captions to train a vocabulary on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
        num_threads=1,  # 1 thread: deterministic
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return [
        (sp.id_to_piece(i), sp.get_score(i))
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
    ]


def extend_tokenizer(
    tokenizer: Any, pieces: Iterable[tuple[str, float]], out_dir: str | Path
) -> tuple[Any, list[int]]:
    """Add the pieces the tokenizer lacks to its unigram model; save to `out_dir` and reload.

    The pieces join the sentencepiece (unigram) vocabulary with their scores (raised where needed
    to beat the old segmentation of the same text), so the tokenizer's own segmentation picks
    them up; returns (reloaded tokenizer, ids of the added pieces).
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("extending the vocabulary needs a fast (tokenizers) HF tokenizer")
    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") != "Unigram":
        raise ValueError(
            f"extending the vocabulary needs a sentencepiece unigram tokenizer "
            f"(XLM-R style), got a {model.get('type')} model"
        )
    size = len(model["vocab"])
    if any(t["id"] >= size for t in data.get("added_tokens", [])):
        raise ValueError(
            "the tokenizer has added tokens beyond its unigram vocabulary; "
            "cannot append pieces without moving their ids"
        )
    known = {piece for piece, _ in model["vocab"]}
    scores = [float(score) for _, score in model["vocab"]]
    new = []
    for piece, score in pieces:
        if piece not in known:
            known.add(piece)
            # The language's own score, but at least enough to beat the old segmentation of the
            # same text: otherwise the unigram Viterbi would keep splitting it the old way.
            old = sum(scores[t.id] for t in backend.model.tokenize(piece))
            new.append([piece, max(float(score), old + 1.0)])
    model["vocab"].extend(new)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    tokenizer.save_pretrained(str(out))
    Tokenizer.from_str(json.dumps(data)).save(str(out / "tokenizer.json"))
    # Files of a slow (sentencepiece) tokenizer would disagree with tokenizer.json: drop them.
    for stale in ("sentencepiece.bpe.model", "spiece.model"):
        (out / stale).unlink(missing_ok=True)
    grown = AutoTokenizer.from_pretrained(str(out))
    return grown, list(range(size, size + len(new)))


def token_usage(tokenizer: Any, texts: Iterable[str]) -> set[int]:
    """Ids of the (non-special) tokens that occur when tokenizing `texts`."""
    special = set(tokenizer.all_special_ids)
    used: set[int] = set()
    texts = list(texts)
    for i in range(0, len(texts), 1024):
        for ids in tokenizer(texts[i : i + 1024], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    return used - special


# ----------------------------------------------------------------------------- embeddings


def word_embeddings(model: torch.nn.Module) -> torch.nn.Embedding:
    """The token-embedding matrix of the open_clip model's HF text tower."""
    return text_transformer(unwrap(model)).get_input_embeddings()


def grow_embeddings(
    model: torch.nn.Module,
    new_size: int,
    init: str = "teir",
    exclude_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
) -> int:
    """Grow the token-embedding matrix to `new_size` rows (old rows kept); returns the old size.

    init "teir": new rows ~ N(mean, std) of the existing rows, per dimension (special rows in
    `exclude_ids` left out of the statistics), so old and new embeddings share a distribution.
    init "plain": N(0, initializer_range) as the architecture initialises embeddings.
    """
    hf = text_transformer(unwrap(model))
    old = hf.get_input_embeddings().weight
    old_size, dim = old.shape
    if new_size < old_size:
        raise ValueError(f"cannot shrink the vocabulary from {old_size} to {new_size}")
    if new_size == old_size:
        return old_size
    with torch.no_grad():
        keep = torch.ones(old_size, dtype=torch.bool)
        keep[[i for i in exclude_ids if 0 <= i < old_size]] = False
        rows = old.detach().float()[keep]
        hf.resize_token_embeddings(new_size, mean_resizing=False)
        weight = hf.get_input_embeddings().weight
        n_new = new_size - old_size
        noise = torch.randn(n_new, dim, generator=generator)
        if init == "teir":
            new = rows.mean(0) + noise * rows.std(0)
        elif init == "plain":
            new = noise * float(getattr(hf.config, "initializer_range", 0.02))
        else:
            raise ValueError(f"init must be 'teir' or 'plain', got {init!r}")
        weight[old_size:] = new.to(weight.dtype).to(weight.device)
    text = unwrap(model).text
    if getattr(text, "config", None) is not None:
        text.config.vocab_size = new_size
    return old_size


def teir_row_scale(
    vocab_size: int,
    current: set[int],
    earlier: Sequence[set[int]],
    special_ids: Iterable[int] = (),
    teir: bool = True,
) -> torch.Tensor:
    """Per-row scale of gradient and update.

    TEIR: 1[row used by the current language] / (1 + number of earlier languages using it).
    Plain: 1 everywhere. Special tokens: 0 in both.
    """
    if teir:
        counts = torch.zeros(vocab_size)
        for used in earlier:
            idx = [i for i in used if i < vocab_size]
            counts[idx] += 1
        present = torch.zeros(vocab_size)
        present[[i for i in current if i < vocab_size]] = 1.0
        scale = present / (1.0 + counts)
    else:
        scale = torch.ones(vocab_size)
    scale[[i for i in special_ids if 0 <= i < vocab_size]] = 0.0
    return scale


class RowScaledUpdate:
    """Scale one parameter's gradient rows and its optimizer update rows (decay included).

    The gradient hook scales the rows' gradients (rows with scale 0 get none, so Adam's moments
    for them stay zero and clipping ignores them). Because Adam normalises gradient scale away,
    the step itself is scaled too: the optimizer's pre/post step hooks keep the row's old value
    w0 and set w = w0 + scale * (w_adamw - w0), which scales AdamW's decoupled weight decay by the
    same factor. Rows with scale 0 come out bit-identical.
    """

    def __init__(self, param: torch.nn.Parameter, scale: torch.Tensor) -> None:
        self.param = param
        self.scale = scale.to(param.device, param.dtype)
        self._before: torch.Tensor | None = None
        self._handles: list[Any] = []

    def _grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.scale.to(grad.dtype).unsqueeze(1)

    def _pre(self, optimizer, args, kwargs) -> None:
        self._before = self.param.detach().clone()

    def _post(self, optimizer, args, kwargs) -> None:
        if self._before is None:
            return
        with torch.no_grad():
            s = self.scale.unsqueeze(1)
            self.param.copy_(
                torch.where(s == 0, self._before, self._before + s * (self.param - self._before))
            )
        self._before = None

    def attach(self, optimizer: torch.optim.Optimizer) -> RowScaledUpdate:
        self._handles = [
            self.param.register_hook(self._grad_hook),
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ----------------------------------------------------------------------------- the method


def only_token_embeddings(model: torch.nn.Module) -> torch.nn.Parameter:
    """Freeze everything except the text tower's token-embedding matrix; return it."""
    raw = unwrap(model)
    for p in raw.parameters():
        p.requires_grad = False
    weight = word_embeddings(raw).weight
    weight.requires_grad = True
    return weight


class ContinualMethod(ClipMethod):
    """One stage of continual language learning: only token embeddings train.

    Needs the frozen teacher (`teacher`: a ClipBundle) and, for TEIR, the per-row scale; the
    driver (`run`) sets both. Used on its own (without a teacher) the English side is the
    model's own embedding of the source caption before training, i.e. a frozen copy.
    """

    name = "continual"

    def __init__(
        self,
        cfg: MethodConfig,
        rank: int = 0,
        world_size: int = 1,
        teacher: ClipBundle | None = None,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__(cfg, rank, world_size)
        self.opts = ContinualOptions.from_options(cfg.options)
        self.teacher = teacher
        self.row_scale = row_scale
        self.scaler: RowScaledUpdate | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.teacher is None:  # a frozen copy of the model as it is now
            raw = unwrap(model)
            self.teacher = ClipBundle(copy.deepcopy(raw).eval(), None, None, None, "teacher", {})
        for p in self.teacher.model.parameters():
            p.requires_grad = False
        only_token_embeddings(model)
        return model

    def attach(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        """Install the per-row gradient / update scaling on the trainer's optimizer."""
        if self.row_scale is not None:
            self.scaler = RowScaledUpdate(word_embeddings(model).weight, self.row_scale)
            self.scaler.attach(optimizer)

    def train_mode(self, model: torch.nn.Module) -> None:
        # Everything but the embeddings is frozen: no dropout, the same function as the teacher.
        model.eval()
        self.teacher.model.eval()

    @torch.no_grad()
    def _teacher_text(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            teacher = self.teacher.model
            if next(teacher.parameters()).device != device:
                teacher.to(device)
            tokenizer = self.teacher.tokenizer
            tokens = tokenizer(missing) if tokenizer is not None else None
            if tokens is None:
                raise ValueError("the continual teacher needs its tokenizer")
            feats = teacher.encode_text(tokens.to(device)).float()
            for t, f in zip(missing, feats, strict=True):
                self._cache[t] = f.cpu()
        return torch.stack([self._cache[t] for t in texts]).to(device)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        if "source_captions" not in batch:
            raise ValueError(
                "continual learning needs each caption's English source: set data.with_source: true"
            )
        raw = unwrap(model)
        opts = self.opts
        text = raw.encode_text(batch["text"]).float()
        device = text.device
        target = self._teacher_text(batch["source_captions"], device)
        if opts.normalize_mse:
            l_mse = F.mse_loss(F.normalize(text, dim=-1), F.normalize(target, dim=-1))
        else:
            l_mse = F.mse_loss(text, target)
        if "image_features" in batch:
            image = F.normalize(batch["image_features"].float(), dim=-1)
        else:
            with torch.no_grad():  # the teacher's image tower (= the student's, frozen)
                image = self.teacher.model.encode_image(batch["images"], normalize=True).float()
        scale = raw.logit_scale.exp().detach()
        l_clip = self.clip_loss(image, F.normalize(text, dim=-1), scale)
        loss = opts.mse_weight * l_mse + opts.clip_weight * l_clip
        return loss, {"loss_mse": float(l_mse.detach()), "loss_clip": float(l_clip.detach())}

    # ------------------------------------------------------------------ the driver
    @classmethod
    def run(cls, cfg: TrainConfig) -> dict[str, Any]:
        """All stages, one language after another (see the module docstring)."""
        return ContinualRun(cfg).run()


def _image_tower_check(model: torch.nn.Module) -> None:
    if not image_tower_locked(model):
        raise AssertionError("continual stage left the image tower trainable")


# ----------------------------------------------------------------------------- driver


def shard_captions(
    specs: Sequence[str], language: str, origins: Sequence[str] | None, limit: int | None = None
) -> list[str]:
    """Caption texts of one language in the shards (for the language's vocabulary)."""
    import pyarrow.dataset as ds

    from babelcap.training.data import CaptionSelection, find_shards

    shards = find_shards(specs)
    selection = CaptionSelection(languages=(language,), origins=tuple(origins) if origins else None)
    texts: list[str] = []
    dataset = ds.dataset(list(shards.files), format="parquet", filesystem=shards.filesystem)
    for batch in dataset.to_batches(columns=["captions"]):
        for captions in batch.column("captions").to_pylist():
            captions = captions or []
            texts.extend(captions[i]["text"] for i in selection.select(captions))
            if limit is not None and len(texts) >= limit:
                return texts[:limit]
    return texts


def plot_accuracy_matrix(
    acc: Sequence[Sequence[float]],
    stages: Sequence[str],
    languages: Sequence[str],
    path: str | Path,
    title: str = "mean recall after each stage",
) -> Path:
    """Heatmap of the accuracy matrix (stages x languages) with the values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[math.nan if v is None else float(v) for v in row] for row in acc])
    fig, ax = plt.subplots(figsize=(1.2 * len(languages) + 2, 0.6 * len(stages) + 1.5))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(data))))
    ax.set_xticks(range(len(languages)), languages)
    ax.set_yticks(range(len(stages)), stages)
    ax.set_xlabel("evaluated language")
    ax.set_ylabel("after stage")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not math.isnan(data[i, j]):
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:.1f}",
                    ha="center",
                    va="center",
                    color="white" if data[i, j] < 0.6 * np.nanmax(data) else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class ContinualRun:
    """Drives the stages: vocabulary, growth, training, evaluation, saving."""

    def __init__(self, cfg: TrainConfig) -> None:
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

    # -- evaluation
    def _eval_data(self, languages: Sequence[str]):
        from babelcap.training.evaluate import shard_eval_data, world_eval_data

        o = self.opts
        if o.eval_world:
            return world_eval_data(o.eval_world, languages, o.eval_split, o.eval_max_captions)
        if o.eval_shards:
            return shard_eval_data(o.eval_shards, languages, split=o.eval_split)
        return None

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
                self.cfg.data.train, base, schema.ORIGINS, self.opts.max_vocab_captions
            )
            if texts:
                usage[base] = sorted(token_usage(bundle.tokenizer.tokenizer, texts))
        return {"teacher": model_dir, "languages": [base], "usage": usage}

    def run(self) -> dict[str, Any]:
        from babelcap.models.clip import load_clip

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
            done_file = stage_dir / "export" / STATE_FILE
            done = json.loads(done_file.read_text()) if done_file.is_file() else {}
            if (
                cfg.run.resume
                and done.get("languages") == [*state["languages"], lang]
                and done.get("run_start") == self.start_id
            ):
                log.info("continual stage %d (%s): already done in %s", k, lang, stage_dir)
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
            else:
                _, summary = self._stage(current, lang, state, teacher, stage_dir, k)
            current = str(stage_dir / "export")
            state = json.loads((Path(current) / STATE_FILE).read_text())
            reloaded = load_clip(current)  # the saved model, grown vocabulary included
            stages.append(f"+{lang}")
            acc_rows.append(self._evaluate(reloaded, eval_data, f"+{lang}"))
            summaries.append(summary)
            log.info("continual stage %d (%s): %s", k, lang, acc_rows[-1])
        return self._report(stages, eval_langs, acc_rows, summaries, current, state)

    def _stage(
        self,
        current: str,
        lang: str,
        state: dict[str, Any],
        teacher: ClipBundle,
        stage_dir: Path,
        k: int,
    ) -> tuple[ClipBundle, dict[str, Any]]:
        from babelcap.models.clip import load_clip
        from babelcap.training.trainer import Trainer

        cfg, opts = self.cfg, self.opts
        bundle = load_clip(current)
        hf_tok = bundle.tokenizer.tokenizer
        texts = shard_captions(cfg.data.train, lang, cfg.data.origins, opts.max_vocab_captions)
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

        stage_cfg = copy.deepcopy(cfg)
        stage_cfg.data.languages = [lang]
        stage_cfg.data.with_source = True
        stage_cfg.run.output_dir = str(stage_dir)
        stage_cfg.run.export = True
        stage_cfg.run.resume = False
        stage_cfg.run.seed = cfg.run.seed + k
        if opts.steps_per_language:
            stage_cfg.optim.max_steps = opts.steps_per_language
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        method = ContinualMethod(stage_cfg.method, teacher=teacher, row_scale=scale)
        trainer = Trainer(stage_cfg, bundle=bundle, method=method)
        method.attach(trainer.optimizer, trainer.model)
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
        return bundle, summary

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


register_method("continual", ContinualMethod)

"""Evaluation per language: text->image and image->text recall@1/5/10 and mean recall, plus
every zero-shot classification task the dataset provides, with that dataset's class names and
prompt templates in each language (result keys ``zs_<task>``), and across languages the
average, the spread (max - min) and the standard deviation of each figure (``summary``).

Recall is CLIP_benchmark's (clip_benchmark/metrics/zeroshot_retrieval.py): text->image
("image retrieval") counts a caption as found when its image is among the k best images;
image->text ("text retrieval") counts an image as found when ANY of its captions is among the k
best captions. Two tie rules (`TIE_RULES`), equal on data without ties or repeated captions
(tests/test_retrieval_metrics.py checks that against CLIP_benchmark's own function):

- ``babelcap`` (default): an incorrect item scoring exactly as high as the best correct one ranks
  ahead of it (a model that scores everything alike gets R@1 = 0, not 100), and a caption is
  also correct for every other image with the identical caption string (such a query cannot
  tell those images apart; the world's grammar repeats captions);
- ``clip_benchmark``: ``torch.topk`` of the scores decides, whichever way it breaks a tie; a
  caption is correct for its own image only; the images are those with captions in the
  language (CLIP_benchmark builds one dataset per language). Use it to reproduce published
  tables.

Images are encoded once per model and captions per language in batches; both can be cached on
disk per model (`EmbeddingCache`: keyed by the model's weights and the images' and captions'
content, .npy read with allow_pickle=False). Evaluation data comes from
`babelcap.training.eval_data.load_eval_data`; results are plain dicts (JSON), rendered as a
Markdown table comparing models, a bar chart per language, and CLIP_benchmark's result files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from babelcap.core.images import open_rgb, to_rgb
from babelcap.core.near_duplicates import Fingerprints
from babelcap.models.clip import ClipBundle, unwrap, weights_id
from babelcap.training.contamination import check_overlap, ensure_clean, find_run_index
from babelcap.training.eval_data import EvalData, ZeroShotTask

__all__ = [
    "EmbeddingCache",
    "EvalData",
    "ZeroShotTask",
    "clip_benchmark_records",
    "encode_images",
    "encode_texts",
    "evaluate",
    "language_summary",
    "retrieval_metrics",
    "save_report",
    "to_markdown",
    "write_clip_benchmark_results",
    "zero_shot_accuracy",
]

RECALL_KS = (1, 5, 10)
TIE_RULES = ("babelcap", "clip_benchmark")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- encoding


def _device(model: torch.nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: Sequence[Any], batch_size: int = 128) -> torch.Tensor:
    from PIL import Image

    model = unwrap(bundle.model)
    model.eval()
    feats = []
    for i in range(0, len(images), batch_size):
        chunk = [
            im if isinstance(im, Image.Image) else open_rgb(im) for im in images[i : i + batch_size]
        ]
        x = torch.stack([bundle.preprocess_val(to_rgb(im)) for im in chunk])
        feats.append(model.encode_image(x.to(_device(model)), normalize=True).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    model = unwrap(bundle.model)
    model.eval()
    feats = []
    for i in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(list(texts[i : i + batch_size])).to(_device(model))
        feats.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(feats)


class EmbeddingCache:
    """Embeddings on disk, one folder per model: ``ROOT/<model key>/<kind>-<content key>.npy``.

    The model key hashes the weights (all of them: an adapter changes it), the preprocessing
    and the tokenizer; the content key hashes the images' ids (sha256 of their bytes) or the
    caption strings, so a changed file or another subset is another entry. Files are plain
    float32 .npy, read with ``allow_pickle=False`` and checked for their row count; written to
    a temporary name and renamed, so a killed run leaves no half entry.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._model_keys: dict[int, str] = {}

    def model_key(self, bundle: ClipBundle) -> str:
        model = unwrap(bundle.model)
        if id(model) not in self._model_keys:
            ident = {
                "weights": weights_id(model),
                "name": bundle.name,
                "preprocess": bundle.preprocess_cfg,
                "tokenizer": type(bundle.tokenizer).__name__,
                "context": getattr(bundle.tokenizer, "context_length", None),
            }
            blob = json.dumps(ident, sort_keys=True, default=str).encode()
            self._model_keys[id(model)] = hashlib.sha256(blob).hexdigest()[:24]
        return self._model_keys[id(model)]

    @staticmethod
    def content_key(items: Sequence[Any]) -> str:
        h = hashlib.sha256(str(len(items)).encode())
        for item in items:
            h.update(str(item).encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()[:24]

    def get(
        self,
        bundle: ClipBundle,
        kind: str,
        items: Sequence[Any],
        compute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        import numpy as np

        folder = self.root / self.model_key(bundle)
        path = folder / f"{kind}-{self.content_key(items)}.npy"
        if path.is_file():
            array = np.load(path, allow_pickle=False)
            if array.ndim == 2 and array.shape[0] == len(items) and array.dtype == np.float32:
                return torch.from_numpy(array)
            log.warning("embedding cache %s does not fit (%s); recomputing", path, array.shape)
        features = compute()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, features.float().numpy(), allow_pickle=False)
        os.replace(tmp, path)
        return features


# ----------------------------------------------------------------------------- metrics


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int],
    texts: Sequence[str] | None = None,
    tie_rule: str = "babelcap",
) -> dict[str, float]:
    """Recall@k both ways (percent) and their mean ("mean recall", as CAPIVARA reports).

    ``t2i_r{k}`` is CLIP_benchmark's ``image_retrieval_recall@k`` (one query per caption) and
    ``i2t_r{k}`` its ``text_retrieval_recall@k`` (one query per image; found when any of its
    captions is in the top k); `tie_rule` as in the module doc (``babelcap`` uses `texts` for
    identical captions; ``clip_benchmark`` ignores them).
    """
    if tie_rule == "clip_benchmark":
        return _recall_clip_benchmark(image_features, text_features, text_to_image)
    if tie_rule != "babelcap":
        raise ValueError(f"unknown tie rule {tie_rule!r}; known: {', '.join(TIE_RULES)}")
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    n_texts, n_images = len(t2i), image_features.shape[0]
    positive = torch.zeros(n_texts, n_images, dtype=torch.bool)
    positive[torch.arange(n_texts), t2i] = True
    if texts is not None:
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(text, []).append(i)
        for members in groups.values():
            if len(members) > 1:
                rows = torch.as_tensor(members)
                positive[rows] = positive[rows].any(dim=0)
    sims = (text_features @ image_features.T).float()  # texts x images
    out: dict[str, float] = {}
    neg_inf = torch.finfo(sims.dtype).min
    # text -> image: incorrect images scoring >= the best correct image
    best_t = sims.masked_fill(~positive, neg_inf).amax(dim=1, keepdim=True)
    rank_t = ((sims >= best_t) & ~positive).sum(dim=1)
    # image -> text: incorrect captions scoring >= the image's best correct caption
    sims_i, pos_i = sims.T, positive.T
    has_text = pos_i.any(dim=1)
    best_i = sims_i.masked_fill(~pos_i, neg_inf).amax(dim=1, keepdim=True)
    rank_i = ((sims_i >= best_i) & ~pos_i).sum(dim=1)[has_text]
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = 100.0 * float((rank_t < k).float().mean())
        out[f"i2t_r{k}"] = 100.0 * float((rank_i < k).float().mean())
    out["mean_recall"] = _mean_recall(out)
    return out


def _mean_recall(metrics: Mapping[str, float]) -> float:
    return sum(metrics[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in RECALL_KS) / 6


def _recall_clip_benchmark(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: Sequence[int]
) -> dict[str, float]:
    """CLIP_benchmark's recall: a hit when a positive is among `torch.topk`'s k indices (its
    `recall_at_k(...) > 0`), over the images that have captions here."""
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    present, t2i = torch.unique(t2i, return_inverse=True)  # images with captions, re-indexed
    n_texts, n_images = len(t2i), len(present)
    positive = torch.zeros(n_texts, n_images, dtype=torch.bool)
    positive[torch.arange(n_texts), t2i] = True
    sims = (text_features @ image_features[present].T).float()
    out: dict[str, float] = {}
    for k in RECALL_KS:
        top_t = sims.topk(min(k, n_images), dim=1).indices
        top_i = sims.T.topk(min(k, n_texts), dim=1).indices
        out[f"t2i_r{k}"] = 100.0 * float(positive.gather(1, top_t).any(1).float().mean())
        out[f"i2t_r{k}"] = 100.0 * float(positive.T.gather(1, top_i).any(1).float().mean())
    out["mean_recall"] = _mean_recall(out)
    return out


def fill_template(template: str, name: str) -> str:
    """A prompt from a template: ``{}`` (babelcap) or ``{c}`` (CLIP_benchmark's files)."""
    return template.replace("{c}", name).replace("{}", name)


def zero_shot_accuracy(
    bundle: ClipBundle, image_features: torch.Tensor, task: ZeroShotTask, lang: str
) -> float | None:
    """Accuracy (percent) of classifying the labelled images by the task's class names in
    `lang`, each class embedded as the mean of its prompts; None when nothing to classify."""
    names = task.classes.get(lang)
    keep = [i for i, y in enumerate(task.labels) if y is not None]
    if not names or not keep:
        return None
    templates = task.templates_for(lang)
    weights = []
    for name in names:
        emb = encode_texts(bundle, [fill_template(t, name) for t in templates])
        weights.append(F.normalize(emb.mean(0), dim=-1))
    classifier = torch.stack(weights)  # classes x dim
    pred = (image_features[keep] @ classifier.T).argmax(1)
    truth = torch.tensor([task.labels[i] for i in keep])
    return 100.0 * float((pred == truth).float().mean())


def evaluate(
    bundle: ClipBundle,
    data: EvalData,
    name: str = "model",
    zero_shot: bool = True,
    training_images: Fingerprints | str | None = "recorded",
    allow_contamination: bool = False,
    contamination: dict[str, Any] | None = None,
    tie_rule: str = "babelcap",
    cache: EmbeddingCache | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Retrieval (and the dataset's zero-shot tasks) per language; returns a JSON-able dict.

    First the evaluation images are checked against the images the model trained on:
    `training_images` given, or by default those its run recorded next to the model
    (`training_images.parquet`). Any overlap raises `ContaminationError` unless
    `allow_contamination`; the result's "contamination" entry says what was checked
    (`contamination`: the outcome of that check when the caller made it already).
    Images are encoded once, captions language by language in batches; `cache` (a folder or
    an `EmbeddingCache`) keeps both on disk for the next run of the same model.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie_rule!r}; known: {', '.join(TIE_RULES)}")
    if contamination is None:
        contamination = check_contamination(bundle, data, training_images, allow_contamination)
    if cache is not None and not isinstance(cache, EmbeddingCache):
        cache = EmbeddingCache(cache)

    def encoded(kind: str, items: Sequence[Any], compute: Callable[[], torch.Tensor]):
        return compute() if cache is None else cache.get(bundle, kind, items, compute)

    image_keys = data.image_ids or [str(im) for im in data.images]
    image_features = encoded("images", image_keys, lambda: encode_images(bundle, data.images))
    result: dict[str, Any] = {
        "model": name,
        "dataset": data.name,
        "arch": bundle.name,
        "pretrained": bundle.pretrained or bundle.source or "",
        "images": len(data.images),
        "reader": dict(data.info),  # e.g. images its files list but the folder lacks
        "tie_rule": tie_rule,
        "contamination": contamination,
        "languages": {},
    }
    for lang, texts in data.texts.items():
        metrics: dict[str, Any] = {}
        if texts:
            text_features = encoded(f"texts-{lang}", texts, lambda t=texts: encode_texts(bundle, t))
            metrics = retrieval_metrics(
                image_features, text_features, data.text_to_image[lang], texts, tie_rule
            )
            del text_features  # one language's captions in memory at a time
            metrics["captions"] = len(texts)
        if zero_shot:  # a classification dataset may have no captions at all
            for task_name, task in data.zero_shot.items():
                acc = zero_shot_accuracy(bundle, image_features, task, lang)
                if acc is not None:
                    metrics[f"zs_{task_name}"] = acc
        if metrics:
            result["languages"][lang] = metrics
    result["summary"] = language_summary(result["languages"])
    return result


def language_summary(languages: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Across languages, per figure: average, spread (max - min), population standard
    deviation, and the lowest and highest with their languages (two or more languages)."""
    summary: dict[str, dict[str, Any]] = {}
    if len(languages) < 2:
        return summary
    present = [c for m in languages.values() for c in m]
    columns = [*_COLUMNS, *(c for c in dict.fromkeys(present) if c.startswith("zs_"))]
    for col in columns:
        values = {lang: float(m[col]) for lang, m in languages.items() if col in m}
        if len(values) < 2:
            continue
        mean = sum(values.values()) / len(values)
        low, high = min(values, key=values.get), max(values, key=values.get)
        summary[col] = {
            "average": mean,
            "spread": values[high] - values[low],
            "std": math.sqrt(sum((v - mean) ** 2 for v in values.values()) / len(values)),
            "min": values[low],
            "min_language": low,
            "max": values[high],
            "max_language": high,
            "languages": len(values),
        }
    return summary


# babelcap's datasets under the names CLIP_benchmark gives them (clip_benchmark/datasets/
# builder.py); a Karpathy JSON's reader names its data karpathy-<its "dataset" key>
CLIP_BENCHMARK_NAMES = {
    "xm3600": "crossmodal3600",
    "xtd10": "xtd10",
    "karpathy-flickr30k": "flickr30k",
    "karpathy-flickr8k": "flickr8k",
    "karpathy-coco": "mscoco_captions",
}
# language codes where CLIP_benchmark's differ from babelcap's (XTD10's Japanese file is _jp)
CLIP_BENCHMARK_LANGUAGES = {"xtd10": {"ja": "jp"}}
CLIP_BENCHMARK_TASK = "zeroshot_retrieval"


def clip_benchmark_records(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per language in CLIP_benchmark's result layout (what its ``eval`` dumps:
    dataset, model, pretrained, task, metrics as fractions, language, with its names for the
    dataset and the language), plus babelcap's label and tie rule."""
    dataset = str(result.get("dataset") or "dataset")
    codes = CLIP_BENCHMARK_LANGUAGES.get(dataset, {})
    records = []
    for lang, m in result["languages"].items():
        metrics: dict[str, float] = {}
        for k in RECALL_KS:
            if f"t2i_r{k}" in m:
                metrics[f"image_retrieval_recall@{k}"] = m[f"t2i_r{k}"] / 100.0
                metrics[f"text_retrieval_recall@{k}"] = m[f"i2t_r{k}"] / 100.0
        if not metrics:  # zero-shot classification only: no retrieval record
            continue
        records.append(
            {
                "dataset": CLIP_BENCHMARK_NAMES.get(dataset, dataset),
                "model": result.get("arch") or result["model"],
                "pretrained": result.get("pretrained", ""),
                "task": CLIP_BENCHMARK_TASK,
                "metrics": metrics,
                "language": codes.get(lang, lang),
                "label": result["model"],
                "tie_rule": result.get("tie_rule", "babelcap"),
            }
        )
    return records


def _slug(value: str) -> str:
    """A file-name part as CLIP_benchmark makes it (a path's "/" becomes "_"), other unsafe
    characters too."""
    return re.sub(r"[^\w.+-]+", "_", value.replace("/", "_")).strip("._") or "none"


def clip_benchmark_file_name(record: Mapping[str, Any]) -> str:
    """CLIP_benchmark's default ``--output``: ``{dataset}_{pretrained}_{model}_{language}_
    {task}.json`` (a pretrained that is a file: its base name, as CLIP_benchmark does)."""
    pretrained = str(record.get("pretrained") or "")
    if Path(pretrained).is_file():
        pretrained = Path(pretrained).name
    parts = (record["dataset"], pretrained, record["model"], record["language"], record["task"])
    return "_".join(_slug(str(p)) for p in parts) + ".json"


def write_clip_benchmark_results(
    results: Mapping[str, Mapping[str, Any]], folder: str | Path
) -> list[Path]:
    """Each record in its own file, one JSON object, named as CLIP_benchmark names them, so
    ``clip_benchmark build FOLDER`` reads them with its own results. The folder is babelcap's:
    its earlier ``*.json`` go first (a rerun on fewer languages leaves no stale record).
    Two models of one report with the same file name are told apart by a label prefix."""
    records = [r for result in results.values() for r in clip_benchmark_records(result)]
    names = [clip_benchmark_file_name(r) for r in records]
    repeated = {n for n in names if names.count(n) > 1}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink()
    paths = []
    for record, name in zip(records, names, strict=True):
        path = folder / (f"{_slug(record['label'])}_{name}" if name in repeated else name)
        path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        paths.append(path)
    return paths


def check_contamination(
    bundle: ClipBundle,
    data: EvalData,
    training_images: Fingerprints | str | None = "recorded",
    allow: bool = False,
) -> dict[str, Any]:
    """Compare the evaluation images with the model's training images (see `evaluate`)."""
    source = None
    if isinstance(training_images, str):
        source = find_run_index(bundle.source)
        training_images = Fingerprints.load(source) if source is not None else None
    if training_images is None:
        log.warning(
            "contamination not checked for %s: no record of the images it trained on "
            "(training_images.parquet)",
            bundle.source or bundle.name,
        )
        return {"checked": False, "reason": "no record of the model's training images"}
    ids = data.image_ids or [None] * len(data.images)
    overlap = ensure_clean(check_overlap(data.images, ids, training_images), allow)
    return {
        "checked": True,
        "index": str(source) if source else None,
        "allowed": bool(allow and overlap.total),
        **overlap.to_dict(),
    }


def contamination_lines(
    results: Mapping[str, Mapping[str, Any]], include_clean: bool = False
) -> list[str]:
    """What a report says first about contamination, a line per model that overlapped or was
    not checked (and, with `include_clean`, per model that was checked and clean)."""
    lines = []
    for model, result in results.items():
        info = result.get("contamination") or {}
        if include_clean and info.get("checked") and not info.get("total"):
            lines.append(
                f"Contamination check ({model}): 0 of {info['eval_images']} evaluation images "
                f"among its {info['training_images']} recorded training images (image id and "
                "perceptual hash)."
            )
        elif info.get("total"):
            lines.append(
                f"**CONTAMINATED ({model})**: {info['total']} of {info['eval_images']} "
                "evaluation images are in its training data; evaluated anyway "
                "(--allow-contamination), so its figures are inflated."
            )
        elif info and not info.get("checked", True):
            lines.append(f"Contamination not checked ({model}): {info.get('reason')}.")
    return lines


# ----------------------------------------------------------------------------- reports

_COLUMNS = (*(f"{d}_r{k}" for d in ("t2i", "i2t") for k in RECALL_KS), "mean_recall")


def to_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One table for one or more models (model -> evaluate() result), rows = language x model."""
    models = list(results)
    present = [c for r in results.values() for m in r["languages"].values() for c in m]
    zero_shot = [c for c in dict.fromkeys(present) if c.startswith("zs_")]  # tasks in order
    cols = [c for c in (*_COLUMNS, *zero_shot) if c in present]
    warnings = contamination_lines(results)
    lines = [*warnings, ""] if warnings else []
    lines += ["| language | model | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    languages = sorted({lang for r in results.values() for lang in r["languages"]})
    for lang in languages:
        for model in models:
            m = results[model]["languages"].get(lang)
            if m is None:
                continue
            cells = [f"{m[c]:.1f}" if c in m else "" for c in cols]
            lines.append(f"| {lang} | {model} | " + " | ".join(cells) + " |")
    summaries = {m: r.get("summary") or {} for m, r in results.items()}
    if any(summaries.values()):
        lines += [
            "",
            "| across languages | model | average | spread (max - min) | std | lowest | highest |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for col in cols:
            for model in models:
                s = summaries[model].get(col)
                if s:
                    lines.append(
                        f"| {col} | {model} | {s['average']:.1f} | {s['spread']:.1f} | "
                        f"{s['std']:.1f} | {s['min_language']} {s['min']:.1f} | "
                        f"{s['max_language']} {s['max']:.1f} |"
                    )
    if len(models) == 2:
        a, b = models
        lines += [
            "",
            f"| language | mean recall {a} | mean recall {b} | change |",
            "|---|---:|---:|---:|",
        ]
        for lang in languages:
            ma = results[a]["languages"].get(lang, {}).get("mean_recall")
            mb = results[b]["languages"].get(lang, {}).get("mean_recall")
            if ma is not None and mb is not None:
                lines.append(f"| {lang} | {ma:.1f} | {mb:.1f} | {mb - ma:+.1f} |")
    return "\n".join(lines) + "\n"


def save_report(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.md, mean_recall.png and ``clip_benchmark/`` (one CLIP_benchmark
    result file per model and language, `write_clip_benchmark_results`) in `out_dir`."""
    from babelcap.training.plots import plot_language_bars

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(to_markdown(results))
    plot_language_bars(results, out / "mean_recall.png")
    write_clip_benchmark_results(results, out / "clip_benchmark")
    return {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "chart": out / "mean_recall.png",
        "clip_benchmark": out / "clip_benchmark",
    }

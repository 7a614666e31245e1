"""Evaluation per language: text->image and image->text recall@1/5/10 and mean recall, plus
every zero-shot classification task the dataset provides, with that dataset's class names and
prompt templates in each language (result keys ``zs_<task>``).

Evaluation data comes from `babelcap.training.eval_data.load_eval_data` (shards, or a reader
registered by name, such as the world's); results are plain dicts (JSON), rendered as a
Markdown table comparing models (before/after) and a bar chart per language.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from babelcap.core.images import open_rgb, to_rgb
from babelcap.core.near_duplicates import Fingerprints
from babelcap.models.clip import ClipBundle, unwrap
from babelcap.training.contamination import check_overlap, ensure_clean, find_run_index
from babelcap.training.eval_data import EvalData, ZeroShotTask

__all__ = [
    "EvalData",
    "ZeroShotTask",
    "encode_images",
    "encode_texts",
    "evaluate",
    "retrieval_metrics",
    "save_report",
    "to_markdown",
    "zero_shot_accuracy",
]

RECALL_KS = (1, 5, 10)
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


# ----------------------------------------------------------------------------- metrics


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int],
    texts: Sequence[str] | None = None,
) -> dict[str, float]:
    """Recall@k both ways (percent) and their mean ("mean recall", as CAPIVARA reports).

    Positives: a caption is correct for its image and, when `texts` are given, for every other
    image that has the identical caption string (a query that says exactly the same thing
    cannot tell those images apart). Ties: an incorrect item scoring exactly as high as the best
    correct one ranks ahead of it, in both directions, so a model that scores everything alike
    gets R@1 = 0 rather than 100 (CLIP_benchmark takes `topk` of the scores, where a tie falls
    whichever way the sort puts it).
    """
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
    out["mean_recall"] = sum(out[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in RECALL_KS) / 6
    return out


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
        emb = encode_texts(bundle, [t.format(name) for t in templates])
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
) -> dict[str, Any]:
    """Retrieval (and the dataset's zero-shot tasks) per language; returns a JSON-able dict.

    First the evaluation images are checked against the images the model trained on:
    `training_images` given, or by default those its run recorded next to the model
    (`training_images.parquet`). Any overlap raises `ContaminationError` unless
    `allow_contamination`; the result's "contamination" entry says what was checked
    (`contamination`: the outcome of that check when the caller made it already).
    """
    if contamination is None:
        contamination = check_contamination(bundle, data, training_images, allow_contamination)
    image_features = encode_images(bundle, data.images)
    result: dict[str, Any] = {
        "model": name,
        "images": len(data.images),
        "contamination": contamination,
        "languages": {},
    }
    for lang, texts in data.texts.items():
        if not texts:
            continue
        text_features = encode_texts(bundle, texts)
        metrics = retrieval_metrics(image_features, text_features, data.text_to_image[lang], texts)
        metrics["captions"] = len(texts)
        if zero_shot:
            for task_name, task in data.zero_shot.items():
                acc = zero_shot_accuracy(bundle, image_features, task, lang)
                if acc is not None:
                    metrics[f"zs_{task_name}"] = acc
        result["languages"][lang] = metrics
    return result


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
    """results.json, results.md and mean_recall.png in `out_dir`."""
    from babelcap.training.plots import plot_language_bars

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(to_markdown(results))
    plot_language_bars(results, out / "mean_recall.png")
    return {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "chart": out / "mean_recall.png",
    }

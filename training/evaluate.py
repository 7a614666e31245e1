"""Evaluation per language: text->image and image->text recall@1/5/10 and mean recall, plus
every zero-shot classification task the dataset provides, with that dataset's class names and
prompt templates in each language (result keys ``zs_<task>``).

Evaluation data comes from `babelcap.training.eval_data.load_eval_data` (shards, or a reader
registered by name, such as the world's); results are plain dicts (JSON), rendered as a
Markdown table comparing models (before/after) and a bar chart per language.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from babelcap.core.images import open_rgb, to_rgb
from babelcap.models.clip import ClipBundle, unwrap
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
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: Sequence[int]
) -> dict[str, float]:
    """Recall@k both ways (percent) and their mean ("mean recall", as CAPIVARA reports)."""
    t2i = torch.as_tensor(list(text_to_image))
    sims = text_features @ image_features.T  # texts x images
    out: dict[str, float] = {}
    # text -> image: rank of the right image among all images
    correct = sims[torch.arange(len(t2i)), t2i].unsqueeze(1)
    rank_t = (sims > correct).sum(1)
    # image -> text: best rank among the image's captions
    ranks_i = torch.full((image_features.shape[0],), 10**9)
    order = sims.T.argsort(dim=1, descending=True)  # images x texts
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    for txt, img in enumerate(t2i.tolist()):
        ranks_i[img] = min(int(ranks_i[img]), int(pos[img, txt]))
    has_text = ranks_i < 10**9
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = 100.0 * float((rank_t < k).float().mean())
        out[f"i2t_r{k}"] = 100.0 * float((ranks_i[has_text] < k).float().mean())
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
    bundle: ClipBundle, data: EvalData, name: str = "model", zero_shot: bool = True
) -> dict[str, Any]:
    """Retrieval (and the dataset's zero-shot tasks) per language; returns a JSON-able dict."""
    image_features = encode_images(bundle, data.images)
    result: dict[str, Any] = {"model": name, "images": len(data.images), "languages": {}}
    for lang, texts in data.texts.items():
        if not texts:
            continue
        text_features = encode_texts(bundle, texts)
        metrics = retrieval_metrics(image_features, text_features, data.text_to_image[lang])
        metrics["captions"] = len(texts)
        if zero_shot:
            for task_name, task in data.zero_shot.items():
                acc = zero_shot_accuracy(bundle, image_features, task, lang)
                if acc is not None:
                    metrics[f"zs_{task_name}"] = acc
        result["languages"][lang] = metrics
    return result


# ----------------------------------------------------------------------------- reports

_COLUMNS = (*(f"{d}_r{k}" for d in ("t2i", "i2t") for k in RECALL_KS), "mean_recall")


def to_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One table for one or more models (model -> evaluate() result), rows = language x model."""
    models = list(results)
    present = [c for r in results.values() for m in r["languages"].values() for c in m]
    zero_shot = [c for c in dict.fromkeys(present) if c.startswith("zs_")]  # tasks in order
    cols = [c for c in (*_COLUMNS, *zero_shot) if c in present]
    lines = ["| language | model | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
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

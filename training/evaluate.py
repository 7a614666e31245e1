"""Evaluation per language: text->image and image->text recall@1/5/10 and mean recall, plus
zero-shot classification with translated class names and prompts.

Evaluation data comes from a world's gold captions (`world_eval_data`) or from shards
(`shard_eval_data`); results are plain dicts (JSON), rendered as a Markdown table comparing
models (before/after) and a bar chart per language.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from babelcap.core.images import decode_rgb, open_rgb, to_rgb
from babelcap.models.clip import ClipBundle, unwrap

RECALL_KS = (1, 5, 10)

# Prompt templates for zero-shot classification in the world's languages ("{}" = class name).
PROMPTS: dict[str, list[str]] = {
    "en": ["{}", "a photo of a {}", "an image of a {}"],
    "pt": ["{}", "uma foto: {}", "uma imagem: {}"],
    "es": ["{}", "una foto: {}", "una imagen: {}"],
    "de": ["{}", "ein Foto: {}", "ein Bild: {}"],
    "hi": ["{}", "तस्वीर: {}", "चित्र: {}"],
}


@dataclass
class EvalData:
    """Images once, and per language the captions with the index of their image."""

    images: list[Any]  # paths or PIL images
    texts: dict[str, list[str]] = field(default_factory=dict)
    text_to_image: dict[str, list[int]] = field(default_factory=dict)
    labels: dict[str, list[int | None]] = field(default_factory=dict)  # per task, per image
    classes: dict[str, list[str]] = field(default_factory=dict)  # per task: class keys


def world_eval_data(
    world_dir: str | Path,
    languages: Sequence[str],
    split: str = "test",
    max_captions: int | None = None,
) -> EvalData:
    """Gold captions of a world split; shape/colour labels of single-object scenes."""
    from babelcap.world.load import load_gold, load_scenes

    world_dir = Path(world_dir)
    paths: list[str] = []
    index: dict[str, int] = {}
    data = EvalData(images=[])
    for lang in languages:
        texts, t2i = [], []
        for row in load_gold(world_dir, lang, split):
            if row["image_path"] not in index:
                index[row["image_path"]] = len(paths)
                paths.append(row["image_path"])
            for text in row["captions"][:max_captions]:
                texts.append(text)
                t2i.append(index[row["image_path"]])
        data.texts[lang], data.text_to_image[lang] = texts, t2i
    data.images = [world_dir / p for p in paths]
    scenes = {r["image_path"]: r["scene"] for r in load_scenes(world_dir, split)}
    from babelcap.world.scene import COLOURS, SHAPES

    data.classes = {"shape": list(SHAPES), "colour": list(COLOURS)}
    for task, keys in data.classes.items():
        labels: list[int | None] = []
        for p in paths:
            objs = scenes[p].objects if p in scenes else ()
            value = getattr(objs[0], task) if len(objs) == 1 else None
            labels.append(keys.index(value) if value in keys else None)
        data.labels[task] = labels
    return data


def shard_eval_data(
    specs: str | Sequence[str],
    languages: Sequence[str],
    origins: Sequence[str] | None = ("gold",),
    split: str | None = None,
    max_images: int | None = None,
) -> EvalData:
    """Eval data from shards: images with bytes, captions of the given languages/origins."""
    import pyarrow.dataset as ds

    from babelcap.core.shards import find_shards

    shards = find_shards(specs)
    data = EvalData(
        images=[],
        texts={lang: [] for lang in languages},
        text_to_image={lang: [] for lang in languages},
    )
    dataset = ds.dataset(list(shards.files), format="parquet", filesystem=shards.filesystem)
    for batch in dataset.to_batches(columns=["image", "split", "captions"]):
        for row in batch.to_pylist():
            if split is not None and row["split"] != split:
                continue
            if max_images is not None and len(data.images) >= max_images:
                break
            caps = [
                c
                for c in row["captions"] or []
                if c["language"] in languages and (origins is None or c["origin"] in origins)
            ]
            if not caps or not (row["image"] or {}).get("bytes"):
                continue
            i = len(data.images)
            data.images.append(decode_rgb(row["image"]["bytes"]))
            for c in caps:
                data.texts[c["language"]].append(c["text"])
                data.text_to_image[c["language"]].append(i)
    return data


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
    bundle: ClipBundle,
    image_features: torch.Tensor,
    lang: str,
    task: str,
    class_keys: Sequence[str],
    labels: Sequence[int | None],
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> float | None:
    """Accuracy of classifying images by translated class names averaged over prompts."""
    from babelcap.world.grammar import class_names

    names = class_names(lang)[task]
    templates = (prompts or PROMPTS).get(lang, ["{}"])
    keep = [i for i, y in enumerate(labels) if y is not None]
    if not keep:
        return None
    weights = []
    for key in class_keys:
        emb = encode_texts(bundle, [t.format(names[key]) for t in templates])
        weights.append(F.normalize(emb.mean(0), dim=-1))
    classifier = torch.stack(weights)  # classes x dim
    pred = (image_features[keep] @ classifier.T).argmax(1)
    truth = torch.tensor([labels[i] for i in keep])
    return 100.0 * float((pred == truth).float().mean())


def evaluate(
    bundle: ClipBundle, data: EvalData, name: str = "model", zero_shot: bool = True
) -> dict[str, Any]:
    """Retrieval (and zero-shot) per language; returns a JSON-able dict."""
    image_features = encode_images(bundle, data.images)
    result: dict[str, Any] = {"model": name, "images": len(data.images), "languages": {}}
    for lang, texts in data.texts.items():
        if not texts:
            continue
        text_features = encode_texts(bundle, texts)
        metrics = retrieval_metrics(image_features, text_features, data.text_to_image[lang])
        metrics["captions"] = len(texts)
        if zero_shot and data.labels:
            for task, keys in data.classes.items():
                acc = zero_shot_accuracy(
                    bundle, image_features, lang, task, keys, data.labels[task]
                )
                if acc is not None:
                    metrics[f"zs_{task}"] = acc
        result["languages"][lang] = metrics
    return result


# ----------------------------------------------------------------------------- reports

_COLUMNS = (
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "mean_recall",
    "zs_shape",
    "zs_colour",
)


def to_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One table for one or more models (model -> evaluate() result), rows = language x model."""
    models = list(results)
    cols = [
        c
        for c in _COLUMNS
        if any(c in m for r in results.values() for m in r["languages"].values())
    ]
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

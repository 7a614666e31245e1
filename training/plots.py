"""Figures: the training curve, per-language evaluation bars and the continual accuracy matrix
(matplotlib, headless)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Loss (and learning rate) against step from the trainer's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], label="learning rate", color="tab:orange", alpha=0.6)
    ax2.set_ylabel("learning rate")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_language_bars(
    results: Mapping[str, Mapping[str, Any]],
    out_png: str | Path,
    metric: str = "mean_recall",
    errors: Mapping[str, Mapping[str, float]] | None = None,
    languages: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Grouped bars: one group per language, one bar per model (results: model -> eval JSON).

    `errors` (model -> language -> std) draws error bars; `languages` fixes the group order.
    """
    plt = _pyplot()
    models = list(results)
    # Languages in the order the results list them (evaluation order: English first).
    languages = languages or list(
        dict.fromkeys(lang for r in results.values() for lang in r["languages"])
    )
    width = 0.8 / max(1, len(models))
    many = len(models) > 4
    fig, ax = plt.subplots(figsize=(1.2 + (0.25 * len(models) + 0.6) * len(languages), 4.2))
    for i, model in enumerate(models):
        vals = [results[model]["languages"].get(lang, {}).get(metric, 0.0) for lang in languages]
        err = [errors[model].get(lang, 0.0) for lang in languages] if errors else None
        xs = [j + i * width for j in range(len(languages))]
        ax.bar(xs, vals, width, yerr=err, capsize=2 if err else 0, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(languages))])
    ax.set_xticklabels(languages)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 100)
    if many:  # a long legend goes beside the plot, not over the bars
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    ax.set_title(title or f"{metric.replace('_', ' ')} per language")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_accuracy_matrix(
    acc: Sequence[Sequence[float]],
    stages: Sequence[str],
    languages: Sequence[str],
    path: str | Path,
    title: str = "mean recall after each stage",
) -> Path:
    """Heatmap of a continual run's accuracy matrix (stages x languages), values written in."""
    import numpy as np

    plt = _pyplot()
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

"""Figures: the training curve and per-language evaluation bars (matplotlib, headless)."""

from __future__ import annotations

import json
from collections.abc import Mapping
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

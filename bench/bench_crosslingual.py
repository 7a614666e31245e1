"""Cross-lingual methods on the world: per-language adapters vs one shared LoRA, and continual
language learning (plain vs TEIR).

    .venv/bin/python bench/bench_crosslingual.py [--quick] [--world DIR] [--shards DIR]

Trains on the world's shards (gold captions linked to their English source, or augmented shards
with --shards) and evaluates on the world's test split:

A. alignment + per-language adapters (LoRA r=1 on query/value/token embeddings) against the
   same alignment with ONE shared LoRA of the same size: mean recall per language, the spread
   between languages (max - min, std), adapter size as % of the model;
B. continual learning over pt, es, de, hi (only token embeddings train), plain vs TEIR:
   AA, F, F_en and the accuracy matrices (target with TEIR: F <= 3 points).

Writes bench/results/crosslingual.json and .md (and prints the Markdown).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LANGS = ["pt", "es", "de", "hi"]


def prepare(world: Path, shards: Path | None, out: Path) -> tuple[Path, list[str]]:
    """Base CLIP of a built world (built when missing) and training shards with image
    embeddings."""
    from babelcap.models.clip import load_clip
    from babelcap.training.embeddings import embed_shards
    from babelcap.world.models import build_models, model_dir
    from babelcap.world.shards import write_world_shards

    build_models(world, only=["clip-base"])
    base = model_dir(world, "clip-base")
    if shards is None:
        raw = write_world_shards(world, out / "shards-raw", ["en", *LANGS], split="train")
        shards_dir = out / "shards"
        embed_shards(load_clip(str(base)), raw, shards_dir)
        files = sorted(str(p) for p in shards_dir.glob("*.parquet"))
    else:
        files = [str(shards)]
    return base, files


def run_adapters(
    base: Path,
    files: list[str],
    world: Path,
    out: Path,
    steps: int,
    origins: list[str] | None,
    batch: int,
) -> dict:
    from babelcap.models.clip import load_clip
    from babelcap.training import adapters as ad
    from babelcap.training.config import TrainConfig
    from babelcap.training.contamination import load_run_index
    from babelcap.training.eval_data import load_eval_data
    from babelcap.training.runs import run

    data = load_eval_data(f"world:{world}", ["en", *LANGS], "test")
    results: dict = {}
    base_eval = ad.evaluate_with_adapters(load_clip(str(base)), data, "base", zero_shot=False)
    results["base"] = {lang: m["mean_recall"] for lang, m in base_eval["languages"].items()}
    # LoRA r=1 on query/value and on the token embeddings (a new language needs its words):
    # ~0.17% of the world CLIP per adapter.
    adapter = {
        "kind": "lora",
        "r": 1,
        "alpha": 1,
        "target_modules": ["query", "value", "word_embeddings"],
    }
    for mode in ("per_language", "shared"):
        cfg = TrainConfig.from_dict(
            {
                "model": {"name": str(base)},
                "data": {
                    "train": files,
                    "languages": LANGS,
                    "origins": origins,
                    "batch_size": batch,
                    "shuffle_buffer": 1024,
                },
                "method": {
                    "name": "alignment",
                    "options": {
                        "adapters": mode,
                        "adapter": adapter,
                        "pairing": "native-en"
                        if origins is None or "gold" in origins
                        else "native-mt",
                    },
                },
                # Same optimizer steps for both; per-language adapters each see 1/4 of them.
                "optim": {"lr": 1e-2, "warmup_steps": 10, "max_steps": steps, "weight_decay": 0.0},
                "run": {
                    "output_dir": str(out / f"adapters-{mode}-{steps}x{batch}"),
                    "seed": 0,
                    "progress": False,
                    "plot": False,
                    "resume": False,
                    "grad_checkpointing": False,
                },
            }
        )
        start = time.perf_counter()
        summary = run(cfg)
        seconds = time.perf_counter() - start
        bundle = load_clip(str(base))
        ad.load_language_adapters(bundle.model, summary["adapter"])
        res = ad.evaluate_with_adapters(
            bundle,
            data,
            mode,
            zero_shot=False,
            training_images=load_run_index(summary["adapter"]),
        )
        recall = {lang: m["mean_recall"] for lang, m in res["languages"].items()}
        name = ad.language_adapters(bundle.model)[0]
        results[mode] = {
            "mean_recall": recall,
            "spread": ad.spread({lang: recall[lang] for lang in LANGS}),
            "adapters": len(ad.language_adapters(bundle.model)),
            "adapter_size": ad.adapter_size(bundle.model, name),
            "train_seconds": round(seconds, 1),
            "steps": steps,
        }
    results["base_spread"] = ad.spread({lang: results["base"][lang] for lang in LANGS})
    return results


def run_continual(
    base: Path,
    files: list[str],
    world: Path,
    out: Path,
    steps: int,
    origins: list[str] | None,
    batch: int,
) -> dict:
    from babelcap.training.config import TrainConfig
    from babelcap.training.runs import run

    results = {}
    for teir in (False, True):
        name = "teir" if teir else "plain"
        cfg = TrainConfig.from_dict(
            {
                "model": {"name": str(base)},
                "data": {
                    "train": files,
                    "languages": LANGS,
                    "origins": origins or ["gold"],
                    "batch_size": batch,
                    "shuffle_buffer": 1024,
                },
                "method": {
                    "name": "continual",
                    "options": {"teir": teir, "vocab_size": 400, "eval_data": f"world:{world}"},
                },
                "optim": {"lr": 2e-3, "warmup_steps": 10, "max_steps": steps, "weight_decay": 0.1},
                # resume: stages already trained with these settings are reused (evaluated again)
                "run": {
                    "output_dir": str(out / f"continual-{name}-{steps}x{batch}"),
                    "seed": 0,
                    "progress": False,
                    "plot": False,
                    "resume": True,
                    "grad_checkpointing": False,
                },
            }
        )
        start = time.perf_counter()
        res = run(cfg)
        results[name] = {
            k: res[k]
            for k in ("AA", "F", "F_en", "per_stage", "matrix", "vocab_size", "heatmap", "csv")
        }
        results[name]["new_tokens"] = {s["language"]: s["new_tokens"] for s in res["stages"]}
        results[name]["train_seconds"] = round(time.perf_counter() - start, 1)
        results[name]["steps_per_language"] = steps
    return results


def markdown(res: dict) -> str:
    a, c = res["adapters"], res["continual"]
    cols = ["en", *LANGS]
    lines = [
        "### Per-language adapters vs one shared LoRA (mean recall, world test split)",
        "",
        "| model | " + " | ".join(cols) + " | max-min | std | adapter size |",
        "|---|" + "---:|" * (len(cols) + 3),
    ]
    rows = [("base CLIP", a["base"], a["base_spread"], "")]
    for mode, label in (("shared", "shared LoRA"), ("per_language", "per-language LoRA")):
        size = a[mode]["adapter_size"]
        rows.append(
            (
                label,
                a[mode]["mean_recall"],
                a[mode]["spread"],
                f"{a[mode]['adapters']} x {size['parameters']} ({size['percent']:.3f}%)",
            )
        )
    for label, recall, spread, size in rows:
        cells = [f"{recall[lang]:.1f}" for lang in cols]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {spread['max_min']:.1f} | {spread['std']:.1f} | {size} |"
        )
    lines += [
        "",
        "### Continual language learning pt -> es -> de -> hi (token embeddings only)",
        "",
        "| variant | AA | F | F_en | new tokens | final vocab |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("plain", "teir"):
        r = c[name]
        lines.append(
            f"| {name} | {r['AA']:.1f} | {r['F']:.1f} | {r['F_en']:.1f} | "
            f"{sum(r['new_tokens'].values())} | {r['vocab_size']} |"
        )
    for name in ("plain", "teir"):
        m = c[name]["matrix"]
        lines += [
            "",
            f"Accuracy matrix ({name}, mean recall; rows: after stage):",
            "",
            "| stage | " + " | ".join(m["languages"]) + " |",
            "|---|" + "---:|" * len(m["languages"]),
        ]
        for stage, row in zip(m["stages"], m["mean_recall"], strict=True):
            lines.append(f"| {stage} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small world, few steps")
    parser.add_argument("--world", type=Path, default=None, help="a built world to use")
    parser.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="augmented shards (default: gold shards written from the world)",
    )
    parser.add_argument("--adapter-steps", type=int, default=None, help="override the steps")
    parser.add_argument(
        "--continual-steps", type=int, default=None, help="override the steps per language"
    )
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-crosslingual")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.manual_seed(0)
    n_images = 400 if args.quick else 1000
    adapter_steps = 100 if args.quick else 400
    continual_steps = 50 if args.quick else 150
    batch = 32 if args.quick else 64
    adapter_steps = args.adapter_steps or adapter_steps
    continual_steps = args.continual_steps or continual_steps
    out = args.out / ("quick" if args.quick else "full")
    from babelcap.world.build import TEST_WORLD, ensure_world

    if args.world:  # a built world, used as it is
        world = args.world
    elif args.quick:  # the tests' world (400 images)
        world = ensure_world(REPO / ".cache" / "test-world", progress=False, **TEST_WORLD)
    else:
        world = ensure_world(
            args.out / f"world-{n_images}", n_images=n_images, seed=11, progress=False
        )
    start = time.perf_counter()
    base, files = prepare(world, args.shards, out)
    origins = ["translated"] if args.shards else None
    res = {
        "quick": args.quick,
        "batch_size": batch,
        "world": str(world),
        "shards": "augmented" if args.shards else "world gold (linked to English)",
        "adapters": run_adapters(base, files, world, out, adapter_steps, origins, batch),
        "continual": run_continual(base, files, world, out, continual_steps, origins, batch),
    }
    res["seconds"] = round(time.perf_counter() - start, 1)
    res["targets"] = {
        "per_language_cuts_spread": res["adapters"]["per_language"]["spread"]["std"]
        < res["adapters"]["shared"]["spread"]["std"],
        "adapter_size_le_0.2pct": res["adapters"]["per_language"]["adapter_size"]["percent"] <= 0.2,
        "teir_F_le_3": res["continual"]["teir"]["F"] <= 3.0,
    }
    res["title"] = "Cross-lingual methods on the world"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "crosslingual.json").write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    (args.results / "crosslingual.md").write_text(md)
    print(md)
    print(json.dumps(res["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

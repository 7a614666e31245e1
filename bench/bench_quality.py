"""Quality benchmark on the world: what each part of the CAPIVARA recipe buys, over seeds.

On one world, with the world's models, every recipe trains LiT + LoRA (configs/) for Portuguese
with English captions mixed in, and is evaluated on the world's test split (gold captions):

- base: the English-only world CLIP, untrained;
- alt-text only: the source English alt-text translated (no captioner);
- CAPIVARA, no filter: + synthetic captions from the captioner, all translated;
- CAPIVARA, CLIP threshold: English captions scoring >= the median score are kept;
- CAPIVARA, CLIP top-k: the k best English captions per image are kept;
- oracle: the same recipe on the gold Portuguese captions.

    python bench/bench_quality.py [--world DIR] [--seeds 0,1,2] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results

REPO = Path(__file__).resolve().parents[1]


def augment(
    world: Path,
    out: Path,
    *,
    captioner: bool,
    threshold: float | None = None,
    top_k: int | None = None,
    num_captions: int = 5,
    workers: int = 2,
) -> Path:
    from pipelines.options import AugmentConfig, CaptionerConfig, ClipConfig, TranslatorConfig
    from pipelines.publish import read_manifest
    from pipelines.runner import run
    from world.models import model_dir

    config = AugmentConfig(
        input=str(world / "manifest.jsonl"),
        output=str(out),
        languages=("pt",),
        captioner=CaptionerConfig(
            model=str(model_dir(world, "captioner")), num_captions=num_captions
        )
        if captioner
        else None,
        translator=TranslatorConfig(model=str(model_dir(world, "m2m-multi") / "ct2")),
        clip=ClipConfig(
            model=str(model_dir(world, "clip-base")),
            score_threshold=threshold,
            top_k=top_k,
            embed_images=True,
        ),
    )
    try:
        if read_manifest(str(out)).get("config") == json.loads(json.dumps(config.to_dict())):
            return out / "shards"
    except FileNotFoundError:
        pass
    run(config, workers=workers, echo=False)
    return out / "shards"


def median_english_score(shards: Path) -> float:
    import pyarrow.dataset as ds

    scores = [
        c["score"]
        for row in ds.dataset(str(shards))
        .to_table(columns=["captions"])
        .column("captions")
        .to_pylist()
        for c in row
        if c["language"] == "en" and c["score"] is not None
    ]
    return float(statistics.median(scores))


def train_and_eval(
    world: Path, config: str, shards: Path, out: Path, seed: int, steps: int | None, data
) -> dict[str, Any]:
    from training.config import load_config
    from training.evaluate import evaluate
    from training.models import load_clip
    from training.trainer import train

    overrides = [
        f"data.train={json.dumps([str(shards)])}",
        f"run.output_dir={json.dumps(str(out))}",
        f"run.seed={seed}",
        "run.progress=false",
        "run.plot=false",
    ]
    if steps:
        overrides.append(f"optim.max_steps={steps}")
    if not (out / "export").exists():
        train(load_config(config, overrides))
    return evaluate(load_clip(str(out / "export")), data, name=out.name, zero_shot=False)


def summarise(runs: list[dict[str, Any]], languages: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lang in languages:
        for key in ("mean_recall", "t2i_r1", "i2t_r1"):
            values = [r["languages"][lang][key] for r in runs]
            out[f"{lang}_{key}"] = statistics.fmean(values)
            out[f"{lang}_{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--world",
        default=str(REPO / ".cache" / "test-world"),
        help="a built world (default: the test world)",
    )
    parser.add_argument("--out", default=str(REPO / ".cache" / "bench-quality"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="training steps (config's)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 80 steps")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        seeds, args.steps = seeds[:2], args.steps or 80

    from training.evaluate import world_eval_data
    from training.world_shards import write_world_shards
    from world.models import build_models, model_dir

    world, out = Path(args.world).resolve(), Path(args.out).resolve()
    os.environ["BABELCAP_WORLD"] = str(world)
    build_models(world, only=["captioner", "m2m-multi", "clip-base"])
    languages = ("en", "pt")
    data = world_eval_data(world, languages, split="test")

    print("[quality] augmenting (Beam) ...", flush=True)
    shards = {
        "alt-text only": augment(world, out / "aug-alt", captioner=False),
        "CAPIVARA, no filter": augment(world, out / "aug-none", captioner=True),
    }
    threshold = median_english_score(shards["CAPIVARA, no filter"])
    shards[f"CAPIVARA, CLIP score >= {threshold:.3f} (median)"] = augment(
        world, out / "aug-threshold", captioner=True, threshold=threshold
    )
    shards[f"CAPIVARA, CLIP top-{args.top_k}"] = augment(
        world, out / "aug-topk", captioner=True, top_k=args.top_k
    )
    gold = out / "gold-shards"
    if not gold.exists():
        write_world_shards(world, gold, languages=("pt", "en"), split="train")

    from training.evaluate import evaluate
    from training.models import load_clip

    base = evaluate(
        load_clip(str(model_dir(world, "clip-base"))), data, name="base", zero_shot=False
    )
    recipes: dict[str, dict[str, Any]] = {"base": summarise([base], languages)}
    capivara_cfg = str(REPO / "configs" / "world-capivara.yaml")
    plan = [(name, capivara_cfg, path) for name, path in shards.items()]
    plan.append(("oracle (gold pt)", str(REPO / "configs" / "world-oracle.yaml"), gold))
    for i, (name, config, path) in enumerate(plan):
        runs = []
        for seed in seeds:
            print(f"[quality] {name}, seed {seed} ...", flush=True)
            run_dir = out / "runs" / f"r{i}-s{seed}-{args.steps or 'cfg'}"
            runs.append(train_and_eval(world, config, path, run_dir, seed, args.steps, data))
        recipes[name] = summarise(runs, languages)

    oracle = recipes["oracle (gold pt)"]["pt_mean_recall"]
    base_en = recipes["base"]["en_mean_recall"]
    lines = [
        f"World `{world.name}` ({len(data.images)} test images), seeds {seeds}, "
        f"{args.steps or 'config'} steps; mean ± std over seeds. `% oracle`: Portuguese mean "
        "recall as a share of the oracle's.",
        "",
        "| recipe | pt mean recall | pt R@1 t2i | pt R@1 i2t | % oracle | en mean recall | "
        "en change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in recipes.items():
        lines.append(
            f"| {name} | {r['pt_mean_recall']:.1f} ± {r['pt_mean_recall_std']:.1f} | "
            f"{r['pt_t2i_r1']:.1f} | {r['pt_i2t_r1']:.1f} | "
            f"{100 * r['pt_mean_recall'] / oracle:.0f}% | "
            f"{r['en_mean_recall']:.1f} ± {r['en_mean_recall_std']:.1f} | "
            f"{r['en_mean_recall'] - base_en:+.1f} |"
        )
    lines += [
        "",
        "Targets: CAPIVARA >= 90% of the oracle's Portuguese mean recall; English "
        "mean recall drops <= 2 points.",
    ]
    write_results(
        "quality",
        "Quality on the world: what each part of the recipe buys",
        {"seeds": seeds, "steps": args.steps, "threshold": threshold, "recipes": recipes},
        "\n".join(lines),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

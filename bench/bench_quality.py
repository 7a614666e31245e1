"""Quality benchmark on the world: what each part of the recipe buys, over seeds.

On one world, with the world's models, the Beam pipeline augments the world's manifest (every
split, each row labelled with its split; targets pt, es, de, hi) in four settings; every recipe
trains from the English-only world CLIP on the train rows only (the trainer's `data.splits`
default) and is evaluated on the world's test split (gold captions, every world language), after
the evaluation has checked that no test image is among the images the run recorded it trained
on (by id and perceptual hash; an overlap stops the benchmark):

- base: the English-only world CLIP, untrained;
- alt-text only: the source English alt-text translated (no captioner). The world's alt-text
  is noisy like a crawl's (half of it generic or another picture's);
- CAPIVARA, no filter: + synthetic captions from the captioner, all translated;
- CAPIVARA, CLIP threshold: synthetic captions scoring >= the median score are kept;
- CAPIVARA, CLIP top-k: the k best synthetic captions per image are kept;
- oracle: the same LiT + LoRA recipe on the gold Portuguese captions;
- alignment + per-language adapters (PECTVLM-style) on the top-k shards, all four languages;
- continual learning with TEIR (CLL-CLIP) pt -> es -> de -> hi on the top-k shards;
- translation scores and filters (issue 18), side by side, with the world's translator and
  with its deliberately weak one (`m2m-weak`: same architecture, trained far less): alt-text
  only and CAPIVARA top-k, each without filters, with the source alt-text CLIP filter, and with
  the source filter plus the translation-score filter (`min_translation_score`; round trips
  through the world's reverse model `m2m-to-en`).

The CAPIVARA rows and the oracle train Portuguese (English captions mixed in); the last two
train all four languages. Writes bench/results/quality.json (+ quality.png, the chart).

    python bench/bench_quality.py [--world DIR] [--seeds 0,1,2] [--quick] [--rows REGEX]
        [--limit N] [--min-translation-score S] [--translation-top-k K]
        (smoke: --quick --seeds 0 --limit 80 --rows "filters")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babelcap.core.lists import parse_list

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_results

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("pt", "es", "de", "hi")
LANGUAGES = ("en", *TARGETS)
CONFIGS = REPO / "configs"
# Training steps: the configs' own, or these with --quick.
QUICK_STEPS = {"capivara": 80, "alignment": 200, "continual": 50}


@dataclass
class Recipe:
    name: str
    config: Path
    shards: Path
    method: str  # capivara | alignment | continual (how the result is evaluated)


def augment(
    world: Path,
    out: Path,
    *,
    captioner: bool,
    threshold: float | None = None,
    top_k: int | None = None,
    num_captions: int = 5,
    workers: int = 2,
    translator: str = "m2m-multi",
    source_filter: bool = False,
    source_min_score: float | None = None,
    min_translation_score: float | None = None,
    translation_top_k: int | None = None,
    manifest: Path | None = None,
) -> Path:
    """Beam augmentation of the world's manifest (cached by configuration). The source alt-text
    filter is off unless asked for, so the rows before issue 18 measure what they did."""
    from babelcap.pipelines.options import (
        AugmentConfig,
        CaptionerConfig,
        ClipConfig,
        TextFilterConfig,
        TranslationStageConfig,
    )
    from babelcap.pipelines.runner import published_run, run
    from babelcap.world.models import model_dir

    config = AugmentConfig(
        input=str(manifest or world / "manifest.jsonl"),
        output=str(out),
        languages=TARGETS,
        captioner=CaptionerConfig(
            model=str(model_dir(world, "captioner")), num_captions=num_captions
        )
        if captioner
        else None,
        translator=TranslationStageConfig(
            model=str(model_dir(world, translator) / "ct2"),
            reverse_model=str(model_dir(world, "m2m-to-en") / "ct2"),
        ),
        clip=ClipConfig(
            model=str(model_dir(world, "clip-base")),
            score_threshold=threshold,
            top_k=top_k,
            embed_images=True,
            source_filter=source_filter,
            source_min_score=source_min_score,
        ),
        text=TextFilterConfig(
            min_translation_score=min_translation_score, translation_top_k=translation_top_k
        ),
    )
    if published_run(config) is None:
        run(config, workers=workers, echo=False)
    return out  # the trainer reads an output folder (its shards, wherever they are)


def median_score(output: Path, origin: str = "synthetic") -> float:
    """Median CLIP score of the captions of `origin` in an augment output."""
    import pyarrow.parquet as pq

    from babelcap.core.shards import find_shards

    found = find_shards(output)
    scores = [
        c["score"]
        for f in found.files
        for row in pq.read_table(f, columns=["captions"], filesystem=found.filesystem)
        .column("captions")
        .to_pylist()
        for c in row
        if c["origin"] == origin and c["score"] is not None
    ]
    return float(statistics.median(scores))


def filter_rows(
    world: Path,
    out: Path,
    top_k: int,
    min_translation_score: float,
    manifest: Path | None,
    translation_top_k: int | None = None,
) -> dict[str, Path]:
    """Issue 18's rows: {alt-text only, CAPIVARA top-k} x {no filter, source filter, source +
    translation-score filter} x {the world's translator, its weak one}. Alt-text only has no
    synthetic captions to compare with, so its source filter is an absolute threshold: the
    median CLIP score of the alt-text (half of the world's alt-text is noise)."""
    rows: dict[str, Path] = {}
    for name, tr in (("", "m2m-multi"), (" [weak translator]", "m2m-weak")):
        # Unfiltered runs with the good translator are the older rows' own (same folders).
        suffix = "" if tr == "m2m-multi" else f"-{tr}"
        alt = augment(
            world, out / f"aug-alt{suffix}", captioner=False, translator=tr, manifest=manifest
        )
        cut = median_score(alt, "source")
        for base, kw in (
            ("alt-text only", {"captioner": False, "source_min_score": cut}),
            (f"CAPIVARA, CLIP top-{top_k}", {"captioner": True, "top_k": top_k}),
        ):
            tag = "alt" if base.startswith("alt") else "topk"
            none = {k: v for k, v in kw.items() if k != "source_min_score"}
            rows[f"{base}{name}, no filter"] = augment(
                world, out / f"aug-{tag}{suffix}", translator=tr, manifest=manifest, **none
            )
            # (row label, folder, filter settings) next to the source filter
            variants = [
                ("source filter", "src", {}),
                (
                    f"source + score >= {min_translation_score}",
                    f"src-score{min_translation_score:g}",
                    {"min_translation_score": min_translation_score},
                ),
            ]
            if translation_top_k:  # the best k translations per image and language instead
                variants.append(
                    (
                        f"source + best {translation_top_k} translations",
                        f"src-top{translation_top_k}",
                        {"translation_top_k": translation_top_k},
                    )
                )
            for label, folder, extra in variants:
                rows[f"{base}{name}, {label}"] = augment(
                    world,
                    out / f"aug-{tag}-{tr}-{folder}",
                    translator=tr,
                    source_filter=True,
                    manifest=manifest,
                    **kw,
                    **extra,
                )
    return rows


def train_and_eval(
    recipe: Recipe, out: Path, seed: int, steps: int | None, base: Path, data, world: Path
) -> dict[str, Any]:
    """Train one recipe for one seed (skipped when its output is there); evaluate it."""
    from babelcap.models.clip import load_clip
    from babelcap.training import adapters as per_language
    from babelcap.training.config import load_config
    from babelcap.training.contamination import load_run_index
    from babelcap.training.evaluate import evaluate
    from babelcap.training.runs import run

    overrides = [
        f"data.train={json.dumps([str(recipe.shards)])}",
        f"run.output_dir={json.dumps(str(out))}",
        f"run.seed={seed}",
        "run.progress=false",
        "run.plot=false",
    ]
    if steps:
        overrides.append(f"optim.max_steps={steps}")
    if recipe.method == "continual":
        overrides.append("run.resume=true")  # stages trained with these settings are reused
    cfg = load_config(str(recipe.config), overrides, variables={"BABELCAP_WORLD": str(world)})
    done = out / "summary.json"
    if recipe.method == "continual":
        summary = run(cfg)
        return evaluate(load_clip(str(Path(summary["export"]).parent)), data, zero_shot=False)
    if not done.exists():
        run(cfg)
    if recipe.method == "alignment":
        bundle = load_clip(str(base))
        per_language.load_language_adapters(bundle.model, str(out / "adapter"))
        return per_language.evaluate_with_adapters(
            bundle, data, zero_shot=False, training_images=load_run_index(out / "adapter")
        )
    return evaluate(load_clip(str(out / "export")), data, zero_shot=False)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of each language's mean recall and R@1 both ways."""
    out: dict[str, Any] = {"seeds": len(runs)}
    for lang in LANGUAGES:
        for key in ("mean_recall", "t2i_r1", "i2t_r1"):
            values = [r["languages"][lang][key] for r in runs]
            out[f"{lang}_{key}"] = statistics.fmean(values)
            out[f"{lang}_{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    targets = [out[f"{lang}_mean_recall"] for lang in TARGETS]
    out["target_spread"] = max(targets) - min(targets)
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def markdown(
    recipes: dict[str, dict[str, Any]], world: Path, n_test: int, seeds: list[int], steps: str
) -> str:
    oracle = recipes["oracle (gold pt)"]["pt_mean_recall"]
    base = recipes["base"]
    lines = [
        f"World `{_shown(world)}` ({n_test} test images, gold captions in 5 languages), seeds "
        f"{seeds}, steps {steps}; mean ± std over seeds. `% oracle`: Portuguese mean recall as "
        "a share of the oracle's. R@1 in both directions (text -> image, image -> text).",
        "",
        "| recipe | pt mean recall | pt R@1 t2i | pt R@1 i2t | % oracle | en mean recall | "
        "en R@1 t2i | en R@1 i2t | en change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in recipes.items():
        lines.append(
            f"| {name} | {r['pt_mean_recall']:.1f} ± {r['pt_mean_recall_std']:.1f} | "
            f"{r['pt_t2i_r1']:.1f} | {r['pt_i2t_r1']:.1f} | "
            f"{100 * r['pt_mean_recall'] / oracle:.0f}% | "
            f"{r['en_mean_recall']:.1f} ± {r['en_mean_recall_std']:.1f} | "
            f"{r['en_t2i_r1']:.1f} | {r['en_i2t_r1']:.1f} | "
            f"{r['en_mean_recall'] - base['en_mean_recall']:+.1f} |"
        )
    lines += [
        "",
        "Mean recall in every world language (the CAPIVARA rows and the oracle train pt only; "
        "the last two train pt, es, de, hi); spread: max - min over pt, es, de, hi.",
        "",
        "| recipe | " + " | ".join(LANGUAGES) + " | spread |",
        "|---|" + "---:|" * (len(LANGUAGES) + 1),
    ]
    for name, r in recipes.items():
        cells = [
            f"{r[f'{lang}_mean_recall']:.1f} ± {r[f'{lang}_mean_recall_std']:.1f}"
            for lang in LANGUAGES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['target_spread']:.1f} |")
    lines += [
        "",
        "Targets: CAPIVARA >= 90% of the oracle's Portuguese mean recall; English mean recall "
        "drops <= 2 points. Chart: `bench/results/quality.png`.",
    ]
    return "\n".join(lines)


def plot(recipes: dict[str, dict[str, Any]], out_png: Path) -> Path:
    from babelcap.training.plots import plot_language_bars

    results = {
        name: {"languages": {lang: {"mean_recall": r[f"{lang}_mean_recall"]} for lang in LANGUAGES}}
        for name, r in recipes.items()
    }
    errors = {
        name: {lang: r[f"{lang}_mean_recall_std"] for lang in LANGUAGES}
        for name, r in recipes.items()
    }
    return plot_language_bars(
        results,
        out_png,
        errors=errors,
        languages=list(LANGUAGES),
        title="mean recall on the world test split (mean ± std over seeds)",
    )


def filter_targets(
    recipes: dict[str, dict[str, Any]], oracle: float, base_en: float
) -> dict[str, Any]:
    """Issue 18's targets: CAPIVARA top-k with the filters >= 95% of the oracle with English
    down <= 1 point; with the weak translator, the filters recover >= half of the gap between
    the weak and the good translator (per base recipe, no filter vs filtered)."""
    out: dict[str, Any] = {}
    for name, r in recipes.items():
        if name.startswith("filters: CAPIVARA") and "weak" not in name and "source" in name:
            pct = 100 * r["pt_mean_recall"] / oracle
            change = r["en_mean_recall"] - base_en
            out[name] = {
                "pct_oracle_pt": pct,
                "en_change": change,
                "met": pct >= 95 and change >= -1.0,
            }
    for name, weak in recipes.items():
        if not (name.startswith("filters: ") and "[weak translator]" in name):
            continue
        if "no filter" in name:
            continue
        base = name.split("[weak translator]")[0].strip()
        good = recipes.get(f"{base}, no filter")
        weak_none = recipes.get(f"{base} [weak translator], no filter")
        if not good or not weak_none:
            continue
        gap = good["pt_mean_recall"] - weak_none["pt_mean_recall"]
        gained = weak["pt_mean_recall"] - weak_none["pt_mean_recall"]
        out[name] = {
            "gap": gap,
            "recovered": gained / gap if gap > 0 else None,
            "met": gap > 0 and gained >= 0.5 * gap,
        }
    return out


def default_world(quick: bool) -> Path:
    """The tests' world (quick) or the demo's 1000-image world (built here when missing)."""
    if quick:
        return REPO / ".cache" / "test-world"
    from babelcap.demo import DemoConfig, build_world_step

    cfg = DemoConfig()
    world = REPO / cfg.out / "world"
    build_world_step(cfg, world)
    return world


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default=None, help="a built world (default: the demo's)")
    parser.add_argument("--out", default=str(REPO / ".cache" / "bench-quality"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="the tests' world, 2 seeds, fewer steps"
    )
    parser.add_argument(
        "--rows", default=None, help="only recipes whose name matches this regex (+ oracle)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="augment only the first N manifest rows (smoke)"
    )
    parser.add_argument(
        "--min-translation-score",
        type=float,
        default=0.6,
        help="the translation-score filter of the issue-18 rows",
    )
    parser.add_argument(
        "--translation-top-k",
        type=int,
        default=None,
        help="also the issue-18 rows with the source filter + the best k translations per "
        "image and language (translation_top_k) instead of the threshold",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in parse_list(args.seeds)]
    if args.quick:
        seeds = seeds[:2]

    from babelcap.models.clip import load_clip
    from babelcap.training.eval_data import load_eval_data
    from babelcap.training.evaluate import evaluate
    from babelcap.world.models import STAMP, build_models, model_dir
    from babelcap.world.shards import write_world_shards

    world = Path(args.world).resolve() if args.world else default_world(args.quick)
    models = ["captioner", "m2m-multi", "m2m-weak", "m2m-to-en", "clip-base"]
    build_models(world, only=models)
    # Runs are reused only for the same world and models (their build stamps).
    stamps = [world / "world.json", *(model_dir(world, m) / STAMP for m in models)]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in stamps)).hexdigest()[:10]
    out = Path(args.out).resolve() / f"{world.name}-{key}"
    data = load_eval_data(f"world:{world}", LANGUAGES, split="test")

    manifest = None
    if args.limit:  # a smoke run: the first N rows of the manifest, image paths made absolute
        out = out / f"limit{args.limit}"
        out.mkdir(parents=True, exist_ok=True)
        manifest = out / "manifest.jsonl"
        lines = (world / "manifest.jsonl").read_text().splitlines()[: args.limit]
        rows = [json.loads(x) for x in lines]
        manifest.write_text(
            "".join(
                json.dumps({**r, "image_path": str(world / r["image_path"])}) + "\n" for r in rows
            )
        )
    wanted = re.compile(args.rows) if args.rows else None

    def want(name: str) -> bool:
        return wanted is None or bool(wanted.search(name))

    print("[quality] augmenting (Beam) ...", flush=True)
    shards: dict[str, Path] = {}
    top_k = f"CAPIVARA, CLIP top-{args.top_k}"
    if wanted is None or not args.rows.startswith("filter"):
        shards["alt-text only"] = augment(
            world, out / "aug-alt", captioner=False, manifest=manifest
        )
        shards["CAPIVARA, no filter"] = augment(
            world, out / "aug-none", captioner=True, manifest=manifest
        )
        threshold = median_score(shards["CAPIVARA, no filter"])
        shards[f"CAPIVARA, CLIP score >= {threshold:.3f} (median)"] = augment(
            world, out / "aug-threshold", captioner=True, threshold=threshold, manifest=manifest
        )
        shards[top_k] = augment(
            world, out / "aug-topk", captioner=True, top_k=args.top_k, manifest=manifest
        )
    else:
        threshold = None
    # Issue 18's rows ("--rows filters" selects only them).
    filtered = {
        f"filters: {name}": path
        for name, path in filter_rows(
            world, out, args.top_k, args.min_translation_score, manifest, args.translation_top_k
        ).items()
    }
    gold = out / "gold-shards"
    if not gold.exists():
        write_world_shards(world, gold, languages=("pt", "en"), split="train")

    plan = [Recipe(n, CONFIGS / "world-capivara.yaml", p, "capivara") for n, p in shards.items()]
    plan += [Recipe("oracle (gold pt)", CONFIGS / "world-oracle.yaml", gold, "capivara")]
    if top_k in shards:
        plan += [
            Recipe(
                f"alignment + per-language adapters (top-{args.top_k} shards)",
                CONFIGS / "world-adapters.yaml",
                shards[top_k],
                "alignment",
            ),
            Recipe(
                f"continual TEIR pt>es>de>hi (top-{args.top_k} shards)",
                CONFIGS / "world-continual.yaml",
                shards[top_k],
                "continual",
            ),
        ]
    plan += [Recipe(n, CONFIGS / "world-capivara.yaml", p, "capivara") for n, p in filtered.items()]
    base_dir = model_dir(world, "clip-base")
    recipes = {"base": summarise([evaluate(load_clip(str(base_dir)), data, zero_shot=False)])}
    for recipe in plan:
        if recipe.name != "oracle (gold pt)" and not want(recipe.name):
            continue
        steps = QUICK_STEPS[recipe.method] if args.quick else None
        runs = []
        for seed in seeds:
            print(f"[quality] {recipe.name}, seed {seed} ...", flush=True)
            # Named by the recipe, never by its place in the plan (which --rows changes).
            tag = "f" + hashlib.sha256(recipe.name.encode()).hexdigest()[:8]
            run_dir = out / "runs" / f"{tag}-{recipe.method}-s{seed}-{steps or 'cfg'}"
            runs.append(train_and_eval(recipe, run_dir, seed, steps, base_dir, data, world))
        recipes[recipe.name] = summarise(runs)

    steps_note = ", ".join(f"{k} {v}" for k, v in QUICK_STEPS.items()) if args.quick else "configs'"
    partial = bool(args.rows or args.limit)  # a smoke or a subset never replaces the results
    # A subset is named by its rows (`--rows filters` -> quality-filters.json), a smoke by its size.
    subset = re.sub(r"[^a-z0-9]+", "-", (args.rows or "").lower()).strip("-")
    name = "quality" if not partial else f"quality-{subset or 'partial'}"
    if args.limit or args.quick:
        name += "-smoke"
    chart = plot(recipes, RESULTS / f"{name}.png")
    oracle = recipes["oracle (gold pt)"]["pt_mean_recall"]
    capivara = {k: v for k, v in recipes.items() if k.startswith("CAPIVARA")}
    base_en = recipes["base"]["en_mean_recall"]
    write_results(
        name,
        "Quality on the world: what each part of the recipe buys",
        {
            "world": str(world),
            "test_images": len(data.images),
            "seeds": seeds,
            "steps": QUICK_STEPS if args.quick else "configs",
            "threshold": threshold,
            "chart": str(chart.relative_to(REPO)),
            "targets": {
                name: {
                    "pct_oracle_pt": 100 * r["pt_mean_recall"] / oracle,
                    "en_change": r["en_mean_recall"] - base_en,
                    "met": r["pt_mean_recall"] >= 0.9 * oracle
                    and r["en_mean_recall"] - base_en >= -2.0,
                }
                for name, r in capivara.items()
            },
            "filter_targets": filter_targets(recipes, oracle, base_en),
            "min_translation_score": args.min_translation_score,
            "limit": args.limit,
            "recipes": recipes,
        },
        markdown(recipes, world, len(data.images), seeds, steps_note),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

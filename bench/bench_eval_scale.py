"""Evaluation at Crossmodal-3600's size: seconds and peak memory of `babelcap eval`'s work.

Generates a folder laid out as XM3600 is distributed (``captions.jsonl`` + ``images/<key>.jpg``)
with 3,600 synthetic images (small JPEGs of coloured shapes) x 36 languages x 2 captions
(259,200 captions, XM3600's ~260k), then runs, each in a fresh process so its peak RSS is its
own: (1) read the dataset, check contamination, encode the images once and each language's
captions in batches, recall per language (embedding cache empty), and (2) the same again from
the embedding cache. The model is the world's CLIP (clip-base of a built world).

    python bench/bench_eval_scale.py                      # full size (the lead's quiet machine)
    python bench/bench_eval_scale.py --images 200 --languages 4   # smoke
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

# XM3600's 36 language codes (as in its captions.jsonl)
XM3600_LANGUAGES = [
    "ar",
    "bn",
    "cs",
    "da",
    "de",
    "el",
    "en",
    "es",
    "fa",
    "fi",
    "fil",
    "fr",
    "he",
    "hi",
    "hr",
    "hu",
    "id",
    "it",
    "ja",
    "ko",
    "mi",
    "nl",
    "no",
    "pl",
    "pt",
    "quz",
    "ro",
    "ru",
    "sv",
    "sw",
    "te",
    "th",
    "tr",
    "uk",
    "vi",
    "zh",
]
WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "big",
    "circle",
    "square",
    "star",
    "left",
    "right",
    "top",
    "bottom",
    "photo",
    "of",
    "a",
    "the",
]


def generate(root: Path, n_images: int, languages: list[str], per_image: int, seed: int = 0):
    """An XM3600-layout folder (kept between runs when its parameters match)."""
    from PIL import Image, ImageDraw

    stamp = {"images": n_images, "languages": languages, "per_image": per_image, "seed": seed}
    if (root / "stamp.json").is_file() and json.loads((root / "stamp.json").read_text()) == stamp:
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    rng = random.Random(seed)
    with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_images):
            key = f"{i:016x}"
            im = Image.new("RGB", (160, 120), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(im)
            for _ in range(rng.randint(1, 3)):
                x, y, r = rng.randrange(160), rng.randrange(120), rng.randint(8, 40)
                fill = tuple(rng.randrange(256) for _ in range(3))
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            im.save(root / "images" / f"{key}.jpg", quality=85)
            row = {"image/key": key, "image/locale": "en"}
            for lang in languages:
                caps = [
                    f"{lang} {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                    for _ in range(per_image)
                ]
                row[lang] = {"caption": caps}
            f.write(json.dumps(row) + "\n")
    (root / "stamp.json").write_text(json.dumps(stamp))
    return root


def run_once(data_dir: Path, languages: list[str], model: str, cache: Path) -> dict:
    """One evaluation, timed by stage, in this (fresh) process."""
    import torch

    from babelcap.models.clip import load_clip
    from babelcap.training.eval_data import load_eval_data
    from babelcap.training.evaluate import EmbeddingCache, check_contamination, evaluate

    times = {}
    t = time.perf_counter()
    data = load_eval_data(f"xm3600:{data_dir},captions=all", languages)
    times["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    bundle = load_clip(model)
    times["model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    checked = check_contamination(bundle, data)
    times["contamination_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = evaluate(
        bundle,
        data,
        "clip-base",
        zero_shot=False,
        contamination=checked,
        cache=EmbeddingCache(cache),
    )
    times["encode_and_recall_s"] = time.perf_counter() - t
    return {
        **{k: round(v, 2) for k, v in times.items()},
        "images": len(data.images),
        "captions": sum(len(t) for t in data.texts.values()),
        "languages": len(data.texts),
        "mean_recall_average": round(result["summary"]["mean_recall"]["average"], 2)
        if result["summary"]
        else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3600)
    parser.add_argument("--languages", type=int, default=36, help="how many of XM3600's 36")
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--world", type=Path, default=None, help="a built world (its clip-base)")
    parser.add_argument("--model", default=None, help="a CLIP folder/name instead of clip-base")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-eval-scale")
    parser.add_argument(
        "--child", nargs=3, metavar=("DATA", "MODEL", "CACHE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--langs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data_dir, model, cache = args.child
        print(json.dumps(run_once(Path(data_dir), args.langs.split(","), model, Path(cache))))
        return

    from common import write_results

    model = args.model
    if model is None:
        from babelcap.world.build import TEST_WORLD, ensure_world
        from babelcap.world.models import build_models, model_dir

        world = args.world or ensure_world(
            REPO / ".cache" / "test-world", progress=False, **TEST_WORLD
        )
        build_models(world, only=["clip-base"])
        model = str(model_dir(world, "clip-base"))
    languages = XM3600_LANGUAGES[: args.languages]
    name = f"{args.images}x{len(languages)}x{args.captions_per_image}"
    t = time.perf_counter()
    data_dir = generate(args.out / name, args.images, languages, args.captions_per_image)
    generate_s = round(time.perf_counter() - t, 1)
    cache = args.out / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {}
    for label in ("cold", "cached"):
        cmd = [sys.executable, __file__, "--child", str(data_dir), model, str(cache)]
        done = subprocess.run(
            [*cmd, "--langs", ",".join(languages)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"{label} run failed:\n{done.stderr[-4000:]}")
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
        runs[label]["total_s"] = round(
            sum(v for k, v in runs[label].items() if k.endswith("_s")), 2
        )
    cache_mb = round(sum(p.stat().st_size for p in cache.rglob("*.npy")) / 2**20, 1)
    lines = [
        f"Evaluation at XM3600 size: {args.images} images x {len(languages)} languages x "
        f"{args.captions_per_image} captions ({runs['cold']['captions']} captions), world "
        f"clip-base, embedding cache {cache_mb} MB.",
        "",
        "| run | read s | model s | contamination s | encode + recall s | total s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in runs.items():
        lines.append(
            f"| {label} | {r['read_s']} | {r['model_s']} | {r['contamination_s']} | "
            f"{r['encode_and_recall_s']} | {r['total_s']} | {r['peak_rss_mb']} |"
        )
    full = args.images >= 3600 and len(languages) >= 36
    write_results(
        "eval_scale" if full else "eval_scale_smoke",
        "Evaluation at Crossmodal-3600 size (seconds, peak memory)",
        {"generate_s": generate_s, "cache_mb": cache_mb, "runs": runs, "full_size": full},
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()

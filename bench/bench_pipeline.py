"""Benchmark of the Beam augmentation pipeline (`pipelines/`), on the synthetic world.

Measures:
1. images/s end to end and time per stage (RunInference batch latencies summed over workers,
   model load times), with 1 and with 2 local worker processes;
2. the Beam translate stage's throughput against the raw translators engine on the same
   sentences (target: >= 90%), both timed from start to finish, model load included;
3. peak memory for a small and a 10x larger input (should stay flat).

Models: `--world DIR` uses the world's own models in DIR/models (captioner, m2m-multi,
clip-base; build them with `babelcap world models --world DIR`); without it, tiny randomly
initialised models of the same architectures (tests/data/pipeline_testkit.py) are used.

    python bench/bench_pipeline.py [--quick] [--world DIR]

Writes bench/results/pipeline.json (+ the Markdown table it prints).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import write_results  # noqa: E402

LANGS = ["pt", "es"]  # target languages (the world's marian-en-pt serves pt only)


def build_world(root: Path, n: int) -> Path:
    from babelcap.world.build import ensure_world

    return ensure_world(root / f"world-{n}", n_images=n, seed=11, progress=False)


def resolve_models(args, root: Path) -> dict[str, str]:
    if args.models:
        given = json.loads(args.models)
        LANGS[:] = given.pop("languages", LANGS)
        return {**given, "kind": "world"}
    if args.world:
        from babelcap.world.models import build_models, model_dir

        world = Path(args.world)
        build_models(world, only=["captioner", "m2m-multi", "clip-base"])
        LANGS[:] = ["pt", "es"]
        return {
            "captioner": str(model_dir(world, "captioner")),
            "translator": str(model_dir(world, "m2m-multi") / "ct2"),
            "clip": str(model_dir(world, "clip-base")),
            "kind": "world",
        }
    import pipeline_testkit as kit

    models = root / "tiny-models"
    if not (models / "done").exists():
        kit.tiny_blip(models / "blip")
        kit.tiny_translator(models / "tr", languages=LANGS)
        kit.tiny_clip(models / "clip")
        (models / "done").write_text("ok")
    return {
        "captioner": str(models / "blip"),
        "translator": str(models / "tr"),
        "clip": str(models / "clip"),
        "kind": "tiny-random",
    }


def make_config(
    world: Path,
    out: Path,
    models: dict[str, str],
    num_captions: int,
    clip: bool = True,
    languages=LANGS,
):
    from babelcap.pipelines.options import (
        AugmentConfig,
        CaptionerConfig,
        ClipConfig,
        TextFilterConfig,
        TranslationStageConfig,
    )

    tiny = models["kind"] != "world"
    return AugmentConfig(
        input=str(world / "manifest.jsonl"),
        output=str(out),
        languages=tuple(languages),
        captioner=CaptionerConfig(
            model=models["captioner"], num_captions=num_captions, max_new_tokens=20, batch_size=32
        ),
        translator=TranslationStageConfig(
            model=models["translator"],
            batch_size=64,
            options={"max_decoding_length": 24} if tiny else {},
        ),
        clip=ClipConfig(model=models["clip"], top_k=max(1, num_captions // 2), batch_size=64)
        if clip
        else None,
        text=TextFilterConfig(language_check=not tiny),
    )


def stage_seconds(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        ns, _, name = key.partition("/")
        if not ns.startswith("babelcap.") or not isinstance(value, dict):
            continue
        stage = ns.split(".", 1)[1]
        if name == "inference_batch_latency_micro_secs":
            out[f"{stage}.inference_s"] = round(value["sum"] / 1e6, 2)
        elif name == "load_model_latency_milli_secs":
            out[f"{stage}.load_s"] = round(value["sum"] / 1e3, 2)
    return dict(sorted(out.items()))


def end_to_end(world: Path, models: dict, root: Path, workers: int, num_captions: int) -> dict:
    from babelcap.pipelines.runner import run

    out = root / f"e2e-w{workers}"
    cfg = make_config(world, out, models, num_captions)
    start = time.perf_counter()
    manifest = run(cfg, workers=workers, echo=False)
    wall = time.perf_counter() - start
    books = manifest["accounting"]
    return {
        "workers": workers,
        "images": books["inputs"],
        "rows": books["rows_written"],
        "wall_s": round(wall, 2),
        "images_per_s": round(books["inputs"] / wall, 2),
        "captions": manifest["stats"].get("caption.generated", 0),
        "translations": manifest["stats"].get("translate.translations", 0),
        "stages": stage_seconds(manifest["metrics"]),
    }


def translate_stage_vs_engine(world: Path, models: dict, n_images: int | None = None) -> dict:
    """Same English sentences through the raw engine and through the Beam translate stage."""
    import apache_beam as beam

    from babelcap.pipelines.options import TranslationStageConfig
    from babelcap.pipelines.runner import pipeline_options
    from babelcap.pipelines.translation import Translate, engine_config
    from babelcap.translators import Translator

    rows = [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()]
    gold = [json.loads(x) for x in (world / "gold" / "en.jsonl").read_text().splitlines()]
    caps = {g["image_path"]: g["captions"] for g in gold}
    records = []
    for r in rows[:n_images]:
        texts = caps.get(r["image_path"], [r["caption"]])
        records.append(
            {
                "input_ref": r["image_path"],
                "stats": {},
                "captions": [
                    {
                        "text": t,
                        "language": "en",
                        "origin": "source",
                        "model": None,
                        "prompt": None,
                        "source_index": None,
                        "score": None,
                    }
                    for t in texts
                ],
            }
        )
    sentences = [c["text"] for rec in records for c in rec["captions"]]
    tiny = models["kind"] != "world"
    cfg = TranslationStageConfig(
        model=models["translator"],
        batch_size=64,
        options={"max_decoding_length": 24} if tiny else {},
    )

    # Raw engine: load + the same batches of 64 records, every language.
    start = time.perf_counter()
    engine = Translator(engine_config(cfg)).load()
    for i in range(0, len(records), cfg.batch_size):
        batch = [c["text"] for rec in records[i : i + cfg.batch_size] for c in rec["captions"]]
        for lang in LANGS:
            engine.translate_batch(batch, "en", lang)
    raw = time.perf_counter() - start

    def beam_run(with_translate: bool) -> tuple[float, float]:
        """(wall seconds, seconds spent in the engine's batches inside the stage)."""
        p = beam.Pipeline(options=pipeline_options([], workers=1))
        pc = p | beam.Create(records)
        if with_translate:
            pc, _ = pc | Translate(cfg, LANGS)
        _ = pc | beam.combiners.Count.Globally()
        start = time.perf_counter()
        result = p.run()
        result.wait_until_finish()
        wall = time.perf_counter() - start
        inner = 0.0
        for d in result.metrics().query()["distributions"]:
            if d.key.metric.name == "inference_batch_latency_micro_secs":
                inner += (d.committed or d.attempted).sum / 1e6
        return wall, inner

    empty = min(beam_run(False)[0] for _ in range(2))
    full, inner = beam_run(True)
    stage = max(full - empty, 1e-6)
    n = len(sentences) * len(LANGS)
    return {
        "sentences": len(sentences),
        "translations": n,
        "unique_sentences": len(set(sentences)),
        "raw_engine_s": round(raw, 2),
        "raw_engine_per_s": round(n / raw, 1),
        "beam_pipeline_s": round(full, 2),
        "beam_empty_pipeline_s": round(empty, 2),
        "beam_stage_s": round(stage, 2),
        "beam_stage_per_s": round(n / stage, 1),
        "ratio": round(raw / stage, 3),
        # Stricter views: the whole translate-only pipeline against the raw engine, and the
        # time spent inside the stage's engine calls (Beam's batching/pickling excluded).
        "ratio_whole_pipeline": round(raw / full, 3),
        "beam_stage_engine_calls_s": round(inner, 2),
    }


def memory_child(world: str, models_json: str, out: str, workers: int) -> None:
    """Run once (in a fresh process) and print the peak RSS of this process and its workers."""
    from babelcap.pipelines.runner import run

    models = json.loads(models_json)
    LANGS[:] = models.pop("languages", LANGS)
    cfg = make_config(
        Path(world), Path(out), models, num_captions=1, clip=False, languages=LANGS[:1]
    )
    start = time.perf_counter()
    manifest = run(cfg, workers=workers, echo=False)
    print(
        json.dumps(
            {
                "images": manifest["accounting"]["inputs"],
                "wall_s": round(time.perf_counter() - start, 2),
                "driver_peak_mb": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
                "worker_peak_mb": round(
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
                ),
            }
        )
    )


def memory(worlds: list[Path], models: dict, root: Path, workers: int) -> list[dict]:
    results = []
    for world in worlds:
        cmd = [
            sys.executable,
            __file__,
            "--_memory-child",
            str(world),
            json.dumps({**models, "languages": LANGS}),
            str(root / f"mem-{world.name}"),
            str(workers),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def markdown(data: dict) -> str:
    lines = [
        f"Pipeline on the world ({data['models']} models), local FnApiRunner",
        "",
        "| workers | images | wall s | images/s | caption s | clip s | translate s |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in data["end_to_end"]:
        s = e["stages"]
        lines.append(
            f"| {e['workers']} | {e['images']} | {e['wall_s']} | {e['images_per_s']} | "
            f"{s.get('caption.inference_s', '-')} | {s.get('clip.inference_s', '-')} | "
            f"{s.get('translate.inference_s', '-')} |"
        )
    t = data["translation"]
    lines += [
        "",
        "| translation | translations | seconds | per s |",
        "|---|---|---|---|",
        f"| raw engine | {t['translations']} | {t['raw_engine_s']} | {t['raw_engine_per_s']} |",
        f"| Beam translate stage | {t['translations']} | {t['beam_stage_s']} | "
        f"{t['beam_stage_per_s']} |",
        f"| stage / engine | | | **{t['ratio'] * 100:.0f}%** (target >= 90%) |",
        f"| whole translate-only pipeline / engine | | {t['beam_pipeline_s']} | "
        f"{t['ratio_whole_pipeline'] * 100:.0f}% |",
    ]
    lines += ["", "| images | wall s | driver peak MB | worker peak MB |", "|---|---|---|---|"]
    for m in data["memory"]:
        lines.append(
            f"| {m['images']} | {m['wall_s']} | {m['driver_peak_mb']} | {m['worker_peak_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_memory-child":
        memory_child(*sys.argv[2:5], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    parser.add_argument("--world", default=None, help="world dir with built models")
    parser.add_argument(
        "--models",
        default=None,
        help='JSON {"captioner": DIR, "translator": CT2_DIR, "clip": DIR, '
        '"languages": ["pt"]}: models built elsewhere',
    )
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "babelcap-bench"))
    args = parser.parse_args()
    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    n_e2e = 60 if args.quick else 300
    mem_sizes = (200, 2000) if args.quick else (1000, 10000)
    models = resolve_models(args, root)
    world = build_world(root, n_e2e)
    data: dict[str, Any] = {"models": models["kind"], "images_end_to_end": n_e2e}
    data["end_to_end"] = [end_to_end(world, models, root, w, num_captions=4) for w in (1, 2)]
    mem_worlds = [build_world(root, n) for n in mem_sizes]
    # Enough sentences that translating dominates Beam's fixed start-up cost.
    data["translation"] = translate_stage_vs_engine(mem_worlds[-1], models)
    data["memory"] = memory(mem_worlds, models, root, workers=2)
    write_results("pipeline", "Beam augmentation pipeline", data, markdown(data))


if __name__ == "__main__":
    main()

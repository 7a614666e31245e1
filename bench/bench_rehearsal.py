"""Full-size rehearsal: the real augmentation pipeline with real-size models on photo-sized images.

Models (random weights, built locally by `bench/rehearsal_models.py`, nothing downloaded):
BLIP-base at 384 px, an NLLB-200-distilled-600M-shaped translator in CTranslate2 int8, and
`xlm-roberta-base-ViT-B-32` for CLIP scores. Images: generated photos of mixed sizes
(640x480 to 4032x3024) and formats (JPEG, PNG, WebP). The pipeline is
`babelcap.pipelines.runner.run` with an `AugmentConfig`, on the local runner with 1 and 2
worker processes; the filters are relaxed so random captions survive (no language check, no
near-duplicate pruning), and the decoders are capped at a real caption's length because random
weights never stop on their own (BLIP: 20 new tokens; NLLB: 24 tokens).

Reported: per stage (RunInference batch latencies summed over workers) seconds, images/s or
sentences/s, share of the workers' time, model load time; peak RSS per worker process and of
the whole process tree (sampled with psutil); what one copy of each model costs in memory (so
what sharing one copy between the workers would save); the cost of decoding a photo; and a
projection for one million images on this machine.

    python bench/bench_rehearsal.py                      # 120 images, 1 and 2 workers, CPU
    python bench/bench_rehearsal.py --quick              # 8 images, 1 worker (a smoke run)
    python bench/bench_rehearsal.py --device cuda        # fp16 BLIP, CT2 int8_float16, CUDA CLIP
    python bench/bench_rehearsal.py --compare-sharing    # 2 workers: own models vs one shared copy

Writes bench/results/rehearsal.json (+ the Markdown table it prints). `--compare-sharing` runs
the pipeline with 2 worker processes twice, each loading its own models (`model_copies` 0) and
sharing one copy of each (`--model-copies`, default 1), and writes only the file's `sharing` key
(the other figures stay as they are): wall time, peak RSS of the whole process tree and of each
process, model loads and load seconds per stage.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import write_results  # noqa: E402

DEFAULT_CACHE = ROOT / ".cache" / "rehearsal"
# (width, height, format): photo sizes from VGA to a 12 MP phone; PNG and WebP at the sizes
# where people use them.
SHAPES = [
    (640, 480, "JPEG"),
    (800, 600, "PNG"),
    (1024, 768, "WEBP"),
    (1280, 960, "JPEG"),
    (1920, 1080, "JPEG"),
    (1600, 1200, "PNG"),
    (2048, 1536, "WEBP"),
    (3000, 2000, "JPEG"),
    (4032, 3024, "JPEG"),
    (768, 1024, "JPEG"),
]
STAGES = ("caption", "clip", "translate")


# --- inputs ---------------------------------------------------------------------------------
def photo(width: int, height: int, seed: int):
    """A photo-like RGB image: smooth gradients, a few shapes, sensor-like noise (so JPEG/WebP
    sizes and decode times are those of photos, not of flat colour)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / rng.uniform(80, 400) + c) * np.cos(y / rng.uniform(80, 400))
            for c in rng.uniform(0, 6, 3)
        ],
        axis=-1,
    )
    base += rng.normal(0, 6, base.shape).astype(np.float32)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
        box = (x0, y0, min(width - 1, x0 + w), min(height - 1, y0 + h))
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return im


def make_images(folder: Path, n: int) -> dict[str, Any]:
    """`n` images in `folder` (built once); returns counts per format and total bytes."""
    done = folder / ".complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h, fmt = SHAPES[i % len(SHAPES)]
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            buf = io.BytesIO()
            kwargs = {"quality": 90} if fmt in ("JPEG", "WEBP") else {"compress_level": 6}
            photo(w, h, seed=i).save(buf, format=fmt, **kwargs)
            (folder / f"img{i:05d}.{ext}").write_bytes(buf.getvalue())
        done.write_text("ok\n")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp"))
    return {
        "images": len(files),
        "formats": {ext: sum(p.suffix == ext for p in files) for ext in (".jpg", ".png", ".webp")},
        "megapixels_mean": round(
            sum(SHAPES[i % len(SHAPES)][0] * SHAPES[i % len(SHAPES)][1] for i in range(n))
            / max(1, n)
            / 1e6,
            2,
        ),
        "bytes": sum(p.stat().st_size for p in files),
    }


def decode_cost(folder: Path, limit: int = 20) -> dict[str, float]:
    """Seconds to decode one image with the pipeline's decoder, and to downscale it as BLIP's
    processor does (the pipeline decodes each image in three stages: decode, caption, CLIP)."""
    from babelcap.core.images import decode_rgb

    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".webp"))[:limit]
    start = time.perf_counter()
    for p in files:
        decode_rgb(p.read_bytes())
    per = (time.perf_counter() - start) / max(1, len(files))
    return {"decode_s_per_image": round(per, 4), "images_timed": len(files)}


# --- memory ---------------------------------------------------------------------------------
class TreeMemory:
    """Peak RSS of this process and every descendant, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak_total = 0
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self, workers: int) -> dict[str, float]:
        mb = 1 << 20
        driver = self.peak.get(self.me.pid, 0)
        others = sorted((v for k, v in self.peak.items() if k != self.me.pid), reverse=True)
        # One worker runs in the driver process (in_memory); more are child processes.
        per_worker = others[:workers] if workers > 1 else [driver]
        return {
            "driver_peak_mb": round(driver / mb),
            "worker_peak_mb": [round(v / mb) for v in per_worker],
            "tree_peak_mb": round(self.peak_total / mb),
        }


# --- one run (in its own process, so memory and threads are clean) --------------------------
def make_config(
    images: Path,
    out: Path,
    models: dict[str, str],
    args: argparse.Namespace,
    model_copies: int = 0,
):
    from babelcap.pipelines.options import (
        AugmentConfig,
        CaptionerConfig,
        ClipConfig,
        TextFilterConfig,
        TranslationStageConfig,
    )

    return AugmentConfig(
        input=str(images),
        output=str(out),
        languages=tuple(args.languages.split(",")),
        captioner=CaptionerConfig(
            model=models["captioner"],
            num_captions=args.num_captions,
            max_new_tokens=args.caption_tokens,
            batch_size=args.caption_batch_size,
            device=args.device,
        ),
        clip=ClipConfig(
            model=models["clip"], top_k=args.clip_top_k, batch_size=32, device=args.device
        ),
        translator=TranslationStageConfig(
            model=models["translator"],
            batch_size=args.translate_batch_size,
            device=args.device,
            options={"max_decoding_length": args.translation_tokens},
        ),
        # Random models write nonsense: keep it (the cost is what is measured).
        text=TextFilterConfig(
            min_words=1, min_chars=1, near_duplicate_threshold=1.01, language_check=False
        ),
        num_shards=1,
        model_copies=model_copies,
    )


def stage_figures(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        ns, _, name = key.partition("/")
        if not ns.startswith("babelcap.") or not isinstance(value, dict):
            continue
        stage = out.setdefault(ns.split(".", 1)[1], {})
        if name == "inference_batch_latency_micro_secs":
            stage["busy_s"] = round(value["sum"] / 1e6, 2)
            stage["batches"] = value["count"]
        elif name == "load_model_latency_milli_secs":
            stage["load_s"] = round(value["sum"] / 1e3, 2)
            stage["loads"] = value["count"]
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from babelcap.pipelines.runner import run

    args = argparse.Namespace(**spec["args"])
    copies = spec.get("model_copies", 0)
    cfg = make_config(Path(spec["images"]), Path(spec["out"]), spec["models"], args, copies)
    with TreeMemory() as mem:
        start = time.perf_counter()
        manifest = run(cfg, workers=spec["workers"], echo=False)
        wall = time.perf_counter() - start
    stats = manifest["stats"]
    return {
        "workers": spec["workers"],
        "model_copies": manifest["config"]["model_copies"],  # as run (0 with one worker)
        "wall_s": round(wall, 2),
        "accounting": manifest["accounting"],
        "captions": stats.get("caption.generated", 0),
        "scored": stats.get("clip.scored", 0),
        "translations": stats.get("translate.translations", 0),
        "stages": stage_figures(manifest["metrics"]),
        "memory": mem.report(spec["workers"]),
    }


def model_copy(kind: str, models: dict[str, str], device: str) -> dict[str, float]:
    """Load one model through the pipeline's own loader: seconds and RSS it adds (imports
    done before the clock starts)."""
    import psutil

    from babelcap.pipelines.captioning import load_captioner
    from babelcap.pipelines.clipscore import load_clip_model
    from babelcap.pipelines.options import ClipConfig
    from babelcap.translators import Translator, TranslatorConfig

    loaders = {
        "captioner": lambda: load_captioner(models["captioner"], None, device),
        "clip": lambda: load_clip_model(ClipConfig(model=models["clip"], device=device)),
        "translator": lambda: Translator(
            TranslatorConfig(model_dir=models["translator"], device=device)
        ).load(),
    }
    rss0 = psutil.Process().memory_info().rss
    start = time.perf_counter()
    keep = loaders[kind]()
    seconds = time.perf_counter() - start
    rss = psutil.Process().memory_info().rss - rss0
    del keep
    return {"load_s": round(seconds, 2), "rss_mb": round(rss / (1 << 20))}


def caption_paths(images: Path, models: dict[str, str], args: dict[str, Any], n: int):
    """Seconds per image for the same batch through the captioning stage (BLIP: image work once
    per batch) and through the generic path it replaced (processor + generate per prompt)."""
    from babelcap.core import schema
    from babelcap.core.images import decode_rgb
    from babelcap.pipelines.captioning import CaptionModelHandler, prompts_for
    from babelcap.pipelines.options import CaptionerConfig

    cfg = CaptionerConfig(
        model=models["captioner"],
        num_captions=args["num_captions"],
        max_new_tokens=args["caption_tokens"],
        device=args["device"],
    )
    handler = CaptionModelHandler(cfg)
    bundle = handler.load_model()
    files = sorted(p for p in images.iterdir() if p.suffix in (".jpg", ".png", ".webp"))[:n]
    batch = [{"data": p.read_bytes()} for p in files]
    for rec in batch:
        rec["image_id"] = schema.image_id_for(rec["data"])
    start = time.perf_counter()
    handler.run_inference(batch, bundle)
    stage = time.perf_counter() - start
    start = time.perf_counter()
    pics = [decode_rgb(r["data"]) for r in batch]
    for prompt in prompts_for(cfg.prompts, cfg.num_captions):
        bundle._generate(pics, prompt, None)
    generic = time.perf_counter() - start
    return {
        "images": len(batch),
        "stage_s_per_image": round(stage / len(batch), 2),
        "generic_s_per_image": round(generic / len(batch), 2),
        "speedup": round(generic / stage, 2),
    }


def in_subprocess(flag: str, spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise RuntimeError(f"{flag} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------
def summarise(run: dict[str, Any], images: int) -> dict[str, Any]:
    """Per-stage rates and shares; steady-state seconds per image (model loads excluded)."""
    workers, wall = run["workers"], run["wall_s"]
    worker_s = wall * workers
    counts = {"caption": images, "clip": images, "translate": run["translations"]}
    rows = {}
    busy_total = load_total = 0.0
    for stage in STAGES:
        s = run["stages"].get(stage, {})
        busy, load = s.get("busy_s", 0.0), s.get("load_s", 0.0)
        busy_total += busy
        load_total += load
        rows[stage] = {
            "busy_s": busy,
            "per_s": round(counts[stage] / busy, 2) if busy else None,
            "share": round(busy / worker_s, 3),
            "load_s": load,
            "loads": s.get("loads", 0),
        }
    other = max(0.0, worker_s - busy_total - load_total)
    rows["other"] = {"busy_s": round(other, 2), "share": round(other / worker_s, 3)}
    rows["model loads"] = {"busy_s": round(load_total, 2), "share": round(load_total / worker_s, 3)}
    steady = (wall - load_total / workers) / max(1, images)
    return {"stages": rows, "steady_s_per_image": round(steady, 3)}


def projection(run: dict[str, Any], cores: int) -> dict[str, float]:
    """One million images at the run's steady rate, plus the model loads: the runner builds one
    pipeline per wave of work units, and every worker loads every model again in each."""
    from babelcap.pipelines.options import AugmentConfig

    fields = AugmentConfig.model_fields
    per_wave = fields["unit_size"].default * fields["units_per_wave"].default
    waves = -(-1_000_000 // per_wave)
    workers = run["workers"]
    load_per_worker = sum(s.get("load_s", 0.0) for s in run["stages"].values()) / workers
    work_hours = 1e6 * run["summary"]["steady_s_per_image"] / 3600
    load_hours = waves * load_per_worker / 3600
    hours = work_hours + load_hours
    return {
        "hours": round(hours, 1),
        "days": round(hours / 24, 1),
        "core_hours": round(hours * cores),
        "waves": waves,
        "model_load_hours": round(load_hours, 2),
    }


def markdown(data: dict[str, Any]) -> str:
    cfg, img = data["config"], data["inputs"]
    lines = [
        f"{img['images']} generated photos ({img['megapixels_mean']} MP on average, "
        f"{img['formats']['.jpg']} JPEG / {img['formats']['.png']} PNG / "
        f"{img['formats']['.webp']} WebP), device `{cfg['device']}`; BLIP-base 384 px "
        f"({cfg['num_captions']} captions per image, {cfg['caption_tokens']} new tokens each), "
        f"CLIP `xlm-roberta-base-ViT-B-32` (top {cfg['clip_top_k']}), NLLB-600M shape in "
        f"CTranslate2 int8 into {cfg['languages']} ({cfg['translation_tokens']} tokens). "
        "Random weights, real sizes.",
        "",
        "| workers | stage | busy s | per s | share of worker time | model load s (loads) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    units = {"caption": "images", "clip": "images", "translate": "sentences"}
    for run in data["runs"]:
        s = run["summary"]["stages"]
        for stage in (*STAGES, "other", "model loads"):
            r = s[stage]
            per = f"{r['per_s']} {units[stage]}" if r.get("per_s") else ""
            load = f"{r['load_s']} ({r['loads']})" if stage in STAGES else ""
            lines.append(
                f"| {run['workers']} | {stage} | {r['busy_s']} | {per} | "
                f"{r['share'] * 100:.0f}% | {load} |"
            )
    lines += [
        "",
        "| workers | images | wall s | images/s | steady s/image | peak RSS per worker (MB) "
        "| whole tree peak (MB) | 1M images: hours (core-hours; of which model loads) |",
        "|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for run in data["runs"]:
        m, p = run["memory"], run["projection"]
        lines.append(
            f"| {run['workers']} | {run['accounting']['inputs']} | {run['wall_s']} | "
            f"{run['accounting']['inputs'] / run['wall_s']:.2f} | "
            f"{run['summary']['steady_s_per_image']} | "
            f"{', '.join(str(v) for v in m['worker_peak_mb'])} | {m['tree_peak_mb']} | "
            f"{p['hours']} ({p['core_hours']}; {p['model_load_hours']} h in {p['waves']} "
            "waves) |"
        )
    copies = data["model_copies"]
    total = sum(c["rss_mb"] for c in copies.values())
    lines += [
        "",
        "| one model copy | load s | RSS added (MB) |",
        "|---|---:|---:|",
        *[f"| {k} | {v['load_s']} | {v['rss_mb']} |" for k, v in copies.items()],
        f"| all three | | {total} |",
        "",
        f"Unless the models are shared (`--model-copies 1`), every worker process loads its "
        f"own copy of each model: sharing one copy between N workers on a machine saves up to "
        f"(N - 1) x {total} MB. Decoding one of these photos takes "
        f"{data['decode']['decode_s_per_image']} s, and the pipeline decodes each image in three "
        f"stages (decode, caption, CLIP).",
    ]
    if data.get("caption_paths"):
        c = data["caption_paths"]
        lines += [
            "",
            f"Captioning {c['images']} images x {cfg['num_captions']} prompts: "
            f"{c['stage_s_per_image']} s per image in the stage (BLIP's image work once per "
            f"batch) against {c['generic_s_per_image']} s through the generic path "
            f"(processor + `generate` per prompt): **{c['speedup']}x**.",
        ]
    if data.get("sharing"):
        sharing = data["sharing"]
        lines += [
            "",
            f"Shared models (`{sharing['command']}`, {sharing['date']}):",
            "",
            sharing["markdown"],
        ]
    return "\n".join(lines)


# --- shared models against each worker's own -------------------------------------------------
def warm_page_cache(models: dict[str, str]) -> None:
    """Read every model file once, so the first timed run does not pay for the disk alone."""
    for folder in models.values():
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    while f.read(1 << 24):
                        pass


def sharing_markdown(sharing: dict[str, Any]) -> str:
    cfg, img = sharing["config"], sharing["inputs"]
    lines = [
        f"{img['images']} generated photos, device `{cfg['device']}`, {cfg['num_captions']} "
        f"captions per image, into {cfg['languages']}; the same models as above.",
        "",
        "| workers | model copies | wall s | images/s | peak RSS per process (MB) "
        "| whole tree peak (MB) | model loads caption / clip / translate | load s |",
        "|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for run in sharing["runs"]:
        m, st = run["memory"], run["stages"]
        loads = " / ".join(str(st.get(s, {}).get("loads", 0)) for s in STAGES)
        load_s = round(sum(st.get(s, {}).get("load_s", 0.0) for s in STAGES), 2)
        lines.append(
            f"| {run['workers']} | {run['model_copies'] or 'own'} | {run['wall_s']} | "
            f"{run['accounting']['inputs'] / run['wall_s']:.2f} | "
            f"{m['driver_peak_mb']} (driver); {', '.join(str(v) for v in m['worker_peak_mb'])} | "
            f"{m['tree_peak_mb']} | {loads} | {load_s} |"
        )
    c = sharing["comparison"]
    lines += [
        "",
        f"Sharing saved {c['tree_peak_saved_mb']} MB of the process tree's peak "
        f"({c['tree_peak_saved_share'] * 100:.0f}%); wall time {c['wall_ratio']}x that of "
        "the workers with their own models. (With sharing, a stage's batch latencies include "
        "the time a worker waits for the copy while it serves the other worker.)",
    ]
    return "\n".join(lines)


def compare_sharing(
    args: argparse.Namespace, images: Path, models: dict[str, str], cache: Path
) -> dict[str, Any]:
    """The pipeline with the same workers twice: each process loading its own models, then
    one shared set (`args.model_copies`, at least 1); each run in its own process."""
    from common import machine

    workers = max(2, max(int(w) for w in args.workers.split(",")))
    config = {k: v for k, v in vars(args).items() if k != "cache"}
    print("[rehearsal] reading the model files once (page cache) ...", flush=True)
    warm_page_cache(models)
    runs = []
    for copies in (0, max(1, args.model_copies)):
        print(f"[rehearsal] {args.images} images, {workers} workers, model copies {copies}")
        out = cache / f"out-w{workers}-copies{copies}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh output: the runner would resume it
        spec = {
            "images": str(images),
            "out": str(out),
            "models": models,
            "workers": workers,
            "model_copies": copies,
            "args": config,
        }
        run = in_subprocess("--_run", spec)
        print(f"[rehearsal] {json.dumps(run)}", flush=True)
        runs.append(run)
    own, shared = runs
    saved = own["memory"]["tree_peak_mb"] - shared["memory"]["tree_peak_mb"]
    sharing = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": machine(),
        "config": config,
        "inputs": make_images(images, args.images),
        "runs": runs,
        "comparison": {
            "tree_peak_saved_mb": saved,
            "tree_peak_saved_share": round(saved / max(1, own["memory"]["tree_peak_mb"]), 3),
            "wall_ratio": round(shared["wall_s"] / max(1e-9, own["wall_s"]), 3),
        },
    }
    sharing["markdown"] = sharing_markdown(sharing)
    return sharing


def write_sharing(sharing: dict[str, Any], path: Path) -> None:
    """Set the results file's `sharing` key, leaving its other figures as they are."""
    data = json.loads(path.read_text()) if path.exists() else {"title": "Full-size rehearsal"}
    data["sharing"] = sharing
    if data.get("runs"):  # the main table, now with the sharing one after it
        data["markdown"] = markdown(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    print(sharing["markdown"])


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("--_run", "--_copy", "--_captions"):
        spec = json.loads(sys.argv[2])
        if sys.argv[1] == "--_run":
            print(json.dumps(child(spec)))
        elif sys.argv[1] == "--_captions":
            print(json.dumps(caption_paths(Path(spec["images"]), spec["models"], spec["args"], 2)))
        else:
            print(json.dumps(model_copy(spec["kind"], spec["models"], spec["device"])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 images, 1 worker")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--languages", default="pt,es,hi")
    parser.add_argument("--num-captions", type=int, default=10)
    parser.add_argument("--caption-tokens", type=int, default=20)
    parser.add_argument("--caption-batch-size", type=int, default=8)
    parser.add_argument("--clip-top-k", type=int, default=5)
    parser.add_argument("--translation-tokens", type=int, default=24)
    parser.add_argument("--translate-batch-size", type=int, default=16)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument(
        "--no-caption-check",
        action="store_true",
        help="skip timing the generic captioning path against the stage's BLIP path",
    )
    parser.add_argument(
        "--render", action="store_true", help="only rebuild the table from the last results"
    )
    parser.add_argument(
        "--model-copies",
        type=int,
        default=0,
        help="copies of each model shared by the worker processes (AugmentConfig.model_copies; "
        "0: each worker loads its own)",
    )
    parser.add_argument(
        "--compare-sharing",
        action="store_true",
        help="2 (or the most --workers) worker processes with their own models, then with "
        "--model-copies (at least 1) shared copies; writes only the results' `sharing` key",
    )
    parser.add_argument(
        "--results",
        default=str(HERE / "results" / "rehearsal.json"),
        help="results file of --compare-sharing (default bench/results/rehearsal.json)",
    )
    args = parser.parse_args()
    if args.render:
        path = HERE / "results" / "rehearsal.json"
        data = json.loads(path.read_text())
        for run in data["runs"]:
            run["projection"] = projection(run, data["machine"]["cores"])
        data["markdown"] = markdown(data)
        path.write_text(json.dumps(data, indent=2, default=str))
        print(data["markdown"])
        return 0
    if args.quick:
        args.images, args.workers = 8, "1"
    if args.device == "cuda" and args.caption_batch_size == 8:
        args.caption_batch_size = 64  # the README's GPU setting
    cache = Path(args.cache)
    workers = [int(w) for w in args.workers.split(",")]

    # Models: built once, in a separate process so the builder's memory is returned.
    subprocess.run(
        [sys.executable, str(HERE / "rehearsal_models.py"), "--root", str(cache / "models")],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    from rehearsal_models import model_dirs

    models = model_dirs(cache / "models")
    images = cache / f"images-{args.images}"
    inputs = make_images(images, args.images)
    if args.compare_sharing:
        write_sharing(compare_sharing(args, images, models, cache), Path(args.results))
        return 0
    data: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "cache"},
        "inputs": inputs,
        "models": {
            "captioner": "BLIP-base (BlipConfig defaults, 384 px), random",
            "translator": "NLLB-200-distilled-600M shape, CTranslate2 int8, random",
            "clip": "xlm-roberta-base-ViT-B-32, random",
        },
        "decode": decode_cost(images),
        "model_copies": {
            kind: in_subprocess("--_copy", {"kind": kind, "models": models, "device": args.device})
            for kind in ("captioner", "translator", "clip")
        },
        "runs": [],
    }
    if not args.no_caption_check:
        print("[rehearsal] captioning: stage vs the generic path ...", flush=True)
        data["caption_paths"] = in_subprocess(
            "--_captions", {"images": str(images), "models": models, "args": data["config"]}
        )
        print(f"[rehearsal] {json.dumps(data['caption_paths'])}", flush=True)
    cores = os.cpu_count() or 1
    for w in workers:
        print(f"[rehearsal] {args.images} images, {w} worker(s) ...", flush=True)
        spec = {
            "images": str(images),
            "out": str(cache / f"out-w{w}"),
            "models": models,
            "workers": w,
            "model_copies": args.model_copies,
            "args": data["config"],
        }
        # A fresh output each time: the runner would otherwise resume (or refuse) the last one.
        shutil.rmtree(cache / f"out-w{w}", ignore_errors=True)
        run = in_subprocess("--_run", spec)
        print(f"[rehearsal] {json.dumps(run)}", flush=True)
        run["summary"] = summarise(run, run["accounting"]["inputs"])
        run["projection"] = projection(run, cores)
        data["runs"].append(run)
    last = HERE / "results" / "rehearsal.json"
    if last.exists() and "sharing" in (previous := json.loads(last.read_text())):
        data["sharing"] = previous["sharing"]  # measured on its own (--compare-sharing): kept
    write_results("rehearsal", "Full-size rehearsal", data, markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

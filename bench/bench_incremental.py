"""Benchmark of incremental, resumable augmentation (issue 14), on the synthetic world.

Side by side, each as a real `babelcap augment` process (so a kill is a real SIGKILL):

1. a full run over 90% of the world's images (target language pt);
2. the same run into a second output, killed (`kill -9`) once about half its units are
   committed, then resumed: time and model calls of the resumed part (target <= 55% of 1);
3. adding a language (es) to the finished output of 1: no captioning, no CLIP scoring (model
   calls counted from the run's RunInference metrics), at most the translation share of 1 plus
   10% of its time;
4. adding the other 10% of the images (appended to the same manifest) to that output
   (target <= 20% of 1);
5. with `--retranslator DIR`: retranslating pt with that translator (`--retranslate pt`): no
   captioning, no CLIP scoring, es kept as it was.

Models: `--world DIR` uses the world's own models (captioner, m2m-multi for pt and es,
clip-base; built when missing); without it, tiny random models of the same architectures.

    python bench/bench_incremental.py --world WORLD [--images 2000] [--workers 2]
    python bench/bench_incremental.py --quick          # smoke: 60 images, tiny models

Writes bench/results/incremental.json (+ the Markdown table it prints).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_pipeline import make_config, resolve_models, stage_seconds  # noqa: E402
from common import write_results  # noqa: E402


def model_calls(metrics: dict[str, Any]) -> dict[str, int]:
    """RunInference calls (batches of elements) per stage, from a run manifest's metrics."""
    out = {}
    for stage in ("caption", "clip", "translate"):
        out[stage] = int(metrics.get(f"babelcap.{stage}/num_inferences", 0))
    return out


def augment(config: dict, workers: int, root: Path, name: str, kill_at: int | None = None):
    """Run `babelcap augment --config` as a child; with kill_at, SIGKILL it once that many
    units are committed. Returns (seconds, manifest or None, killed)."""
    cfg = root / f"{name}.json"
    cfg.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "babelcap.cli", "augment", "--config", str(cfg)]
    cmd += ["--workers", str(workers)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # stderr to a file: a pipe nobody reads while polling fills up and stalls the run (and its
    # Beam workers, which share it) until the pipe drains.
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115 (closed below, after the child ends)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    units = Path(config["output"]) / "_units"
    killed = False
    while proc.poll() is None:
        if kill_at is not None and len(list(units.glob("unit-*.json"))) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    log.close()
    if not killed and proc.returncode != 0:
        tail = (root / f"{name}.log").read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{name} failed:\n{tail}")
    manifest = None
    if not killed:
        manifest = json.loads((Path(config["output"]) / "run_manifest.json").read_text())
    return seconds, manifest, killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 images, tiny models (smoke)")
    parser.add_argument("--world", default=None, help="world dir with (or for) its models")
    parser.add_argument("--models", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=2000, help="world size without --world")
    parser.add_argument("--unit-size", type=int, default=None, help="default images / 20")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-captions", type=int, default=4)
    parser.add_argument(
        "--retranslator",
        default=None,
        help="another translator (CTranslate2 folder): retranslate pt with it at the end",
    )
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "babelcap-bench"))
    args = parser.parse_args()
    n = 60 if args.quick else args.images
    root = Path(args.cache) / f"incremental-{n}-{time.strftime('%Y%m%dT%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    models = resolve_models(args, root)
    if args.world and not args.quick:
        world = Path(args.world)  # used as it is (its models are built there when missing)
    else:
        from babelcap.world.build import ensure_world

        world = ensure_world(root.parent / f"world-{n}", n_images=n, seed=11, progress=False)
    lines = (world / "manifest.jsonl").read_text().splitlines()
    # One manifest that grows, as a user's does: units are planned by input position (manifest
    # path + line), so the added lines form new units. (A new manifest file listing old and new
    # images is a new input set: its old images are found present only after being read.)
    base = full = root / "input.jsonl"
    # Absolute image paths: the manifests live outside the world folder.
    rows = [json.loads(x) for x in lines]
    for r in rows:
        r["image_path"] = str(world / r["image_path"])
    cut = int(len(rows) * 0.9)
    base.write_text("".join(json.dumps(r) + "\n" for r in rows[:cut]))
    unit_size = args.unit_size or max(1, len(rows) // 20)

    def config(manifest: Path, out: Path, languages: list[str]) -> dict:
        c = make_config(world, out, models, args.num_captions, languages=languages)
        return c.updated({"input": str(manifest), "unit_size": unit_size}).to_dict()

    results: dict[str, Any] = {"images": len(rows), "unit_size": unit_size}
    t_full, m_full, _ = augment(config(base, root / "full", ["pt"]), args.workers, root, "full")
    units_total = len(m_full["units"])
    results["full"] = {
        "seconds": round(t_full, 1),
        "units": units_total,
        "rows": m_full["accounting"]["rows_written"],
        "model_calls": model_calls(m_full["metrics"]),
        "stages": stage_seconds(m_full["metrics"]),
    }
    cfg_kill = config(base, root / "killed", ["pt"])
    t_killed, _, killed = augment(
        cfg_kill, args.workers, root, "killed", kill_at=max(1, units_total // 2)
    )
    t_resume, m_resume, _ = augment(cfg_kill, args.workers, root, "resumed")
    results["kill_and_resume"] = {
        "killed": killed,
        "seconds_before_kill": round(t_killed, 1),
        "seconds_resumed": round(t_resume, 1),
        "units_resumed": m_resume["this_run"]["units"],
        "share_of_full": round(t_resume / t_full, 3),
        "model_calls": model_calls(m_resume["metrics"]),
        "same_books": m_resume["accounting"] == m_full["accounting"],
    }
    t_lang, m_lang, _ = augment(
        config(base, root / "full", ["pt", "es"]), args.workers, root, "lang"
    )
    tr = results["full"]["stages"]
    translate_share = (tr.get("translate.inference_s", 0) + tr.get("translate.load_s", 0)) / max(
        1e-9, sum(v for k, v in tr.items())
    )
    results["add_language"] = {
        "seconds": round(t_lang, 1),
        "share_of_full": round(t_lang / t_full, 3),
        "translation_share_of_full": round(translate_share, 3),
        "model_calls": model_calls(m_lang["metrics"]),
    }
    with open(full, "a") as f:  # the other 10% of the images, appended
        f.write("".join(json.dumps(r) + "\n" for r in rows[cut:]))
    t_add, m_add, _ = augment(config(full, root / "full", ["pt", "es"]), args.workers, root, "add")
    results["add_images"] = {
        "seconds": round(t_add, 1),
        "share_of_full": round(t_add / t_full, 3),
        "units": m_add["this_run"]["units"],
        "rows_added": m_add["accounting"]["rows_written"] - m_lang["accounting"]["rows_written"],
        "model_calls": model_calls(m_add["metrics"]),
    }
    if args.retranslator:
        cfg = config(full, root / "full", ["pt", "es"])
        cfg = {**cfg, "translator": {**cfg["translator"], "model": args.retranslator}}
        t_re, m_re, _ = augment({**cfg, "retranslate": ["pt"]}, args.workers, root, "retranslate")
        results["retranslate"] = {
            "seconds": round(t_re, 1),
            "share_of_full": round(t_re / t_full, 3),
            "units": m_re["this_run"]["units"],
            "model_calls": model_calls(m_re["metrics"]),
            "translators": m_re["translators"],
        }
    md = markdown(results, models.get("kind", "?"), args.workers)
    write_results(
        "incremental" if not args.quick else "incremental-quick",
        "Incremental augmentation: resume, add a language, add images, retranslate",
        results,
        md,
    )


def markdown(r: dict[str, Any], kind: str, workers: int) -> str:
    f, k, lang, add = r["full"], r["kill_and_resume"], r["add_language"], r["add_images"]
    rows = [
        "| run | seconds | share of full | captioner / CLIP / translator calls | target |",
        "|---|---:|---:|---|---|",
        f"| full ({r['images'] * 9 // 10} images, pt; {f['units']} units) | {f['seconds']} | 1 | "
        f"{f['model_calls']['caption']} / {f['model_calls']['clip']} / "
        f"{f['model_calls']['translate']} | |",
        f"| resumed after kill -9 at half ({k['units_resumed']} units) | {k['seconds_resumed']} | "
        f"{k['share_of_full']} | {k['model_calls']['caption']} / {k['model_calls']['clip']} / "
        f"{k['model_calls']['translate']} | <= 0.55 |",
        f"| add a language (es) | {lang['seconds']} | {lang['share_of_full']} | "
        f"{lang['model_calls']['caption']} / {lang['model_calls']['clip']} / "
        f"{lang['model_calls']['translate']} | 0 captioner/CLIP calls; <= "
        f"{round(lang['translation_share_of_full'] + 0.1, 3)} |",
        f"| add 10% images ({add['rows_added']} rows) | {add['seconds']} | {add['share_of_full']} | "
        f"{add['model_calls']['caption']} / {add['model_calls']['clip']} / "
        f"{add['model_calls']['translate']} | <= 0.2 |",
    ]
    if re := r.get("retranslate"):
        rows.append(
            f"| retranslate pt with another translator ({re['units']} units) | {re['seconds']} "
            f"| {re['share_of_full']} | {re['model_calls']['caption']} / "
            f"{re['model_calls']['clip']} / {re['model_calls']['translate']} | "
            "0 captioner/CLIP calls |"
        )
    return (
        f"Incremental augmentation: {r['images']} world images, units of {r['unit_size']}, "
        f"{workers} local workers, models: {kind}\n\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    main()

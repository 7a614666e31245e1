"""Training-step benchmark on the full-size `xlm-roberta-base-ViT-B-32` architecture.

Random weights (open_clip's factory, pretrained=None, saved once as a safetensors checkpoint that
every config loads, as a user's run loads its base model); the HF text tower config is built
locally (XLMRobertaConfig with xlm-roberta-base's sizes), nothing is downloaded. Every config
returns freed memory to the OS, as the trainer does; every config but (a0) also prepares the
model as the trainer does (`training.trainer`, `training.frozen`: weights mapped from the
checkpoint, the frozen vocabulary table read from it a batch's rows at a time, the image tower
offloaded when embeddings replace it). Batch 32 (CAPIVARA's setting is LiT + LoRA r=8 on
query/value + gradient checkpointing), on CPU (or --device cuda):

  (a0) lit-lora@77    plain LiT + LoRA as open_clip trains it: the weights loaded into memory
                      (open_clip's loader, nothing mapped), images through the locked image
                      tower, LoRA text tower, captions padded to the context length (77)
  (a) lit-lora        (a0) prepared as babelcap's trainer prepares it (weights mapped, the
                      frozen vocabulary read from the file) and with its tokenizer for HF
                      towers: the padding past the batch's longest caption dropped
                      (`TrimmedTokenizer`; the same features and gradients,
                      tests/test_training.py)
  (b) +ckpt           (a) + gradient checkpointing
  (c) +embeddings     (b) + image embeddings read from shards (image tower offloaded)
  (d) lit-lora+embeddings  (a) + the embeddings of (c), no checkpointing: what the embeddings
                      alone do to a step's time (the speed target compares (d) with (a))

The memory target compares (c), babelcap's recipe, with (a0), plain LiT + LoRA; c/a (what
checkpointing and embeddings add once the padding is gone) is reported next to it.

Each configuration runs in its own subprocess so its peak memory is clean (peak RSS sampled
during the training steps; `torch.cuda.max_memory_allocated` on GPU; and the process's peak,
loading included, from VmHWM). Also: trainable parameters
as a % of the model, and the shard reader's rows/s against the rows/s training consumes.

    python bench/bench_training.py            # full: batch 32, 3 timed steps per config
    python bench/bench_training.py --quick    # smoke: batch 8, 1 timed step

The full run takes about 10 minutes on a quiet 2-core machine (5 configs, each loading the
367M-parameter model), the smoke about 4.

Writes bench/results/training.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "xlm-roberta-base-ViT-B-32"
# "@77": captions padded to the context length, as open_clip's tokenizer (and open_clip_train)
# give them; the others drop the padding past the batch's longest caption, as babelcap does.
PADDED = "lit-lora@77"
CONFIGS = (
    PADDED,
    "lit-lora",
    "lit-lora+ckpt",
    "lit-lora+ckpt+embeddings",
    "lit-lora+embeddings",
)
CONTEXT = 77  # open_clip pads every caption to the context length


class WordHashTokenizer:
    """Stand-in tokenizer (the real one needs the hub): words -> stable ids, padded to 77."""

    def __init__(self, vocab_size: int = 250002, context: int = CONTEXT) -> None:
        from types import SimpleNamespace

        self.vocab_size, self.context = vocab_size, context
        self.tokenizer = SimpleNamespace(pad_token_id=1)  # as an HF tokenizer says it

    def __call__(self, texts):
        import zlib

        import torch

        out = torch.ones(len(texts), self.context, dtype=torch.long)  # pad id 1
        for i, text in enumerate(texts):
            words = [5 + zlib.crc32(w.encode()) % (self.vocab_size - 6) for w in text.split()]
            ids = [0, *words[: self.context - 2], 2]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def tokenizer(padded: bool = False):
    """The stand-in, trimmed of padding past the longest caption as the trainer's tokenizer
    is for an HF tower (`babelcap.models.clip.TrimmedTokenizer`), unless `padded`."""
    from babelcap.models.clip import TrimmedTokenizer

    return WordHashTokenizer() if padded else TrimmedTokenizer(WordHashTokenizer())


def make_checkpoint() -> tuple[Path, Path]:
    """(text tower config folder, random-weight checkpoint): the full-size model built by
    open_clip's factory (pretrained=None), saved as a user's checkpoint would be."""
    from safetensors.torch import save_model
    from transformers import XLMRobertaConfig

    from babelcap.models.clip import load_clip

    text_dir = Path(tempfile.mkdtemp(prefix="bench-xlmr-"))
    # xlm-roberta-base's shape (XLMRobertaConfig's bare defaults are BERT-sized): no weights.
    XLMRobertaConfig(
        vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5
    ).save_pretrained(text_dir)
    bundle = load_clip(MODEL, text_tower=str(text_dir), pretrained_text=False, with_tokenizer=False)
    ckpt = text_dir / "open_clip_model.safetensors"
    save_model(bundle.model, str(ckpt))
    return text_dir, ckpt


def build_model(drop_image_tower: bool, text_dir: Path, ckpt: Path, plain: bool = False):
    """The model as the trainer prepares it: loaded from the checkpoint, weights mapped from it
    (`map_frozen_weights`), the image tower offloaded when embeddings replace it; `plain`: as
    open_clip loads it, nothing mapped."""
    from babelcap.models.clip import load_clip
    from babelcap.training.frozen import map_frozen_weights
    from babelcap.training.trainer import offload_image_tower

    bundle = load_clip(
        MODEL,
        pretrained=str(ckpt),
        text_tower=str(text_dir),
        pretrained_text=False,
        with_tokenizer=False,
    )
    if not plain:
        map_frozen_weights(bundle.model, ckpt)
    if drop_image_tower:
        offload_image_tower(bundle.model, keep=False)  # embeddings replace it entirely
    return bundle


def write_shards(out: Path, rows: int, embed_dim: int, image_px: int | None) -> list[str]:
    """Synthetic shards with captions + embeddings (and JPEG bytes when image_px is set)."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from babelcap.core import schema

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    jpeg = None
    if image_px:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8)).save(
            buf, "JPEG", quality=90
        )
        jpeg = buf.getvalue()
    records = []
    for i in range(rows):
        records.append(
            {
                "image_id": f"{i:064x}",
                "image": {"bytes": jpeg, "path": None} if jpeg else None,
                "captions": [
                    schema.caption(
                        f"uma foto de um objeto número {i} variante {k}",
                        "pt",
                        "translated",
                        source_index=0,
                        score=0.3,
                    )
                    for k in range(3)
                ],
                "embedding": rng.standard_normal(embed_dim).astype("float32").tolist(),
                "embedding_model": "bench-tower",
            }
        )
    path = out / "bench-00000.parquet"
    table = schema.rows_to_table(records).replace_schema_metadata(schema.file_metadata())
    pq.write_table(table, path, row_group_size=256)
    return [str(path)]


def reader_throughput(
    files: list[str], embeddings: bool, batch: int, preprocess=None, max_rows: int = 2048
) -> float:
    """Rows/s of the shard reader (one process): read, select caption, tokenise, collate."""
    from babelcap.training.data import CaptionSelection, ShardStream, StreamConfig, find_shards

    stream = ShardStream(
        find_shards(files),
        CaptionSelection(languages=("pt",)),
        StreamConfig(
            batch_size=batch,
            shuffle_buffer=512,
            use_embeddings=embeddings,
            expected_embedding_model="bench-tower" if embeddings else None,
        ),
        tokenizer(),
        preprocess,
    )
    start, rows = time.perf_counter(), 0
    for b in stream:
        rows += len(b["captions"])
        if rows >= max_rows:
            break
    return rows / (time.perf_counter() - start)


def vm_hwm() -> int:
    """The process's peak resident memory so far, in bytes (Linux VmHWM; 0 elsewhere)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(x.split()[1]) * 1024 for x in lines if x.startswith("VmHWM:")), 0)


class PeakRSS:
    """Sample the process RSS in a thread (peak during the timed region only)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, False

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join()


def run_one(config: str, batch: int, steps: int, device: str, text_dir: str, ckpt: str) -> dict:
    import open_clip  # noqa: F401  (the runtime every config pays, measured before any model)
    import psutil
    import torch
    import transformers  # noqa: F401

    from babelcap.models.clip import count_parameters
    from babelcap.training.config import MethodConfig
    from babelcap.training.frozen import read_embeddings_from_file
    from babelcap.training.lit import enable_grad_checkpointing
    from babelcap.training.methods import ClipMethod
    from babelcap.training.trainer import release_freed_memory

    release_freed_memory()  # as the trainer does (run.release_memory)
    runtime_rss = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    embeddings = config.endswith("embeddings")
    padded = config == PADDED
    bundle = build_model(embeddings, Path(text_dir), Path(ckpt), plain=padded)
    method = ClipMethod(
        MethodConfig(text_tower="lora", lora={"r": 8, "alpha": 8, "modules_to_save": ["proj"]})
    )
    model = method.setup(bundle.model)
    params = count_parameters(model)
    read_embeddings_from_file(model)  # as the trainer: the frozen vocabulary read from the file
    lora_only = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
    )
    if "ckpt" in config:
        enable_grad_checkpointing(model)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    method.train_mode(model)
    embed_dim = bundle.model_cfg["embed_dim"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    files = write_shards(
        tmp, rows=max(256, batch * (steps + 2)), embed_dim=embed_dim, image_px=None
    )
    if embeddings:
        from babelcap.training.data import CaptionSelection, ShardStream, StreamConfig, find_shards

        stream = iter(
            ShardStream(
                find_shards(files),
                CaptionSelection(languages=("pt",)),
                StreamConfig(
                    batch_size=batch,
                    shuffle_buffer=256,
                    use_embeddings=True,
                    expected_embedding_model="bench-tower",
                ),
                tokenizer(padded),
                None,
            )
        )
        next_batch = lambda: next(stream)  # noqa: E731
    else:
        tok = tokenizer(padded)

        def next_batch():
            return {
                "images": torch.randn(batch, 3, 224, 224),
                "text": tok([f"uma foto de um objeto {i}" for i in range(batch)]),
                "captions": [""] * batch,
            }

    def step():
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next_batch().items()}
        loss, _ = method.loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (allocator, optimizer state)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = (time.perf_counter() - start) / steps
    result = {
        "config": config,
        "batch": batch,
        "steps": steps,
        "device": device,
        "step_s": elapsed,
        "train_rows_per_s": batch / elapsed,
        "peak_rss_mb": mem.peak / 2**20,
        "process_peak_mb": vm_hwm() / 2**20,  # loading included
        "runtime_rss_mb": runtime_rss / 2**20,  # python + torch + libraries, no model
        "model_and_training_mb": (mem.peak - runtime_rss) / 2**20,
        "total_params": params["total"],
        "trainable_params": params["trainable"],
        "trainable_percent": 100.0 * params["trainable"] / params["total"],
        "lora_params": lora_only,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if embeddings:
        result["reader_rows_per_s"] = reader_throughput(files, True, batch)
    else:
        # The image path's reader: JPEG decode + open_clip preprocessing (224px ViT-B-32).
        img_files = write_shards(tmp / "img", rows=512, embed_dim=embed_dim, image_px=256)
        result["reader_rows_per_s"] = reader_throughput(
            img_files, False, batch, bundle.preprocess_val, max_rows=512
        )
    return result


def markdown(results: list[dict]) -> str:
    base = results[0]
    lines = [
        "| config | step (s) | speed-up vs (a0) | rows/s trained | reader rows/s | "
        "peak RSS (MB) | vs (a0) | above runtime (MB) | vs (a0) | process peak (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['step_s']:.2f} | {base['step_s'] / r['step_s']:.2f}x | "
            f"{r['train_rows_per_s']:.1f} | {r['reader_rows_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {100 * r['peak_rss_mb'] / base['peak_rss_mb']:.0f}% | "
            f"{r['model_and_training_mb']:.0f} | "
            f"{100 * r['model_and_training_mb'] / base['model_and_training_mb']:.0f}% | "
            f"{r.get('process_peak_mb', 0):.0f} |"
        )
    lines.append("")
    lines.append(
        f"Trainable: {base['trainable_params']:,} of {base['total_params']:,} parameters "
        f"({base['trainable_percent']:.3f}%); LoRA alone {base['lora_params']:,} "
        "(CAPIVARA: ~300K)."
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 timed step")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "training.json"))
    args = parser.parse_args()
    batch = args.batch or (8 if args.quick else 32)
    steps = args.steps or (1 if args.quick else 3)
    if args.one:
        text_dir, ckpt = args.checkpoint
        print("RESULT " + json.dumps(run_one(args.one, batch, steps, args.device, text_dir, ckpt)))
        return 0
    # One random-weight checkpoint for every config, built in a process of its own.
    proc = subprocess.run(
        [sys.executable, "-c", "import bench_training as b; print(*b.make_checkpoint())"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    )
    text_dir, ckpt = proc.stdout.split()[-2:]
    results = []
    for config in CONFIGS:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                config,
                "--batch",
                str(batch),
                "--steps",
                str(steps),
                "--device",
                args.device,
                "--checkpoint",
                text_dir,
                ckpt,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"config {config} failed")
        results.append(json.loads(line[7:]))
        print(
            f"{config}: {results[-1]['step_s']:.2f}s/step, {results[-1]['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    shutil.rmtree(text_dir, ignore_errors=True)
    by = {r["config"]: r for r in results}
    a0, a = by[PADDED], by["lit-lora"]
    c, d = by["lit-lora+ckpt+embeddings"], by["lit-lora+embeddings"]
    summary = {
        "model": MODEL,
        "quick": args.quick,
        "results": results,
        # The "plain LiT + LoRA" is (a0): captions padded to 77 as open_clip gives
        # them. (a) already has babelcap's trimmed padding, so c/a is what checkpointing and
        # embeddings add on top of it.
        "memory_ratio_c_over_a0": c["peak_rss_mb"] / a0["peak_rss_mb"],
        "memory_ratio_c_over_a": c["peak_rss_mb"] / a["peak_rss_mb"],
        "memory_above_runtime_ratio_c_over_a0": c["model_and_training_mb"]
        / a0["model_and_training_mb"],
        "memory_above_runtime_ratio_c_over_a": c["model_and_training_mb"]
        / a["model_and_training_mb"],
        "speedup_c_over_a": a["step_s"] / c["step_s"],
        "speedup_d_over_a": a["step_s"] / d["step_s"],
        "speedup_a_over_a0": a0["step_s"] / a["step_s"],
        "targets": {
            "memory_ratio_c_over_a0<=0.5": c["peak_rss_mb"] / a0["peak_rss_mb"] <= 0.5,
            "memory_ratio_c_over_a<=0.5": c["peak_rss_mb"] / a["peak_rss_mb"] <= 0.5,
            "speedup_d_over_a>=1.25": a["step_s"] / d["step_s"] >= 1.25,
            "reader_not_bottleneck": all(
                r["reader_rows_per_s"] > r["train_rows_per_s"] for r in results
            ),
        },
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "title": "Training step: LiT + LoRA on the full-size xlm-roberta-base-ViT-B-32 "
        "(CPU, batch 32)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    md = markdown(results)
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps(summary["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

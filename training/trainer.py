"""The trainer: one loop for every method (CAPIVARA LiT+LoRA, full training, plugin methods).

It trains the method it is given (an instance, or a factory called with the method config,
rank and world size); on its own it builds only the CLIP method (`clip`, `capivara`). Methods
by name and multi-stage runs are `training.runs` (`run(cfg)` is what `babelcap train` runs);
this module imports no method but `ClipMethod` and no driver.

AdamW + cosine schedule with warmup, gradient accumulation and clipping, autocast (bf16/fp16 on
GPU), gradient checkpointing, a tqdm bar (loss / lr / throughput), metrics JSONL and a curve
PNG, safetensors checkpoints with optimizer state, and exact resume (same data order onward).

Several processes (GPUs, or CPU with gloo): launch the same command with `torchrun
--nproc_per_node N -m babelcap.cli train ...`. Each rank reads its own streams of row groups
(`data.streams`, `training.data`), DDP averages the gradients and `ClipLoss` gathers the features
of every rank with their gradients, so a step is the single-process step on the global batch;
rank 0 alone writes checkpoints, metrics and exports.

On CPU the frozen weights are mapped from the checkpoint and a frozen vocabulary table is read
from it a batch's rows at a time (`training.frozen`). With cached image embeddings (a fully
locked image tower) the image tower is offloaded for the whole run (its memory freed; its
weights found again in that checkpoint, or a temporary copy) and put back before the export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from babelcap.core.devices import resolve_device
from babelcap.core.near_duplicates import Fingerprints
from babelcap.core.shards import ShardSet, find_shards
from babelcap.models.clip import (
    ClipBundle,
    count_parameters,
    image_tower_id,
    load_clip,
    unwrap,
    visual_tower_id,
)
from babelcap.training.config import MethodConfig, TrainConfig
from babelcap.training.contamination import INDEX_FILE, index_training_images, load_run_index
from babelcap.training.data import (
    CaptionSelection,
    ShardStream,
    StreamConfig,
    detect_embeddings,
    make_loader,
    split_counts,
)
from babelcap.training.frozen import (
    MAPPED_FROM,
    map_frozen_weights,
    put_back,
    read_embeddings_from_file,
)
from babelcap.training.lit import enable_grad_checkpointing, image_tower_locked, is_peft_text
from babelcap.training.methods import CLIP_METHOD_NAMES, ClipMethod

log = logging.getLogger(__name__)

# Builds a method from (method config, rank, world size): a method class, or
# `training.runs.build_method` (any registered method by name).
MethodFactory = Callable[[MethodConfig, int, int], ClipMethod]
MethodArg = ClipMethod | MethodFactory | None

CKPT_DIR = "checkpoints"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    samples: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def launched_world_size() -> int:
    """How many processes the launcher (torchrun) started for this run (1: not distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / accelerate's environment."""
    world_size = launched_world_size()
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases and the logit scale (open_clip's convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (
            p.ndim < 2
            or "bn" in name
            or "ln" in name
            or "bias" in name
            or "logit_scale" in name
            or "LayerNorm" in name
        )
        (no_decay if exclude else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def release_freed_memory() -> bool:
    """Make freed tensor memory go back to the OS (glibc): large blocks are always mmap'ed, so
    the transient activations of a step leave no retained heap behind and the process's memory
    is what training holds (glibc otherwise raises its mmap threshold to the largest block
    freed and keeps such blocks, a step's activations, in the heap). False where not glibc."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 256 * 1024) == 1
    return ok and libc.mallopt(m_trim_threshold, 1024 * 1024) == 1


class OffloadedTower(torch.nn.Module):
    """Stands in for an image tower a run does not need (it trains on cached embeddings)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "the image tower is offloaded: this run trains on the shards' cached image "
            "embeddings (data.embeddings=never reads images instead)"
        )


@dataclass
class Offloaded:
    """An offloaded image tower (its parameters on the meta device) and where its weights are:
    the checkpoint they were mapped from (`keys`: tower name -> key there) or a temporary copy
    (`copy`); neither when the tower is not to come back (ranks other than 0)."""

    visual: torch.nn.Module
    copy: Path | None = None
    checkpoint: str | None = None
    keys: dict[str, str] | None = None


def offload_image_tower(model: torch.nn.Module, keep: bool = True) -> Offloaded:
    """Replace `model.visual` by an `OffloadedTower` and free the tower's memory. With `keep`
    its weights stay findable: in the checkpoint they were mapped from (`map_frozen_weights`),
    else in a temporary safetensors copy written first."""
    visual = model.visual
    offloaded = Offloaded(visual)
    if keep:
        state = visual.state_dict(keep_vars=True)
        sources = {name: getattr(t, MAPPED_FROM, None) for name, t in state.items()}
        checkpoints_ = {s[0] for s in sources.values() if s is not None}
        if None not in sources.values() and len(checkpoints_) == 1:
            # Read back from the file at the end: copying it now would make the mapped pages
            # resident for the whole run (and write the tower to disk for nothing).
            offloaded.checkpoint = checkpoints_.pop()
            offloaded.keys = {name: s[1] for name, s in sources.items()}
        else:
            fd, name = tempfile.mkstemp(prefix="babelcap-image-tower-", suffix=".safetensors")
            os.close(fd)
            offloaded.copy = Path(name)
            save_file({k: v.detach().contiguous() for k, v in state.items()}, name)
    visual.to("meta")  # the weights' memory is released here
    model.visual = OffloadedTower()
    return offloaded


def restore_image_tower(
    model: torch.nn.Module, offloaded: Offloaded, device: torch.device, tower_id: str | None
) -> bool:
    """Put an offloaded tower back into `model` (False: it was not kept). With `tower_id`, its
    weights must hash to it: a checkpoint changed during the run is an error, not a new tower."""
    visual = offloaded.visual
    if offloaded.checkpoint is not None and offloaded.keys is not None:
        weights = load_file(offloaded.checkpoint)
        state = {name: weights[key] for name, key in offloaded.keys.items()}
    elif offloaded.copy is not None:
        state = load_file(str(offloaded.copy))
    else:
        return False
    visual.to_empty(device=device)
    visual.load_state_dict(state)
    del state
    if tower_id is not None and visual_tower_id(visual) != tower_id:
        raise RuntimeError(
            f"the image tower read back from {offloaded.checkpoint or offloaded.copy} is not "
            "the one this run started with: the file changed during the run"
        )
    model.visual = visual
    if offloaded.copy is not None:
        offloaded.copy.unlink(missing_ok=True)
    return True


def checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CKPT_DIR
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).exists())


class Trainer:
    """Build everything from a `TrainConfig` and run `fit()`.

    `method`: the method to train (an instance), or a factory called with (cfg.method, rank,
    world_size); None builds the CLIP method, for `method.name` clip / capivara only.
    """

    def __init__(
        self, cfg: TrainConfig, bundle: ClipBundle | None = None, method: MethodArg = None
    ) -> None:
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.rank, self.world_size, local_rank = init_distributed()
        self.device = torch.device(resolve_device(cfg.run.device, local_rank=local_rank))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)

        if cfg.run.release_memory:
            release_freed_memory()
        # The method first: a wrong method name or option fails before any model is loaded.
        self.method = self._build_method(method)
        if bundle is None:
            bundle = load_clip(
                cfg.model.name,
                cfg.model.pretrained,
                text_tower=cfg.model.text_tower,
                pretrained_text=cfg.model.pretrained_text,
            )
        self.bundle = bundle
        # Hashed before the weights are mapped: reading the whole tower would make its pages of
        # the mapped file resident for the run.
        self._tower_id = image_tower_id(bundle.model) if cfg.data.embeddings != "never" else None
        mapped = 0
        if cfg.run.release_memory and self.device.type == "cpu":
            mapped = map_frozen_weights(bundle.model, bundle.pretrained)
            log.info("%.0f MB of weights mapped from %s", mapped / 2**20, bundle.pretrained)
        model = self.method.setup(bundle.model)
        bundle.model = model
        locked = image_tower_locked(model)
        if cfg.run.grad_checkpointing and not self.method.grad_checkpointing_safe:
            log.warning(
                "gradient checkpointing is off: method %r switches modules within a batch "
                "(checkpointed layers would recompute through the wrong one)",
                cfg.method.name,
            )
        elif cfg.run.grad_checkpointing:
            enable_grad_checkpointing(model, image_tower=not locked)
        self.params = count_parameters(model)
        # Frozen vocabulary tables are read a batch's rows at a time (put back for the export).
        self._file_embeddings = read_embeddings_from_file(model) if mapped else []

        # Data: the embedding column replaces the image tower only when it is fully locked.
        self.shards = find_shards(cfg.data.train)
        self.splits = self._split_rows(cfg.data.splits)
        self.use_embeddings, why = self._embedding_mode(locked)
        log.info(
            "data: %d shard(s), %d rows; trains on %s%s; %s",
            len(self.shards.files),
            self.shards.num_rows,
            _counts(self.splits["trained"]),
            f", skips {_counts(self.splits['skipped'])}" if self.splits["skipped"] else "",
            "embeddings: " + why,
        )
        if self.rank == 0 and cfg.run.record_training_images:
            record_training_images(self.out, self.shards, cfg.data.splits, cfg.model.name)
        tower_id = self._tower_id if self.use_embeddings else None
        self._offloaded: Offloaded | None = None
        if self.use_embeddings:
            self._offload_image_tower(model)
        model.to(self.device)
        self.model: torch.nn.Module = model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

        data = cfg.data
        self.dataset = ShardStream(
            self.shards,
            CaptionSelection(
                languages=tuple(data.languages) if data.languages else None,
                origins=tuple(data.origins) if data.origins else None,
                min_score=data.min_score,
                top_k=data.top_k,
            ),
            StreamConfig(
                batch_size=data.batch_size,
                shuffle_buffer=data.shuffle_buffer,
                seed=cfg.run.seed,
                caption_mode=data.captions,
                use_embeddings=self.use_embeddings,
                expected_embedding_model=tower_id,
                image_root=data.image_root,
                with_source=data.with_source,
                drop_last=data.drop_last,
                splits=tuple(data.splits) if data.splits is not None else None,
                streams=data.streams,
            ),
            tokenizer=bundle.tokenizer,
            preprocess=bundle.preprocess_train if data.augment else bundle.preprocess_val,
            rank=self.rank,
            world_size=self.world_size,
        )

        opt = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(model, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps
        )
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, opt.warmup_steps, opt.max_steps
        )
        self.method.attach(self.optimizer, self.model)
        self.amp_dtype = autocast_dtype(cfg.run.precision, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.state = TrainState()
        self.resumed_from: Path | None = None
        if cfg.run.resume and checkpoints(self.out):
            self.load_checkpoint(checkpoints(self.out)[-1])

    # ------------------------------------------------------------------ setup helpers
    def _build_method(self, method: MethodArg) -> ClipMethod:
        if isinstance(method, ClipMethod):
            return method
        if method is None:
            name = self.cfg.method.name
            if name not in CLIP_METHOD_NAMES:
                raise ValueError(
                    f"method.name is {name!r}: the trainer builds only the CLIP method "
                    f"({', '.join(CLIP_METHOD_NAMES)}) itself; pass method= (a method or a "
                    "factory), or train with babelcap.training.runs (every method by name)"
                )
            method = ClipMethod
        return method(self.cfg.method, self.rank, self.world_size)

    def _split_rows(self, splits: list[str] | None) -> dict[str, dict[str, int]]:
        """Rows per split value, as trained on and as skipped by the split filter."""
        counts = split_counts(self.shards)
        trained = {k: n for k, n in counts.items() if splits is None or k in (*splits, "(none)")}
        skipped = {k: n for k, n in counts.items() if k not in trained}
        if not trained:
            raise ValueError(
                f"no rows of the splits {splits} in {self.cfg.data.train} (the shards hold "
                f"{_counts(counts)}); set data.splits to the ones to train on"
            )
        return {"trained": trained, "skipped": skipped}

    def _embedding_mode(self, locked: bool) -> tuple[bool, str]:
        mode = self.cfg.data.embeddings
        if mode == "never":
            return False, "not used (data.embeddings=never)"
        if not locked:
            if mode == "always":
                raise ValueError(
                    "data.embeddings=always needs a fully locked image tower "
                    "(method.image_tower=locked, unlocked_groups=0)"
                )
            return False, "not used (the image tower trains)"
        ok, why = detect_embeddings(self.shards, self._tower_id)
        if mode == "always" and not ok:
            raise ValueError(f"data.embeddings=always but {why}")
        return ok, why

    def _offload_image_tower(self, model: torch.nn.Module) -> None:
        """Free the image tower for the run (the embeddings replace it); rank 0 keeps where its
        weights are, to put it back for the export (`restore_model`)."""
        self._offloaded = offload_image_tower(model, keep=self.rank == 0)
        log.info("image tower offloaded (cached embeddings): its memory is free for training")

    def restore_model(self) -> None:
        """Make the model whole again (before exporting it): the offloaded image tower (rank 0)
        and the embedding tables read from the checkpoint during the run."""
        put_back(self._file_embeddings)
        if self._offloaded is not None:
            restore_image_tower(self.raw_model, self._offloaded, self.device, self._tower_id)
            self._offloaded = None

    @property
    def raw_model(self) -> torch.nn.Module:
        return unwrap(self.model)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        root = self.out / CKPT_DIR
        final = root / f"step-{self.state.step:07d}"
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {
            n: p.detach().cpu().contiguous().clone()
            for n, p in self.raw_model.named_parameters()
            if p.requires_grad
        }
        save_file(weights, str(tmp / WEIGHTS))
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "train_state": asdict(self.state),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "method": self.method.state_dict(),
            },
            tmp / STATE,
        )
        self.cfg.save(tmp / "config.yaml")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(self.out)[: -max(1, self.cfg.run.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        weights = load_file(str(path / WEIGHTS))
        params = dict(self.raw_model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing:
            raise ValueError(
                f"{path}: checkpoint lacks trainable parameters {missing[:5]}... "
                "(was it written with another method configuration?)"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["train_state"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.method.load_state_dict(state["method"])
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.state.step)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        max_steps, accum = cfg.optim.max_steps, max(1, cfg.optim.grad_accum)
        is_main = self.rank == 0
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
        metrics_path = self.out / "metrics.jsonl"
        from tqdm.auto import tqdm

        bar = tqdm(
            total=max_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            disable=not (cfg.run.progress and is_main),
            dynamic_ncols=True,
        )
        self.method.train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        window_loss, window_n, window_samples = 0.0, 0, 0
        window_start = time.perf_counter()
        last_loss = float("nan")
        micro = 0
        while self.state.step < max_steps:
            self.dataset.set_epoch(self.state.epoch, skip_batches=self.state.batch_in_epoch)
            loader = make_loader(self.dataset, cfg.data.num_workers, seed=cfg.run.seed)
            got = 0
            finished_epoch = True
            for batch in loader:
                got += 1
                if log.isEnabledFor(logging.DEBUG):  # which rows each rank trains on
                    log.debug(
                        "rank %d step %d batch %d image_ids %s",
                        self.rank,
                        self.state.step,
                        self.state.batch_in_epoch,
                        ",".join(batch["image_ids"]),
                    )
                batch = self._to_device(batch)
                micro += 1
                sync = micro % accum == 0
                ctx = (
                    self.model.no_sync()
                    if (self.world_size > 1 and not sync)
                    else contextlib.nullcontext()
                )
                with ctx:
                    with self._autocast():
                        loss, logs = self.method.loss(self.model, batch)
                    self.scaler.scale(loss / accum).backward()
                n = len(batch["captions"])
                self.state.batch_in_epoch += 1
                self.state.samples += n * self.world_size
                window_loss += float(loss.detach())
                window_n += 1
                window_samples += n * self.world_size
                if not sync:
                    continue
                if cfg.optim.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in self.raw_model.parameters() if p.requires_grad],
                        cfg.optim.grad_clip,
                    )
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                bar.update(1)
                step = self.state.step
                if step % cfg.run.log_every == 0 or step == max_steps:
                    elapsed = time.perf_counter() - window_start
                    last_loss = self._mean_over_ranks(window_loss / max(1, window_n))
                    row = {
                        "step": step,
                        "epoch": self.state.epoch,
                        "loss": last_loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                        "samples": self.state.samples,
                        **{k: v for k, v in logs.items() if k != "loss"},
                    }
                    bar.set_postfix(
                        loss=f"{last_loss:.3f}",
                        lr=f"{row['lr']:.2e}",
                        sps=f"{row['samples_per_s']:.0f}",
                    )
                    if is_main:
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    window_loss, window_n, window_samples = 0.0, 0, 0
                    window_start = time.perf_counter()
                if cfg.run.save_every and step % cfg.run.save_every == 0 and step < max_steps:
                    self.save_checkpoint()
                if step >= max_steps:
                    finished_epoch = False
                    break
            if got == 0 and self.state.batch_in_epoch == 0:
                raise ValueError(
                    f"no training batches: {self.shards.num_rows} rows give no full batch of "
                    f"{cfg.data.batch_size} with the caption selection (languages="
                    f"{cfg.data.languages}, origins={cfg.data.origins})"
                )
            if finished_epoch:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        bar.close()
        return self.finish(last_loss)

    def _mean_over_ranks(self, value: float) -> float:
        """The mean of a per-rank number (each rank's loss is that of its share of the batch)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def finish(self, last_loss: float) -> dict[str, Any]:
        ckpt = self.save_checkpoint()
        self.restore_model()
        summary: dict[str, Any] = {
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "samples": self.state.samples,
            "final_loss": last_loss,
            "parameters": self.params,
            "trainable_percent": 100.0 * self.params["trainable"] / max(1, self.params["total"]),
            "embeddings": self.use_embeddings,
            "splits": self.splits,
            "checkpoint": str(ckpt) if ckpt else None,
            "output_dir": str(self.out),
        }
        if self.rank == 0:
            if self.cfg.run.plot and (self.out / "metrics.jsonl").exists():
                from babelcap.training.plots import plot_training_curve

                plot_training_curve(self.out / "metrics.jsonl", self.out / "training_curve.png")
            if self.cfg.run.export:
                from babelcap.training.export import export_adapter, export_open_clip

                summary["export"] = (
                    str(export_open_clip(self.bundle, self.out / "export", model=self.raw_model))
                    if self.method.merged_export
                    else None
                )
                if is_peft_text(self.raw_model):
                    summary["adapter"] = str(export_adapter(self.raw_model, self.out / "adapter"))
                index = self.out / INDEX_FILE
                # The model carries what it was trained on, wherever it is copied
                # (`export` names the model's config file, `adapter` its folder).
                folders = [Path(summary[k]).parent for k in ("export",) if summary.get(k)]
                folders += [Path(summary["adapter"])] if summary.get("adapter") else []
                for folder in folders:
                    if index.is_file() and folder.resolve() != self.out.resolve():
                        shutil.copyfile(index, folder / INDEX_FILE)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {split}" for split, n in counts.items()) or "no rows"


def record_training_images(
    out: Path, shards: ShardSet, splits: list[str] | None, base_model: str
) -> Path:
    """Write `out/training_images.parquet`: the images of the rows this run trains on and those
    the base model's run recorded (a contamination check must see both)."""
    path = out / INDEX_FILE
    stamp = out / (INDEX_FILE + ".json")
    key = {"files": list(shards.files), "splits": splits, "base_model": base_model}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        return path  # a resumed run: already recorded
    out.mkdir(parents=True, exist_ok=True)
    index = index_training_images(shards, splits)
    base = load_run_index(base_model) if Path(base_model).exists() else None
    if base is not None:
        index = Fingerprints.concat([base, index])
    index.save(path)
    stamp.write_text(json.dumps(key))
    log.info("recorded %d training images in %s", len(index), path)
    return path


def train(
    cfg: TrainConfig, bundle: ClipBundle | None = None, method: MethodArg = None
) -> dict[str, Any]:
    """Train from a config; returns the run summary (also written to output_dir/summary.json).

    `method` as for `Trainer` (None: the CLIP method); `training.runs.train` builds any
    registered method by name."""
    summary = Trainer(cfg, bundle=bundle, method=method).fit()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 exports before anyone leaves
        dist.destroy_process_group()
    return summary

"""Multi-process training: `babelcap train` under torchrun (2 CPU processes, gloo) against one
process with the same global batch and seed; disjoint data per rank; rank 0 alone writes; SIGKILL
and resume (under `accelerate launch`); the modes that cannot run distributed say so."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from babelcap.core.shards import find_shards
from babelcap.training.config import TrainConfig
from babelcap.training.data import CaptionSelection, ShardStream, StreamConfig
from babelcap.training.trainer import WEIGHTS, checkpoints
from babelcap.world.shards import write_world_shards

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 6
# Two processes each computing half the batch (gradients all-reduced, features gathered) equal
# one process on the whole batch up to float32 summation order (measured: 3e-8 after 6 steps).
ATOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(world_models) -> Path:
    return world_models("clip-base")["clip-base"]


@pytest.fixture(scope="module")
def text_dir(model_dir, tmp_path_factory) -> Path:
    """The base CLIP's text tower without dropout (`model.text_tower`): two processes draw other
    dropout masks than one, so only a deterministic forward can give the same weights."""
    text = tmp_path_factory.mktemp("text-no-dropout") / "text"
    shutil.copytree(model_dir / "text", text)
    config = json.loads((text / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (text / "config.json").write_text(json.dumps(config))
    return text


@pytest.fixture(scope="module")
def shards(world_dir, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("dist-shards")
    files = write_world_shards(
        world_dir, out, ["en", "pt"], split="train", rows_per_shard=160, row_group_size=16
    )
    return [str(p) for p in files]


def _config(model_dir: Path, text_dir: Path, shards: list[str], out: Path, **method) -> dict:
    return {
        "model": {"name": str(model_dir), "text_tower": str(text_dir)},
        "data": {
            "train": shards,
            "languages": ["pt"],
            "origins": ["gold"],
            "batch_size": 16,
            "streams": 2,
            "shuffle_buffer": 16,
            "embeddings": "never",
        },
        "method": {"lora": {"r": 4, "alpha": 8}, **method},
        "optim": {"lr": 2e-3, "warmup_steps": 1, "max_steps": STEPS},
        "run": {
            "output_dir": str(out),
            "device": "cpu",
            "threads": 1,
            "progress": False,
            "plot": False,
            "log_every": 1,
            "save_every": 2,
            "keep_checkpoints": 10,
            "seed": 5,
        },
    }


def _write_config(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def _torchrun(config: Path) -> list[str]:
    # Rank 0 may write files; any other rank may not write a file past 1 KiB (`ulimit -f 1`: the
    # write fails and the process dies; libraries probe the temp dir with a few bytes), so "rank
    # 0 alone writes" checkpoints, configs, summaries and exports is checked for real (a metrics
    # line, shorter, would show as a line too many).
    # The ranks' logs go to torchrun's own output (pipes), each line naming its rank.
    script = (
        'if [ "$RANK" != 0 ]; then ulimit -f 1; fi; '
        f'exec {sys.executable} -m babelcap.cli -v train --config "$0"'
    )
    return [
        str(TORCHRUN),
        "--standalone",  # a free port of its own: tests may run side by side
        "--nproc_per_node",
        "2",
        "--no-python",
        "bash",
        "-c",
        script,
        str(config),
    ]


def _run(cmd: list[str]) -> str:
    """Run to the end; the combined output (every rank's log lines), checked for success."""
    proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out


def _rank_batches(logs: str) -> dict[int, dict[tuple[int, int], list[str]]]:
    """Per rank: (step, batch) -> the image ids it trained on, from the ranks' debug log lines."""
    pattern = re.compile(r"rank (\d+) step (\d+) batch (\d+) image_ids (\S+)")
    out: dict[int, dict[tuple[int, int], list[str]]] = {}
    for m in pattern.finditer(logs):
        rank, step, batch = int(m[1]), int(m[2]), int(m[3])
        out.setdefault(rank, {})[(step, batch)] = m[4].split(",")
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoints(run)[-1] / WEIGHTS))


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def test_streams_give_the_same_global_batches_on_any_number_of_ranks(shards):
    """Data alone: rank 0's and rank 1's batches, side by side, are the one-process batches."""

    def batches(rank: int, world: int) -> list[list[str]]:
        stream = ShardStream(
            find_shards(shards),
            CaptionSelection(languages=("pt",), origins=("gold",)),
            StreamConfig(batch_size=16, shuffle_buffer=16, seed=1, streams=2),
            None,
            lambda pil: torch.zeros(1),
            rank=rank,
            world_size=world,
        )
        stream.set_epoch(0)
        return [b["image_ids"] for b in stream]

    one = batches(0, 1)
    r0, r1 = batches(0, 2), batches(1, 2)
    assert len(one) == len(r0) == len(r1) >= 15  # 320 rows, 16 a batch, streams of uneven size
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
    ids0 = {i for b in r0 for i in b}
    ids1 = {i for b in r1 for i in b}
    assert ids0 and ids1 and not ids0 & ids1
    with pytest.raises(ValueError, match=r"multiple of data\.streams"):
        ShardStream(
            find_shards(shards),
            CaptionSelection(),
            StreamConfig(batch_size=15, streams=2),
            None,
            None,
        )


@pytest.fixture(scope="module")
def runs(model_dir, text_dir, shards, tmp_path_factory) -> dict[str, Path | str]:
    """One process (the plain CLI) and two (torchrun), the same config: run folders and logs."""
    root = tmp_path_factory.mktemp("runs")
    out: dict[str, Path | str] = {}
    for name in ("single", "ddp"):
        config = _write_config(
            _config(model_dir, text_dir, shards, root / name), root / f"{name}.yaml"
        )
        cmd = (
            [sys.executable, "-m", "babelcap.cli", "-v", "train", "--config", str(config)]
            if name == "single"
            else _torchrun(config)
        )
        out[f"{name}-logs"] = _run(cmd)
        out[name] = root / name
    return out


def test_two_processes_train_the_same_weights_as_one(runs):
    single, ddp = _weights(runs["single"]), _weights(runs["ddp"])
    assert single.keys() == ddp.keys() and any("lora_" in k for k in single)
    start = {}
    for name in single:
        diff = (single[name] - ddp[name]).abs().max().item()
        assert diff <= ATOL, (name, diff)
        start[name] = single[name]
    # The weights moved: equal because both trained the same way, not because neither trained.
    lora_b = [v for k, v in single.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 1e-4 for v in lora_b)
    summary = json.loads((runs["ddp"] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["samples"] == STEPS * 16
    # The logged loss is the mean over ranks: the one-process loss of the global batch.
    for a, b in zip(
        (runs["single"] / "metrics.jsonl").read_text().splitlines(),
        (runs["ddp"] / "metrics.jsonl").read_text().splitlines(),
        strict=True,
    ):
        assert json.loads(a)["loss"] == pytest.approx(json.loads(b)["loss"], abs=1e-4)


def test_each_rank_reads_its_own_share_of_the_global_batch(runs):
    ranks = _rank_batches(runs["ddp-logs"])
    single = _rank_batches(runs["single-logs"])[0]
    assert sorted(ranks) == [0, 1]
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(single)
    assert len(single) == STEPS
    for key, ids in single.items():
        assert ranks[0][key] + ranks[1][key] == ids  # rank 0's half, then rank 1's
        assert len(ranks[0][key]) == len(ranks[1][key]) == 8
    seen0 = {i for ids in ranks[0].values() for i in ids}
    seen1 = {i for ids in ranks[1].values() for i in ids}
    assert len(seen0) == len(seen1) == STEPS * 8 and not seen0 & seen1


def test_rank_zero_alone_writes(runs):
    # Rank 1 ran with `ulimit -f 1` (a file write past 1 KiB would have killed it), the metrics
    # hold one line a step (compared line by line with one process's above), and the run's
    # folder holds what one process writes: checkpoints, metrics, export, adapter, summary.
    assert _files(runs["ddp"]) == _files(runs["single"])
    assert (runs["ddp"] / "export").is_dir() and (runs["ddp"] / "adapter").is_dir()
    assert [p.name for p in checkpoints(runs["ddp"])] == [
        f"step-{s:07d}" for s in range(2, STEPS + 1, 2)
    ]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (torchrun starts each worker in a session of its own)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def _accelerate(config: Path) -> list[str]:
    """`accelerate launch` as the README gives it (torchrun underneath; on CPU too)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2"]
    return [*launch, "-m", "babelcap.cli", "-v", "train", "--config", str(config)]


def test_killed_two_process_run_resumes_under_accelerate_to_the_same_weights(
    runs, model_dir, text_dir, shards, tmp_path
):
    """SIGKILL a torchrun run after its first checkpoint, then go on with `accelerate launch`:
    the resumed ranks train the uninterrupted run's batches and end at its weights (one launch
    checks both resuming and accelerate: every launch costs two processes' imports)."""
    out = tmp_path / "killed"
    config = _write_config(_config(model_dir, text_dir, shards, out), tmp_path / "run.yaml")
    proc = subprocess.Popen(
        _torchrun(config),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while not checkpoints(out) and proc.poll() is None:
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    done = [p.name for p in checkpoints(out)]
    assert done and done[-1] != f"step-{STEPS:07d}" and not (out / "summary.json").exists(), (
        f"the run was not interrupted (checkpoints {done})"
    )
    logs = _run(_accelerate(config))
    assert "resumed from" in logs
    resumed_batches, whole_batches = _rank_batches(logs), _rank_batches(runs["ddp-logs"])
    assert sorted(resumed_batches) == [0, 1]  # two ranks, each on its own half
    for rank, batches in resumed_batches.items():
        assert batches and all(batches[key] == whole_batches[rank][key] for key in batches)
    resumed, whole = _weights(out), _weights(runs["ddp"])
    for name, value in whole.items():
        assert torch.allclose(resumed[name], value, rtol=0, atol=1e-6), name


@pytest.mark.parametrize(
    "method,message",
    [
        (
            {"name": "continual", "options": {"languages": ["pt"]}},
            "continual learning runs in one process",
        ),
        (
            {"name": "alignment", "options": {"adapters": "per_language", "languages": ["pt"]}},
            "per-language adapters train in one process",
        ),
    ],
)
def test_modes_that_cannot_run_distributed_say_so(
    method, message, model_dir, text_dir, shards, tmp_path
):
    out = tmp_path / "run"
    data = _config(model_dir, text_dir, shards, out)
    data["method"].update(method)
    config = _write_config(data, tmp_path / "run.yaml")
    proc = subprocess.run(
        _torchrun(config), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.returncode != 0
    assert message in proc.stdout.decode(errors="replace")
    assert not checkpoints(out)


def test_per_language_adapters_refuse_a_launch_before_loading_anything(tmp_path, monkeypatch):
    """The driver checks the launch first: nothing here exists, so any loading would fail
    with another error (the method checks again, for a Trainer built without the driver)."""
    from babelcap.training.alignment_driver import run_alignment
    from babelcap.training.config import TrainConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    missing = tmp_path / "missing"
    data = _config(missing / "model", missing / "text", [str(missing / "a.parquet")], tmp_path)
    data["method"].update(
        {"name": "alignment", "options": {"adapters": "per_language", "languages": ["pt"]}}
    )
    with pytest.raises(ValueError, match="per-language adapters train in one process"):
        run_alignment(TrainConfig.from_dict(data))


def test_train_config_knows_streams():
    cfg = TrainConfig.from_dict({"data": {"streams": 4}})
    assert cfg.data.streams == 4
    with pytest.raises(Exception, match="streams"):
        TrainConfig.from_dict({"data": {"streams": 0}})


def test_cached_embeddings_offload_the_image_tower_and_export_restores_it(
    model_dir, shards, tmp_path
):
    """Memory target: with the shards' image embeddings a LiT step never holds the image tower
    (freed for the run, `OffloadedTower` in its place); the export has it back, unchanged."""
    from babelcap.models.clip import load_clip
    from babelcap.training.embeddings import embed_shards
    from babelcap.training.trainer import OffloadedTower, Trainer

    bundle = load_clip(str(model_dir))
    visual = {k: v.clone() for k, v in bundle.model.visual.state_dict().items()}
    embedded = [str(p) for p in embed_shards(bundle, shards, tmp_path / "emb")]
    data = _config(model_dir, model_dir / "text", embedded, tmp_path / "run")
    data["data"].update(embeddings="always", streams=None)
    data["optim"]["max_steps"] = 2
    trainer = Trainer(TrainConfig.from_dict(data), bundle=load_clip(str(model_dir)))
    assert trainer.use_embeddings
    assert isinstance(trainer.raw_model.visual, OffloadedTower)
    assert not list(trainer.raw_model.visual.parameters())
    offloaded = trainer._offloaded.visual
    assert all(p.device.type == "meta" for p in offloaded.parameters())  # memory released
    with pytest.raises(RuntimeError, match="offloaded"):
        trainer.raw_model.encode_image(torch.zeros(1, 3, 64, 64))
    summary = trainer.fit()
    assert summary["embeddings"] and summary["export"]
    assert trainer.raw_model.visual is offloaded
    exported = load_clip(str(Path(summary["export"]).parent)).model.visual.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in visual.items())

"""Frozen weights without memory of their own (`training.frozen`): a frozen vocabulary table is
read from its checkpoint a batch's rows at a time, with the table's own output; training with it
learns exactly what training with the table in memory learns; the offloaded image tower comes
back from the checkpoint it was mapped from (no copy written), and only if it is unchanged.

What it saves is measured by `bench/bench_training.py`, not asserted here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from babelcap.training.config import TrainConfig
from babelcap.training.frozen import (
    FileRowsEmbedding,
    map_frozen_weights,
    put_back,
    read_embeddings_from_file,
)


class Tower(torch.nn.Module):
    def __init__(self, rows: int = 3000, dim: int = 24, dtype=torch.float32) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(rows, dim, padding_idx=1, dtype=dtype)
        self.proj = torch.nn.Linear(dim, 4, dtype=dtype)

    def get_input_embeddings(self) -> torch.nn.Module:  # as an HF model names its vocabulary
        return self.words

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.words(ids))


def _mapped(tmp_path: Path, dtype=torch.float32) -> tuple[Tower, Tower, Path]:
    torch.manual_seed(0)
    reference = Tower(dtype=dtype)
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(ckpt))
    model = Tower(dtype=dtype)
    model.load_state_dict(load_file(str(ckpt)))
    assert map_frozen_weights(model, ckpt) > 0
    model.words.weight.requires_grad_(False)
    return reference, model, ckpt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_table_is_read_from_the_file_with_the_tables_output(tmp_path, dtype):
    reference, model, _ = _mapped(tmp_path, dtype)
    table = model.words
    swapped = read_embeddings_from_file(model)
    assert isinstance(model.words, FileRowsEmbedding) and len(swapped) == 1
    assert model.proj.weight.requires_grad  # only the frozen table is swapped
    ids = torch.tensor([[5, 6, 7, 2999, 0], [7, 7, 1, 1500, 6]])  # runs, repeats, both ends
    assert torch.equal(model(ids), reference(ids))
    assert torch.equal(model.words(ids[:0]), reference.words(ids[:0]))  # an empty batch
    with pytest.raises(IndexError):
        model.words(torch.tensor([3000]))
    with pytest.raises(IndexError):
        model.words(torch.tensor([-1]))
    put_back(swapped)
    assert model.words is table and not swapped


def test_only_frozen_tables_mapped_from_that_file_are_swapped(tmp_path):
    _, model, ckpt = _mapped(tmp_path)
    model.words.weight.requires_grad_(True)  # a growing vocabulary trains its table
    assert read_embeddings_from_file(model) == []
    unmapped = Tower()
    unmapped.words.weight.requires_grad_(False)
    assert read_embeddings_from_file(unmapped) == []
    # A frozen table that is not the vocabulary (positions: read whole every step) stays.
    model.words.weight.requires_grad_(False)
    model.get_input_embeddings = lambda: None
    assert read_embeddings_from_file(model) == []
    del model.get_input_embeddings
    # The file no longer holds the table as it was mapped: nothing is read from it.
    model.words.weight.requires_grad_(False)
    save_file({"words.weight": torch.zeros(10, 24)}, str(tmp_path / "other.safetensors"))
    os.replace(tmp_path / "other.safetensors", ckpt)
    assert read_embeddings_from_file(model) == []


def test_a_truncated_file_is_an_error_not_zeros(tmp_path):
    _, model, ckpt = _mapped(tmp_path)
    read_embeddings_from_file(model)
    with open(ckpt, "r+b") as f:
        f.truncate(ckpt.stat().st_size // 2)
    with pytest.raises(OSError, match="truncated"):
        model.words(torch.tensor([2990]))


@pytest.fixture(scope="module")
def model_dir(world_models) -> Path:
    return world_models("clip-base")["clip-base"]


@pytest.fixture(scope="module")
def shards(world_dir, tmp_path_factory) -> list[str]:
    from babelcap.world.shards import write_world_shards

    out = tmp_path_factory.mktemp("memory-shards")
    return [str(p) for p in write_world_shards(world_dir, out, ["en", "pt"], split="train")]


def _config(model: Path, shards: list[str], out: Path, **run) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"name": str(model)},
            "data": {
                "train": shards,
                "languages": ["pt"],
                "origins": ["gold"],
                "batch_size": 16,
                "shuffle_buffer": 16,
                "embeddings": "never",
            },
            "method": {"lora": {"r": 4, "alpha": 8}},
            "optim": {"lr": 2e-3, "warmup_steps": 1, "max_steps": 3},
            "run": {
                "output_dir": str(out),
                "device": "cpu",
                "threads": 1,
                "progress": False,
                "plot": False,
                "seed": 3,
                **run,
            },
        }
    )


def test_training_on_the_file_read_table_learns_what_the_table_in_memory_learns(
    model_dir, shards, tmp_path
):
    from babelcap.training.trainer import Trainer

    mapped = Trainer(_config(model_dir, shards, tmp_path / "mapped"))
    readers = [m for m in mapped.raw_model.modules() if isinstance(m, FileRowsEmbedding)]
    assert len(readers) == 1  # the text tower's word embeddings
    assert readers[0].path == str(model_dir / "open_clip_model.safetensors")
    summary = mapped.fit()
    assert not any(isinstance(m, FileRowsEmbedding) for m in mapped.raw_model.modules())
    copied = Trainer(_config(model_dir, shards, tmp_path / "copied", release_memory=False))
    assert not any(isinstance(m, FileRowsEmbedding) for m in copied.raw_model.modules())
    baseline = copied.fit()

    def trained(s: dict) -> dict[str, torch.Tensor]:
        return load_file(str(Path(s["checkpoint"]) / "trainable.safetensors"))

    a, b = trained(summary), trained(baseline)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The export is whole: the table is back in it, unchanged.
    exported, base = load_file(summary["export"]), load_file(baseline["export"])
    assert exported.keys() == base.keys()
    assert all(torch.equal(exported[k], base[k]) for k in base)


def test_an_offloaded_tower_comes_back_from_its_checkpoint_only_if_unchanged(
    model_dir, shards, tmp_path, monkeypatch
):
    import tempfile

    from babelcap.models.clip import load_clip
    from babelcap.training.embeddings import embed_shards
    from babelcap.training.trainer import Trainer

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    embedded = [str(p) for p in embed_shards(load_clip(str(model)), shards, tmp_path / "emb")]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def trainer(out: str) -> Trainer:
        cfg = _config(model, embedded, tmp_path / out).model_dump()
        cfg["data"].update(embeddings="always", streams=None)
        cfg["optim"]["max_steps"] = 1
        return Trainer(TrainConfig.from_dict(cfg))

    ckpt = model / "open_clip_model.safetensors"
    run = trainer("good")
    assert run._offloaded.checkpoint == str(ckpt)
    assert not list(scratch.iterdir())  # no copy of the tower written
    visual = load_file(str(ckpt))
    exported = load_file(run.fit()["export"])
    tower = {k: v for k, v in visual.items() if k.startswith("visual.")}
    assert tower and all(torch.equal(exported[k], v) for k, v in tower.items())

    # The checkpoint replaced during a run: the tower read back is not the run's. An error.
    run = trainer("changed")
    changed = {k: v.clone() for k, v in visual.items()}
    key = next(k for k in changed if k.startswith("visual.") and changed[k].ndim == 2)
    changed[key] += 1.0
    save_file(changed, str(tmp_path / "new.safetensors"), metadata={"format": "pt"})
    os.replace(tmp_path / "new.safetensors", ckpt)
    with pytest.raises(RuntimeError, match="changed during the run"):
        run.fit()
    assert json.loads((model / "open_clip_config.json").read_text())  # the user's files stay

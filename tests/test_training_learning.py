"""Learning test: LiT + LoRA on gold Portuguese captions makes the English-only base CLIP
retrieve in Portuguese (mean recall on the world's test split rises far above the base's)."""

from __future__ import annotations

import pytest

from babelcap.models.clip import load_clip
from babelcap.training.config import TrainConfig
from babelcap.training.eval_data import load_eval_data
from babelcap.training.evaluate import evaluate
from babelcap.training.trainer import train
from babelcap.world.shards import write_world_shards

pytestmark = pytest.mark.slow


def test_lit_lora_on_portuguese_raises_portuguese_recall(world_dir, world_models, tmp_path):
    base_dir = world_models("clip-base")["clip-base"]
    data = load_eval_data(f"world:{world_dir}", ["en", "pt"], "test")
    before = evaluate(load_clip(str(base_dir)), data, name="base", zero_shot=False)

    shards = write_world_shards(world_dir, tmp_path / "shards", ["en", "pt"], split="train")
    cfg = TrainConfig.from_dict(
        {
            "model": {"name": str(base_dir)},
            "data": {
                "train": [str(p) for p in shards],
                "languages": ["pt"],
                "origins": ["gold"],
                "batch_size": 64,
                "shuffle_buffer": 256,
            },
            "method": {
                "image_tower": "locked",
                "text_tower": "lora",
                "lora": {"r": 8, "alpha": 16, "modules_to_save": ["proj"]},
            },
            "optim": {"lr": 3e-3, "warmup_steps": 10, "max_steps": 120, "weight_decay": 0.0},
            "run": {
                "output_dir": str(tmp_path / "run"),
                "progress": False,
                "seed": 0,
                "log_every": 20,
            },
        }
    )
    summary = train(cfg)
    assert summary["parameters"]["trainable"] < 0.1 * summary["parameters"]["total"]
    after = evaluate(
        load_clip(summary["export"].rsplit("/", 1)[0]), data, name="lit-lora", zero_shot=False
    )
    pt_before = before["languages"]["pt"]["mean_recall"]
    pt_after = after["languages"]["pt"]["mean_recall"]
    print(
        f"pt mean recall {pt_before:.1f} -> {pt_after:.1f}; en "
        f"{before['languages']['en']['mean_recall']:.1f} -> "
        f"{after['languages']['en']['mean_recall']:.1f}"
    )
    assert pt_after >= pt_before + 15.0
    assert pt_after >= 0.6 * before["languages"]["en"]["mean_recall"]

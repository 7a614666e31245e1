"""The demo end to end on the test world: Beam augmentation, LiT+LoRA, evaluation, report."""

from __future__ import annotations

import json

import pytest

from babelcap.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_demo_teaches_portuguese_and_writes_a_report(tmp_path, world_dir, world_models):
    world_models("captioner", "m2m-multi", "clip-base")
    (tmp_path / "world").symlink_to(world_dir, target_is_directory=True)
    info = json.loads((world_dir / "world.json").read_text())
    cfg = DemoConfig(
        out=str(tmp_path),
        images=info["n_images"],
        seed=info["seed"],
        languages=("pt", "hi"),
        num_captions=3,
        train_steps=80,
        eval_languages=("en", "pt"),
        examples=2,
    )
    out = run_demo(cfg)

    results = out["results"]
    base, after = results["base"]["languages"], results["capivara"]["languages"]
    # Learning, measured: trained on machine-translated Portuguese, tested on gold Portuguese.
    assert after["pt"]["mean_recall"] > base["pt"]["mean_recall"] + 15

    report = tmp_path / "report"
    for name in ("index.md", "index.html", "training_curve.png", "eval/mean_recall.png"):
        assert (report / name).stat().st_size > 0, name
    page = (report / "index.md").read_text()
    assert "| pt |" in page and "pt/translated" in page and "hi/translated" in page
    manifest = json.loads((tmp_path / "augment" / "run_manifest.json").read_text())
    assert manifest["accounting"]["balanced"] is True

    # A second run reuses the shards and the trained model (same configuration).
    again = run_demo(cfg)
    assert again["results"]["capivara"]["languages"]["pt"]["mean_recall"] == pytest.approx(
        after["pt"]["mean_recall"]
    )
    rerun = json.loads((tmp_path / "augment" / "run_manifest.json").read_text())
    assert rerun["run_id"] == manifest["run_id"]  # the pipeline did not run again

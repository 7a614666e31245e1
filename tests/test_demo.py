"""The demo end to end on the test world: Beam augmentation, LiT+LoRA, evaluation, report."""

from __future__ import annotations

import json

import pytest

from babelcap.demo import DemoConfig, run_demo, write_report


def _metrics(x: float) -> dict:
    recalls = {f"{d}_r{k}": x for d in ("t2i", "i2t") for k in (1, 5, 10)}
    return {**recalls, "mean_recall": x, "captions": 8, "zs_shape": 40.0, "zs_colour": 50.0}


def test_report_page_is_rendered_markdown(tmp_path):
    """index.html is the Markdown rendered (links, tables, code), not Markdown in <p> tags."""
    results = {
        label: {"model": label, "images": 4, "languages": {"en": _metrics(x), "pt": _metrics(x)}}
        for label, x in (("base", 10.0), ("capivara", 30.0))
    }
    examples = [
        {
            "image": "examples/a.png",
            "captions": [{"language": "pt", "origin": "translated", "text": "um <b>x</b>"}],
        }
    ]
    cfg = DemoConfig(eval_languages=("en", "pt"))
    train = {"steps": 3, "final_loss": 1.0, "parameters": {"trainable": 5}}
    write_report(cfg, tmp_path, results, {}, train, examples, tmp_path, {"train": 1.0})
    page = (tmp_path / "index.html").read_text()
    assert '<a href="eval/results.md">eval/results.md</a>' in page
    assert "<th>language</th>" in page and "<td>+20.0</td>" in page.replace(
        ' style="text-align:right"', ""
    )
    assert "<th>zs_shape</th>" in page.replace(' style="text-align:right"', "")
    assert "<code>pt/translated</code>" in page and '<img src="examples/a.png"' in page
    assert "um &lt;b&gt;x&lt;/b&gt;" in page  # captions are text, never HTML
    assert "`" not in page and "](" not in page and "|---" not in page


@pytest.mark.slow
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
    assert "<table>" in (report / "index.html").read_text()
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

"""Outputs the ecosystem takes as they are (issue 15): what an augment output publishes names no
folder of the machine that wrote it (shard metadata, captions, `run_manifest.json`, the
dataset card), while the run's own comparisons still see the full paths (`_units/`); the card
declares its features as the Hub writes them and gives captions per language and origin and
the filters' drops; the world's CLIP folder moves as a whole.

The model-free runs are real Beam runs (local runner, in-process) of a few generated images;
the world-output checks (models, translations) are in tests/test_pipeline_e2e.py, which uses
`path_leaks` below on its module's augmented world output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_publish import make_inputs

from babelcap.core import schema
from babelcap.pipelines import card, units
from babelcap.pipelines.builder import StoreImage, input_roots, relative_to
from babelcap.pipelines.options import AugmentConfig, CaptionerConfig, ClipConfig
from babelcap.pipelines.publish import read_manifest
from babelcap.pipelines.runner import config_fingerprint, published_run, run

ROW_COLUMNS = ["image_id", "source_uri", "split", "image", "captions", "embedding_model"]


def path_leaks(out: Path, paths: Iterable[str | os.PathLike]) -> list[str]:
    """Where what an augment output publishes names one of `paths` (absolute local folders, as
    given and resolved): the card, `run_manifest.json`, every data and dead-letter file's
    metadata, and every data row's strings (`source_uri`, `image.path`, captions' `model`...).
    Dead-letter rows and `_units/` are the run's bookkeeping and keep the inputs' references."""
    needles = sorted(
        {n for p in paths for n in (str(p).rstrip("/"), os.path.realpath(p)) if len(n) > 1}
    )
    hits: list[str] = []

    def check(where: str, text: str) -> None:
        hits.extend(f"{where}: {n}" for n in needles if n in text)

    for name in ("README.md", "run_manifest.json"):
        check(name, (out / name).read_text(encoding="utf-8"))
    files = sorted(out.glob("data/*/*.parquet")) + sorted(out.glob("dead_letter/*.parquet"))
    assert files, f"no data files under {out}"
    for f in files:
        rel = f.relative_to(out).as_posix()
        meta = pq.read_schema(f).metadata or {}
        check(f"{rel} metadata", b"\n".join(k + b"=" + v for k, v in meta.items()).decode())
        if rel.startswith("data/"):
            rows = pq.read_table(f, columns=ROW_COLUMNS).to_pylist()
            for r in rows:
                r["image"] = (r["image"] or {}).get("path")
            check(f"{rel} rows", json.dumps(rows, ensure_ascii=False))
    return hits


# ------------------------------------------------------------------------------ unit level


def test_portable_values_keep_uris_and_hub_ids_and_name_local_folders():
    config = AugmentConfig(
        input="/home/me/data/in/manifest.jsonl",
        output="/home/me/data/out",
        captioner=CaptionerConfig(model="/home/me/models/blip-base"),
        clip=ClipConfig(model="hf-hub:org/clip", pretrained="gs://bucket/clip.bin"),
    ).to_dict()
    published = schema.portable(config)
    assert published["input"] == "in/manifest.jsonl"
    assert published["output"] == "data/out"  # a generic last name keeps its parent
    assert published["captioner"]["model"] == "blip-base"
    assert published["clip"]["model"] == "hf-hub:org/clip"  # Hub ids and URIs as they are
    assert published["clip"]["pretrained"] == "gs://bucket/clip.bin"
    assert published["captioner"]["prompts"] == config["captioner"]["prompts"]
    meta = schema.file_metadata(schema.KIND_SHARD, config, {"captioner": "/home/me/m/blip"})
    assert b"/home/me" not in b"".join(meta.values())
    assert json.loads(meta[schema.META_MODELS]) == {"captioner": "blip"}


def test_the_run_compares_full_configurations_not_the_published_ones():
    """Two captioners in different folders of the same name publish the same name, so the
    comparisons use the unit records' full configurations and the manifest's fingerprint."""
    a, b = (
        AugmentConfig(input="in", output="out", captioner=CaptionerConfig(model=m))
        for m in ("/srv/old/blip", "/srv/new/blip")
    )
    assert schema.portable(a.to_dict()) == schema.portable(b.to_dict())
    assert units.config_differences(a.to_dict(), b.to_dict()) == ["captioner.model"]
    assert units.config_differences(a.to_dict(), a.model_copy().to_dict()) == []
    assert config_fingerprint(a) != config_fingerprint(b)
    assert config_fingerprint(a) == config_fingerprint(a.model_copy())


def test_source_uri_is_named_from_the_input_folder_when_the_image_is_stored():
    def roots(given: str, **kw) -> tuple[str, ...]:
        return input_roots(AugmentConfig(input=given, output="o", **kw))

    assert roots("/x/in/manifest.jsonl")[0] == "/x/in"
    assert roots("/x/in/")[0] == "/x/in"
    assert roots("/x/tars/shard-{000..009}.tar")[0] == "/x/tars"
    assert roots("/x/tars/a.tar")[0] == "/x/tars"
    assert roots("gs://bucket/in/manifest.jsonl") == ()  # URIs are kept as given
    assert roots("in/", input_format="folder")[:2] == ("in", os.path.abspath("in"))
    root = roots("/x/in/manifest.jsonl")
    assert relative_to("/x/in/img/a.png", root) == "img/a.png"
    assert relative_to("/x/in/a.tar#key", root) == "a.tar#key"
    assert relative_to("/x/input2/a.png", root) == "/x/input2/a.png"  # outside: as given
    assert relative_to("https://host/a.png", root) == "https://host/a.png"

    rec = {"uri": "/x/in/a.png", "data": b"png", "image": None}
    (stored,) = StoreImage("bytes", root).process(rec)
    assert stored["uri"] == "a.png" and stored["image"] == {"bytes": b"png", "path": "a.png"}
    reencoded = {**rec, "image": {"bytes": b"jpg", "path": "/x/in/a.png"}}
    (stored,) = StoreImage("reencode", root).process(reencoded)
    assert stored["uri"] == "a.png" and stored["image"]["path"] == "a.png"
    # Reference mode: the path is how readers find the pixels, so it stays as given.
    referenced = {**rec, "image": {"bytes": None, "path": "/x/in/a.png"}}
    (stored,) = StoreImage("path", root).process(referenced)
    assert stored["uri"] == "/x/in/a.png" and stored["image"]["path"] == "/x/in/a.png"


def _card_manifest() -> dict:
    return {
        "splits": {"train": 20, "test": 3},
        "captions_per_language": {"en": 50, "pt": 38},
        "captions": {"en/source": 10, "en/synthetic": 40, "pt/translated": 38},
        "caption_drops": {"filter_tr.repetition_loop": 3, "filter_tr.length_ratio": 1},
        "accounting": {"inputs": 25, "rows_written": 23, "dead_lettered": 2},
        "units": [{"unit": 0}],
        "complete": True,
        "models": {"captioner": "blip-base", "clip": "clip-base", "translator": "3f2a"},
        "translators": {"pt": ["opus-mt-en-pt/ct2"]},
        "config": {"text": {"min_chars": 3}, "clip": {"model": "clip-base", "device": "cpu"}},
    }


def test_card_declares_features_as_the_hub_writes_them():
    datasets = pytest.importorskip("datasets")
    text = card.render(_card_manifest())
    header = yaml.safe_load(text.split("---")[1])
    features = datasets.Features.from_dict(schema.hf_features(schema.SHARD_SCHEMA))
    assert header["dataset_info"]["features"] == features._to_yaml_list()
    assert datasets.Features._from_yaml_list(header["dataset_info"]["features"]) == features
    image = next(f for f in header["dataset_info"]["features"] if f["name"] == "image")
    assert image == {"name": "image", "dtype": "image"}
    assert header["language"] == ["en", "pt"] and "license" not in header


def test_card_gives_captions_by_origin_the_drops_models_and_licence():
    text = card.render(_card_manifest())
    assert "| language | source | synthetic | translated | all |" in text
    assert "| en | 10 | 40 | 0 | 50 |" in text and "| pt | 0 | 0 | 38 | 38 |" in text
    assert "| all | 10 | 40 | 38 | 88 |" in text
    assert "| filter_tr.repetition_loop | 3 | degenerate translation" in text
    assert "| filter_tr.length_ratio | 1 | degenerate translation" in text
    assert "- captioner: `blip-base`" in text
    assert "- translations into pt: `opus-mt-en-pt/ct2`" in text
    assert '"top_k"' not in text and '"device"' not in text  # execution settings left out
    assert "## Licence" in text and "# license:" in text


# ------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """A model-free output of 9 images (+1 missing) whose manifest names absolute paths."""
    root = tmp_path_factory.mktemp("ecosystem")
    manifest = make_inputs(root / "in", 9, missing=1)
    config = AugmentConfig(input=str(manifest), output=str(root / "out"), unit_size=4)
    result = run(config, workers=1, echo=False)
    return {"root": root, "config": config, "result": result, "out": root / "out"}


def test_a_published_output_names_no_folder_of_this_machine(published):
    out, root = published["out"], published["root"]
    assert path_leaks(out, [root / "in", out, root]) == []
    rows = [r for f in sorted(out.glob("data/*/*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["source_uri"] for r in rows) == [f"images/{i:04d}.png" for i in range(9)]
    assert all(r["image"]["path"] == r["source_uri"] and r["image"]["bytes"] for r in rows)
    manifest = read_manifest(str(out))
    assert manifest["config"]["input"] == "in/manifest.jsonl"
    assert manifest["config_fingerprint"] == config_fingerprint(published["config"])
    # The run's bookkeeping keeps the full configuration it compares.
    record = json.loads(next((out / "_units").glob("unit-*.json")).read_text())
    assert record["config"]["input"] == str(root / "in" / "manifest.jsonl")


def test_the_same_run_again_is_no_change_and_another_is_told_apart(published):
    config = published["config"]
    assert published_run(config) is not None  # complete, same full configuration
    assert published_run(config.updated({"seed": 7})) is None
    again = run(config.model_copy(), workers=1, echo=False)
    assert again["this_run"]["units"] == 0
    assert again["accounting"] == published["result"]["accounting"]


def test_reference_mode_keeps_the_paths_readers_open(tmp_path):
    """store_image="path": the row holds no pixels, so its path stays as given (absolute here)
    for the trainer and `datasets` to open."""
    manifest = make_inputs(tmp_path / "in", 3)
    config = AugmentConfig(
        input=str(manifest), output=str(tmp_path / "out"), unit_size=4, store_image="path"
    )
    run(config, workers=1, echo=False)
    rows = [
        r for f in (tmp_path / "out").glob("data/*/*.parquet") for r in pq.read_table(f).to_pylist()
    ]
    assert len(rows) == 3
    for r in rows:
        assert r["image"]["bytes"] is None and r["image"]["path"] == r["source_uri"]
        assert Path(r["source_uri"]).is_absolute() and Path(r["source_uri"]).is_file()


# ------------------------------------------------------------------------------ world CLIP


@pytest.mark.slow
def test_world_clip_folder_moves_as_a_whole(world_models, tmp_path, monkeypatch):
    import open_clip
    import torch

    from babelcap.models.clip import load_clip

    base = world_models("clip-base")["clip-base"]
    local = json.loads((base / "open_clip_config.json").read_text())
    text_cfg = local["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "text"
    # What the loaders read names no folder of the build (eval.json records its run's facts).
    configs = [base / "open_clip_config.json", base / "world-clip.json", *base.glob("text/*.json")]
    for f in [*configs, *base.glob("tokenizer*.json")]:
        assert str(base.parent) not in f.read_text(), f.name

    moved = tmp_path / "elsewhere" / "my-clip"
    shutil.copytree(base, moved)
    texts = ["a big red star", "uma estrela vermelha"]
    original = load_clip(str(base))
    copy = load_clip(str(moved))
    original.model.eval()
    copy.model.eval()
    with torch.no_grad():
        want = original.model.encode_text(original.tokenizer(texts), normalize=True)
        got = copy.model.encode_text(copy.tokenizer(texts), normalize=True)
    torch.testing.assert_close(got, want)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{moved}")  # any working directory
    # (babelcap's wraps it to drop the padding past the longest text)
    assert torch.equal(tokenizer(texts), original.tokenizer.inner(texts))
    monkeypatch.chdir(moved)  # plain open_clip: from inside the folder, as for exports
    model, _, _ = open_clip.create_model_and_transforms("local-dir:.")
    model.eval()
    with torch.no_grad():
        plain = model.encode_text(tokenizer(texts), normalize=True)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-5)

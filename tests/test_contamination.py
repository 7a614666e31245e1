"""Honest numbers: the trainer reads only its splits, evaluation refuses images the model
trained on (by id and by perceptual hash), the pipeline drops or flags an evaluation set's
images, and retrieval ties count one documented way in both directions."""

from __future__ import annotations

import io
from pathlib import Path

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from babelcap.core import schema
from babelcap.core.images import open_rgb
from babelcap.core.near_duplicates import Fingerprints
from babelcap.core.shards import find_shards, write_shard
from babelcap.pipelines.deadletter import DEAD
from babelcap.pipelines.decontaminate import FLAGGED_SPLIT, MATCHES_EVAL_SET, DropEvalImages
from babelcap.training.contamination import (
    ContaminationError,
    check_overlap,
    ensure_clean,
    index_training_images,
)
from babelcap.training.data import CaptionSelection, ShardStream, StreamConfig, split_counts
from babelcap.world.shards import world_rows


def _jpeg(im: Image.Image, size: int, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    im.resize((size, size)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _row(data: bytes, split: str | None) -> dict:
    return {
        "image_id": schema.image_id_for(data),
        "split": split,
        "image": {"bytes": data, "path": None},
        "captions": [schema.caption("a red circle", "en", schema.ORIGIN_SOURCE)],
    }


@pytest.fixture(scope="module")
def mixed_shard(world_dir, tmp_path_factory) -> Path:
    """One shard holding the world's train and test rows (as an augment of the whole
    manifest writes them)."""
    rows = world_rows(world_dir, ["en"], "train") + world_rows(world_dir, ["en"], "test")
    path = tmp_path_factory.mktemp("mixed") / "mixed.parquet"
    write_shard(path, rows, row_group_size=32)
    return path


def test_stream_reads_only_its_splits(mixed_shard, world_dir):
    shards = find_shards(str(mixed_shard))
    counts = split_counts(shards)
    n_train = len(world_rows(world_dir, ["en"], "train"))
    assert counts == {"test": len(world_rows(world_dir, ["en"], "test")), "train": n_train}

    def seen(splits) -> list[str]:
        stream = ShardStream(
            shards,
            CaptionSelection(languages=("en",), origins=("gold",)),
            StreamConfig(batch_size=1, shuffle_buffer=1, seed=0, splits=splits, drop_last=False),
            tokenizer=None,
            preprocess=None,
        )
        units = stream._units()
        return [row["image_id"] for _, row in stream._rows(units)]

    train_ids = {r["image_id"] for r in world_rows(world_dir, ["en"], "train")}
    only_train = seen(("train",))
    assert len(only_train) == n_train and set(only_train) == train_ids
    assert len(seen(None)) == sum(counts.values())


def test_reencoded_copy_is_caught_and_distinct_scenes_are_not(world_dir, tmp_path):
    test_rows = world_rows(world_dir, ["en"], "test")
    train_rows = world_rows(world_dir, ["en"], "train")
    test_images = [open_rgb(r["image"]["bytes"]) for r in test_rows]
    test_ids = [r["image_id"] for r in test_rows]

    # The world's own train split shares no picture with its test split.
    clean = tmp_path / "clean.parquet"
    write_shard(clean, train_rows)
    overlap = check_overlap(test_images, test_ids, index_training_images(str(clean)))
    assert overlap.total == 0 and overlap.training_images == len(train_rows)
    ensure_clean(overlap)  # no error

    # One test image, re-encoded as a JPEG at another size, hidden among the training rows.
    copy = _row(_jpeg(test_images[3], 97), "train")
    dirty = tmp_path / "dirty.parquet"
    write_shard(dirty, [*train_rows, copy])
    index = index_training_images(str(dirty))
    overlap = check_overlap(test_images, test_ids, index)
    assert (overlap.by_id, overlap.by_hash) == (0, 1)
    assert overlap.examples[0]["eval_index"] == 3
    with pytest.raises(ContaminationError, match="1 of"):
        ensure_clean(overlap)
    assert ensure_clean(overlap, allow=True).total == 1

    # Saved with a run and loaded back, the index finds the same overlap.
    index.save(tmp_path / "index.parquet")
    again = check_overlap(test_images, test_ids, Fingerprints.load(tmp_path / "index.parquet"))
    assert again.to_dict() == overlap.to_dict()


def test_identical_image_is_caught_by_id(world_dir, tmp_path):
    test_rows = world_rows(world_dir, ["en"], "test")
    path = tmp_path / "s.parquet"
    write_shard(path, [*world_rows(world_dir, ["en"], "train"), *test_rows[:5]])
    # The test rows keep their split "test": a trainer reading every split would see them.
    overlap = check_overlap(
        [open_rgb(r["image"]["bytes"]) for r in test_rows],
        [r["image_id"] for r in test_rows],
        index_training_images(str(path), splits=None),
    )
    assert (overlap.by_id, overlap.by_hash) == (5, 0)
    default = index_training_images(str(path))  # the trainer's default: train rows only
    assert len(default) == len(world_rows(world_dir, ["en"], "train"))


@pytest.mark.parametrize("mode", ["drop", "flag"])
def test_pipeline_drops_or_flags_eval_images(world_dir, tmp_path, mode):
    test_rows = world_rows(world_dir, ["en"], "test")[:4]
    images = [open_rgb(r["image"]["bytes"]) for r in test_rows]
    fingerprints = tmp_path / "eval.parquet"
    Fingerprints.of(images, [r["image_id"] for r in test_rows]).save(fingerprints)
    other = world_rows(world_dir, ["en"], "train")[:3]
    resized = _jpeg(images[1], 50, quality=85)
    records = [
        {"uri": "same.png", "data": test_rows[0]["image"]["bytes"], "split": "train"},
        {"uri": "resized.jpg", "data": resized, "split": "train"},
        *(
            {"uri": f"other{i}.png", "data": r["image"]["bytes"], "split": "train"}
            for i, r in enumerate(other)
        ),
    ]
    for rec in records:
        rec["image_id"] = schema.image_id_for(rec["data"])
        rec["stats"] = {}
    with BeamTestPipeline(runner="apache_beam.runners.portability.fn_api_runner.FnApiRunner") as p:
        out = (
            p
            | beam.Create(records)
            | beam.ParDo(DropEvalImages(str(fingerprints), mode)).with_outputs(DEAD, main="ok")
        )
        kept = out.ok | "kept" >> beam.Map(lambda r: (r["uri"], r["split"]))
        dead = out[DEAD] | "dead" >> beam.Map(
            lambda d: (d["row"]["input_ref"], d["row"]["stage"], d["row"]["error_kind"])
        )
        others = [(f"other{i}.png", "train") for i in range(3)]
        if mode == "drop":
            assert_that(kept, equal_to(others), label="kept")
            want = [(uri, "decontaminate", MATCHES_EVAL_SET) for uri in ("same.png", "resized.jpg")]
            assert_that(dead, equal_to(want), label="dead")
        else:
            flagged = [("same.png", FLAGGED_SPLIT), ("resized.jpg", FLAGGED_SPLIT)]
            assert_that(kept, equal_to(others + flagged), label="kept")
            assert_that(dead, equal_to([]), label="dead")


def test_retrieval_ties_count_as_misses_in_both_directions():
    from babelcap.training.evaluate import retrieval_metrics

    # Two images, two captions; every score is equal: a model that cannot tell anything apart.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    flat = retrieval_metrics(images, texts, [0, 1], ["a", "b"])
    assert flat["t2i_r1"] == 0.0 and flat["i2t_r1"] == 0.0
    assert flat["t2i_r5"] == 100.0 and flat["i2t_r5"] == 100.0

    # Identical caption strings of two images are correct for both: no tie left to break.
    same = retrieval_metrics(images, texts, [0, 1], ["a red circle", "a red circle"])
    assert same["t2i_r1"] == 100.0 and same["i2t_r1"] == 100.0

    # A tie between the right image and a wrong one is a miss; a strict win is a hit.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tied = retrieval_metrics(images, texts, [0, 2], ["x", "y"])
    assert tied["t2i_r1"] == 50.0  # text 0 ties images 0 and 1; text 1 finds image 2
    # image 0: its caption "x" scores 1 and "y" 0 -> hit; image 2: "y" 1 vs "x" 0 -> hit;
    # image 1 has no caption and is not a query.
    assert tied["i2t_r1"] == 100.0


def test_augment_decontaminates_against_an_eval_dataset(world_dir, tmp_path):
    """`babelcap augment --decontaminate world:W` keeps the world's test images out: dropped to
    the dead letters, or kept with split "eval_overlap" (which the trainer never reads)."""
    import pyarrow.parquet as pq

    from babelcap.cli import main

    n_test = len(world_rows(world_dir, ["en"], "test"))
    n_all = len((world_dir / "manifest.jsonl").read_text().splitlines())
    base = ["augment", "--input", str(world_dir / "manifest.jsonl"), "--workers", "1"]
    assert (
        main([*base, "--output", str(tmp_path / "drop"), "--decontaminate", f"world:{world_dir}"])
        == 0
    )
    shards = find_shards(str(tmp_path / "drop"))
    assert shards.num_rows == n_all - n_test
    dead = find_shards(str(tmp_path / "drop"), kind=schema.KIND_DEAD_LETTER)
    kinds = [k for f in dead.files for k in pq.read_table(f)["error_kind"].to_pylist()]
    assert kinds == [MATCHES_EVAL_SET] * n_test

    flag = [*base, "--output", str(tmp_path / "flag"), "--decontaminate", f"world:{world_dir}"]
    assert main([*flag, "--decontaminate-mode", "flag"]) == 0
    counts = split_counts(find_shards(str(tmp_path / "flag")))
    assert counts[FLAGGED_SPLIT] == n_test and "test" not in counts
    assert sum(counts.values()) == n_all


def test_evaluation_refuses_a_model_trained_on_its_images(
    world_dir, world_models, mixed_shard, tmp_path, capsys
):
    """A run that read every split (test images included) is refused by `babelcap eval` with
    the overlap count; --allow-contamination goes on and the report says so first. The same
    run with the default split filter trains on train rows only, and its evaluation is clean."""
    from babelcap.cli import main

    base = world_models("clip-base")["clip-base"]
    n_test = len(world_rows(world_dir, ["en"], "test"))

    def train(out: Path, *extra: str) -> None:
        argv = ["train", "--model", str(base), "--shards", str(mixed_shard), "--output", str(out)]
        argv += ["--steps", "2", "--languages", "en", "--set", "data.origins=[gold]"]
        argv += ["--set", "data.batch_size=16", "--set", "run.progress=false", *extra]
        assert main(argv) == 0

    train(tmp_path / "dirty", "--set", "data.splits=null")
    printed = capsys.readouterr().out
    assert f"{n_test} test" in printed  # the summary counts the rows of every split it read
    evaluate = ["eval", "--world", str(world_dir), "--languages", "en", "--no-zero-shot"]
    dirty = [*evaluate, "--model", f"dirty={tmp_path / 'dirty' / 'export'}"]
    assert main(dirty) == 2
    err = capsys.readouterr().err
    assert f"{n_test} of {n_test} evaluation images are in the training data" in err

    assert main([*dirty, "--allow-contamination", "--out", str(tmp_path / "report")]) == 0
    first = (tmp_path / "report" / "results.md").read_text().splitlines()[0]
    assert first.startswith("**CONTAMINATED (dirty)**") and f"{n_test} of {n_test}" in first

    train(tmp_path / "clean")
    printed = capsys.readouterr().out
    assert "rows trained on:" in printed and f"skipped: {n_test} test" in printed
    clean = [*evaluate, "--model", f"clean={tmp_path / 'clean' / 'export'}"]
    assert main([*clean, "--out", str(tmp_path / "clean-report")]) == 0
    import json

    result = json.loads((tmp_path / "clean-report" / "results.json").read_text())["clean"]
    assert result["contamination"]["checked"] and result["contamination"]["total"] == 0
    assert not (tmp_path / "clean-report" / "results.md").read_text().startswith("**CONTAM")

"""The whole augmentation on a small world plus the bad-input corpus, with real models, under
Beam's local runner in multi-processing mode (2 workers: pickling and per-worker loading are
exercised as on Dataflow). One full run per module (a module-scoped fixture); the crash/re-run
case adds one more, in-process run.

Models: the world's (captioner, a translator, base CLIP) through the `world_models` fixture;
the translator is `marian-en-pt` (into pt) unless BABELCAP_TEST_TRANSLATOR names another world
translator (e.g. m2m-multi, into pt and es). BABELCAP_TEST_TINY_MODELS=1 swaps in tiny randomly
initialised models of the same architectures (fast inner loop, into pt and es; translations are
then gibberish, so the language check is off). BABELCAP_TEST_PIPELINE_MODELS='{"captioner": DIR,
"translator": CT2_DIR, "clip": DIR, "languages": ["pt"]}' points the test at models built
elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelcap.core import schema
from babelcap.core.shards import find_shards
from babelcap.pipelines.options import (
    AugmentConfig,
    CaptionerConfig,
    ClipConfig,
    TextFilterConfig,
    TranslationStageConfig,
)
from babelcap.pipelines.publish import read_manifest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import pipeline_testkit as kit

pytestmark = [pytest.mark.slow, pytest.mark.world_models]
N_WORLD_IMAGES = 20
WORLD_TRANSLATORS = {"marian-en-pt": ("pt",), "m2m-multi": ("pt", "es")}


@pytest.fixture(scope="module")
def models(request, tmp_path_factory) -> dict[str, str]:
    if os.environ.get("BABELCAP_TEST_TINY_MODELS") == "1":
        root = tmp_path_factory.mktemp("tiny-models")
        return {
            "captioner": str(kit.tiny_blip(root / "blip")),
            "translator": str(kit.tiny_translator(root / "tr", languages=("pt", "es"))),
            "clip": str(kit.tiny_clip(root / "clip")),
            "languages": ("pt", "es"),
            "tiny": "1",
        }
    if os.environ.get("BABELCAP_TEST_PIPELINE_MODELS"):
        given = json.loads(os.environ["BABELCAP_TEST_PIPELINE_MODELS"])
        return {**given, "languages": tuple(given["languages"])}
    name = os.environ.get("BABELCAP_TEST_TRANSLATOR", "marian-en-pt")
    dirs = request.getfixturevalue("world_models")("captioner", name, "clip-base")
    return {
        "captioner": str(dirs["captioner"]),
        "translator": str(dirs[name] / "ct2"),
        "clip": str(dirs["clip-base"]),
        "languages": WORLD_TRANSLATORS[name],
    }


@pytest.fixture(scope="module")
def job(world_dir, models, tmp_path_factory) -> dict:
    """Input = tens of world images + the bad-input corpus, in one JSONL manifest."""
    root = tmp_path_factory.mktemp("e2e")
    world_rows = [json.loads(x) for x in (world_dir / "manifest.jsonl").read_text().splitlines()]
    world_rows = world_rows[:N_WORLD_IMAGES]
    good = [world_dir / r["image_path"] for r in world_rows[:6]]
    corpus = root / "input"
    expect = kit.bad_corpus(corpus, good)
    with open(corpus / "manifest.jsonl", "ab") as f:
        for r in world_rows[6:]:
            row = {**r, "image_path": str(world_dir / r["image_path"])}
            f.write(json.dumps(row).encode() + b"\n")
    tiny = bool(models.get("tiny"))
    config = AugmentConfig(
        input=str(corpus / "manifest.jsonl"),
        output=str(root / "out"),
        languages=models["languages"],
        captioner=CaptionerConfig(
            model=models["captioner"], num_captions=4, max_new_tokens=24, batch_size=8
        ),
        translator=TranslationStageConfig(
            model=models["translator"],
            batch_size=16,
            options={"max_decoding_length": 16} if tiny else {},
        ),
        # The source filter is off: the duplicate test reads back a made-up alt-text ("a blue
        # circle") that the default filter would rightly drop (tests/test_translation_scores.py
        # covers the filter).
        clip=ClipConfig(
            model=models["clip"], top_k=3, embed_images=True, batch_size=16, source_filter=False
        ),
        text=TextFilterConfig(language_check=not tiny),
        rows_per_shard=8,
        seed=0,
        unit_size=10,  # several work units, one wave: committed one by one
    )
    from babelcap.pipelines.runner import run

    manifest = run(config, workers=2, echo=False)
    return {
        "config": config,
        "manifest": manifest,
        "expect": expect,
        "root": root,
        "out": root / "out",
        "n_world": len(world_rows),
    }


def _read(out: Path, kind: str) -> pa.Table:
    # Through the one reader rule: only committed units' files.
    files = find_shards(out, kind=kind).files
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def _rows(out: Path) -> list[dict]:
    return _read(out, schema.KIND_SHARD).sort_by("image_id").to_pylist()


def _split_floats(value, floats: list[float]):
    """`value` with every float replaced by None (appended to `floats`) and embeddings dropped:
    the exact part of rows, and their scores to compare within a tolerance."""
    if isinstance(value, float):
        floats.append(value)
        return None
    if isinstance(value, dict):
        return {k: _split_floats(v, floats) for k, v in value.items() if k != "embedding"}
    if isinstance(value, list):
        return [_split_floats(v, floats) for v in value]
    return value


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Rows equal in every value but their float scores, which equal within 1e-3: CLIP and
    translation scores are computed in batches, and another batching changes their last
    digits (the README says so); everything else must be the same byte for byte."""
    fa: list[float] = []
    fb: list[float] = []
    assert _split_floats(a, fa) == _split_floats(b, fb)
    assert fa == pytest.approx(fb, rel=1e-3, abs=1e-4)


def _dead(out: Path) -> list[dict]:
    return _read(out, schema.KIND_DEAD_LETTER).to_pylist()


def test_every_input_is_accounted_for_on_disk(job):
    """The books, kept by the test from what it reads back: every input line of the manifest
    is either one shard row or one dead letter, never both, never neither. (The runner's own
    `accounting.balance` raises on a mismatch, so its `balanced` flag alone proves nothing.)"""
    text = Path(job["config"].input).read_bytes().decode("utf-8", "surrogateescape")
    # manifest line number -> line (one caption is not valid UTF-8; blank lines are no input)
    lines = {i: x for i, x in enumerate(text.splitlines(), start=1) if x.strip()}
    # 8 corpus files + missing file + bad JSON line + 7 rows of the 6 good images (one twice)
    # + the other world rows
    assert len(lines) == 8 + 1 + 1 + 7 + (job["n_world"] - 6)
    rows, dead = _rows(job["out"]), _dead(job["out"])
    assert len(rows) + len(dead) == len(lines)

    dead_lines = Counter(int(d["input_ref"].rsplit("#L", 1)[1]) for d in dead)
    assert all(n == 1 for n in dead_lines.values()), dead_lines  # no input dead twice
    assert set(dead_lines) <= set(lines)
    # The other lines are exactly the rows written (matched by image file; the duplicate's
    # image appears on two lines, one of them dead).
    alive = Counter(
        Path(json.loads(line)["image_path"]).name
        for i, line in lines.items()
        if i not in dead_lines
    )
    assert alive == Counter(Path(r["source_uri"]).name for r in rows)
    assert len({r["image_id"] for r in rows}) == len(rows)
    # image_id is the sha256 of the image bytes (README, "The shard format").
    assert all(r["image_id"] == hashlib.sha256(r["image"]["bytes"]).hexdigest() for r in rows)

    duplicates = sum(d["error_kind"] == "duplicate_image" for d in dead)
    assert duplicates == 1
    books = job["manifest"]["accounting"]
    counted = {
        "inputs": len(lines),
        "rows_written": len(rows),
        "dead_lettered": len(dead) - duplicates,
        "duplicates_dropped": duplicates,
        "balanced": True,
    }
    assert {k: books.get(k) for k in counted} == counted
    on_disk = read_manifest(str(job["out"]))
    assert on_disk["accounting"] == books and on_disk["runner"].endswith("FnApiRunner")
    assert on_disk["models"]["captioner"] and on_disk["versions"]["apache-beam"]
    assert not (job["out"] / "_staging").exists()


def test_models_load_once_per_worker(job):
    metrics = job["manifest"]["metrics"]
    for stage in ("caption", "translate", "clip"):
        loads = metrics[f"babelcap.{stage}/load_model_latency_milli_secs"]["count"]
        assert 1 <= loads <= 2, (stage, loads)  # 2 worker processes, never once per bundle
        batches = metrics[f"babelcap.{stage}/inference_batch_latency_micro_secs"]["count"]
        assert batches >= loads


def test_shards_validate_and_read_back(job):
    out = job["out"]
    files = sorted(out.glob("data/*/*.parquet"))
    assert len(files) >= 3  # units of 10 inputs
    assert sorted(map(str, files)) == sorted(find_shards(out).files)
    total = 0
    for f in files:
        info = schema.validate(str(f))
        assert info.config["seed"] == 0 and info.models["captioner"]
        total += info.num_rows
    assert total == job["manifest"]["accounting"]["rows_written"]
    for f in out.glob("dead_letter/*.parquet"):
        schema.validate(str(f), kind=schema.KIND_DEAD_LETTER)
    import duckdb

    con = duckdb.connect()
    n, n_caps = con.execute(
        f"SELECT count(*), sum(len(captions)) FROM read_parquet('{out}/data/**/*.parquet')"
    ).fetchone()
    assert n == total and n_caps > total
    langs = {
        r[0]
        for r in con.execute(
            f"SELECT DISTINCT c.language FROM (SELECT unnest(captions) AS c "
            f"FROM read_parquet('{out}/data/**/*.parquet'))"
        ).fetchall()
    }
    assert {"en", *job["config"].languages} <= langs


def test_bad_inputs_land_in_the_right_place(job):
    expect = job["expect"]
    kinds = {(d["stage"], d["error_kind"]) for d in _dead(job["out"])}
    rows = _rows(job["out"])
    by_name = {Path(r["source_uri"]).name: r for r in rows}
    for name, what in expect.items():
        if not isinstance(what, dict) or not ("dead" in what or "row" in what):
            continue
        if "dead" in what:
            stage, kind = what["dead"].split("/")
            assert (stage, kind) in kinds, (name, kinds)
            assert name not in by_name
        else:
            assert name in by_name, name
            r = by_name[name]
            assert r["width"] == 40 and r["image"]["bytes"]
    assert ("read", "bad_manifest_row") in kinds
    for d in _dead(job["out"]):
        assert d["message"]  # every dead letter says why


def test_caption_problems_are_counted_and_the_image_kept(job):
    drops = job["manifest"]["caption_drops"]
    for key, n in job["expect"]["caption_drops"].items():
        assert drops.get(key) == n, (key, drops)
    rows = {Path(r["source_uri"]).name: r for r in _rows(job["out"])}
    good = job["expect"]["good"]
    for name in good[:3]:  # invalid UTF-8 / empty / 10,000 characters: no source caption
        caps = rows[name]["captions"]
        assert caps and all(c["origin"] != schema.ORIGIN_SOURCE for c in caps)


def test_duplicate_image_is_dropped_deterministically(job):
    dups = [d for d in _dead(job["out"]) if d["error_kind"] == "duplicate_image"]
    assert len(dups) == 1
    # The later manifest line is the one dropped; the message names the one kept.
    kept_line = int(dups[0]["message"].rsplit("#L", 1)[1])
    dropped_line = int(dups[0]["input_ref"].rsplit("#L", 1)[1])
    assert kept_line < dropped_line
    rows = [r for r in _rows(job["out"]) if r["image_id"] == dups[0]["image_id"]]
    assert len(rows) == 1
    assert rows[0]["captions"][0]["text"] == "a blue circle"  # the kept row's source caption


def test_captions_of_every_origin_linked(job):
    rows = _rows(job["out"])
    origins = {c["origin"] for r in rows for c in r["captions"]}
    assert {schema.ORIGIN_SOURCE, schema.ORIGIN_SYNTHETIC, schema.ORIGIN_TRANSLATED} <= origins
    prompts = set(job["config"].captioner.prompts[:4])
    for r in rows:
        caps = r["captions"]
        assert len({c["text"] for c in caps if c["origin"] == "synthetic"}) == sum(
            c["origin"] == "synthetic" for c in caps
        )
        synth = [c for c in caps if c["origin"] == schema.ORIGIN_SYNTHETIC]
        assert len(synth) <= 3  # top_k=3
        for c in synth:
            assert c["prompt"] in prompts and c["score"] is not None
        for c in caps:
            if c["origin"] == schema.ORIGIN_TRANSLATED:
                src = caps[c["source_index"]]
                assert src["language"] == "en" and src["origin"] != "translated"
                assert c["language"] in job["config"].languages and c["model"]
        assert len(r["embedding"]) > 0 and r["embedding_model"]


def test_world_captions_are_translated_into_every_language(job):
    if job["config"].text.language_check is False:
        pytest.skip("tiny random translator: translations are not language-checked")
    rows = _rows(job["out"])
    n_tr = {
        lang: sum(c["language"] == lang for r in rows for c in r["captions"])
        for lang in job["config"].languages
    }
    assert all(n > len(rows) for n in n_tr.values()), n_tr


def test_crash_then_rerun_gives_the_same_rows(job, monkeypatch, tmp_path):
    """A unit whose commit was cut short (data moved, record missing) is not read; a run that
    crashes while writing commits nothing and leaves the committed units alone; re-running
    computes only the missing unit and gives exactly the rows of the clean run."""
    from babelcap.pipelines import sinks
    from babelcap.pipelines.runner import run

    out = job["out"]
    before = _rows(out)
    records = sorted((out / "_units").glob("unit-*.json"))
    assert len(records) >= 3
    lost = json.loads(records[1].read_text())
    records[1].unlink()  # killed between moving unit 1's files in and writing its record
    partial = _rows(out)
    assert len(partial) == len(before) - lost["accounting"]["rows_written"]
    kept = {p.name: p.read_bytes() for p in records if p != records[1]}

    config = job["config"]
    real = sinks.write_parquet

    def crashing(path, rows, arrow_schema):
        raise RuntimeError("simulated crash while writing shards")

    monkeypatch.setattr(sinks, "write_parquet", crashing)
    with pytest.raises(Exception, match="simulated crash"):
        run(config, workers=1, echo=False)  # in-process runner: the patch applies
    assert _rows(out) == partial  # nothing committed, nothing of the committed units touched
    assert {p.name: p.read_bytes() for p in records if p != records[1]} == kept
    assert not (out / "_lock").exists()
    monkeypatch.setattr(sinks, "write_parquet", real)

    manifest = run(config.model_copy(), workers=1, echo=False)
    after = _rows(out)
    _same_rows(after, before)
    assert len({r["image_id"] for r in after}) == len(after)
    assert manifest["this_run"]["units"] == 1 and manifest["complete"]
    assert manifest["accounting"] == job["manifest"]["accounting"]
    assert {p.name: p.read_bytes() for p in records if p != records[1]} == kept
    assert not (out / "_staging").exists()


def test_export_webdataset_for_open_clip(job, tmp_path):
    import webdataset as wds

    from babelcap.pipelines.export_wds import export_webdataset

    result = export_webdataset(job["out"], tmp_path / "wds", "pt", maxcount=10, splits="all")
    n_pt = sum(any(c["language"] == "pt" for c in r["captions"]) for r in _rows(job["out"]))
    assert result["written"] == n_pt > 0
    sizes = json.loads((tmp_path / "wds" / "sizes.json").read_text())
    assert sum(sizes.values()) == n_pt and len(sizes) == -(-n_pt // 10)
    # Read back the way open_clip's webdataset pipeline does.
    pattern = str(tmp_path / "wds" / f"shard-{{000000..{len(sizes) - 1:06d}}}.tar")
    ds = (
        wds.WebDataset(pattern, shardshuffle=False)
        .decode("pilrgb")
        .rename(image="jpg;png;jpeg;webp", text="txt")
        .to_tuple("image", "text", "json")
    )
    seen = 0
    for image, text, meta in ds:
        assert image.size[0] > 0 and text == meta["caption"]["text"]
        assert meta["captions"][meta["caption_index"]] == meta["caption"]
        assert meta["caption"]["language"] == "pt"
        seen += 1
    assert seen == n_pt


def test_the_world_output_names_no_folder_of_this_machine(job, models):
    """Shard metadata, rows (source_uri, image.path, captions' model), run_manifest.json and
    the card name the models by their folders' names and the images from the input's folder:
    nothing holds the absolute input, output or model folders."""
    from test_ecosystem import path_leaks

    from babelcap.core.paths import portable_ref

    config, out = job["config"], job["out"]
    folders = [Path(config.input).parent, out, *(models[k] for k in ("captioner", "clip"))]
    folders.append(Path(models["translator"]).parent)  # `.../marian-en-pt` (+ its `ct2`)
    assert path_leaks(out, folders) == []
    manifest = read_manifest(str(out))
    assert manifest["models"]["captioner"] == portable_ref(models["captioner"])
    assert manifest["models"]["clip"] == portable_ref(models["clip"])
    assert manifest["translators"] == {
        lang: [portable_ref(models["translator"])] for lang in config.languages
    }
    rows = _rows(out)
    synthetic = {c["model"] for r in rows for c in r["captions"] if c["origin"] == "synthetic"}
    assert synthetic == {portable_ref(models["captioner"])}
    inside = [r for r in rows if not Path(r["source_uri"].split("#")[0]).is_absolute()]
    assert len(inside) >= 3  # the corpus's images, named from the manifest's folder
    assert all((Path(config.input).parent / r["source_uri"]).is_file() for r in inside)


def test_datasets_polars_and_pyarrow_read_the_world_output(job, tmp_path):
    """The ecosystem's readers on a world output (translations, scores, embeddings): the
    splits and counts babelcap itself reports, images decoded, translations with scores."""
    import polars as pl
    import pyarrow.dataset as pds
    from datasets import load_dataset
    from PIL import Image

    from babelcap.pipelines.sinks import split_name

    out = job["out"]
    manifest = read_manifest(str(out))
    n = find_shards(out).num_rows
    assert n == manifest["accounting"]["rows_written"] == len(_rows(out))

    ds = load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert {k: len(v) for k, v in ds.items()} == manifest["splits"]
    per_language: Counter = Counter()
    scored = 0
    for split in ds.values():
        for row in split:
            assert isinstance(row["image"], Image.Image)
            assert row["image"].size == (row["width"], row["height"])
            caps = row["captions"]
            per_language.update(c["language"] for c in caps)
            for c in caps:
                if c["origin"] == schema.ORIGIN_TRANSLATED:
                    assert c["language"] in job["config"].languages and c["model"]
                    assert caps[c["source_index"]]["language"] == "en"
                    scored += c["translation_score"] is not None
            assert len(row["embedding"]) > 0
    assert dict(per_language) == manifest["captions_per_language"]
    translations = sum(per_language[lang] for lang in job["config"].languages)
    assert translations > 0
    if job["config"].translator.score:
        assert scored == translations  # every translation carries its score

    glob = f"{out}/data/**/*.parquet"
    assert pl.scan_parquet(glob).select(pl.len()).collect().item() == n
    langs = (
        pl.scan_parquet(glob)
        .select(pl.col("captions").explode().struct.field("language"))
        .group_by("language")
        .len()
        .collect()
    )
    assert dict(zip(langs["language"], langs["len"], strict=True)) == per_language
    dataset = pds.dataset(out / "data", format="parquet")
    assert dataset.count_rows() == n
    splits = Counter(map(split_name, dataset.to_table(columns=["split"])["split"].to_pylist()))
    assert dict(splits) == manifest["splits"]

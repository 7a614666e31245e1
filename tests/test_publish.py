"""A run owns its output (issue 13) and the output is read as it is by the ecosystem (issue 15).

Real Beam runs (local runner, in-process; the --overwrite guard test with the multi-process
runner) on a small manifest of generated images with source captions (no models: each run takes
seconds), real Parquet, real `datasets`, DuckDB and Polars, real processes for the lock and its
takeover race.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from babelcap.core import schema
from babelcap.core.shards import IncompleteOutputError, find_shards
from babelcap.pipelines.options import AugmentConfig
from babelcap.pipelines.publish import (
    OutputError,
    OutputLock,
    OutputLockedError,
    PublishGuardError,
    check_output,
    remove_unit_files,
)
from babelcap.pipelines.runner import ConfigMismatchError, run


def make_inputs(folder: Path, n: int, missing: int = 0, start: int = 0) -> Path:
    """n small PNGs (splits 80/10/10 by index) + `missing` rows naming absent files, in a
    JSONL manifest with English alt-text."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with open(manifest, "a", encoding="utf-8") as f:
        for i in range(start, start + n):
            path = images / f"{i:04d}.png"
            Image.new("RGB", (24, 24), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(path)
            split = "test" if i % 10 == 0 else "validation" if i % 10 == 1 else "train"
            row = {"image_path": str(path), "caption": f"a small square number {i}", "split": split}
            f.write(json.dumps(row) + "\n")
        for i in range(missing):
            f.write(json.dumps({"image_path": str(images / f"gone-{start}-{i}.png")}) + "\n")
    return manifest


def config(manifest: Path, out: Path, **kw) -> AugmentConfig:
    return AugmentConfig(input=str(manifest), output=str(out), unit_size=8, **kw)


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """relative path -> sha256 of every file below root (folders in `skip` left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(rel == s or rel.startswith(s + "/") for s in skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> dict:
    """One finished output (27 good images in 4 units + 3 missing files)."""
    root = tmp_path_factory.mktemp("publish")
    manifest = make_inputs(root / "in", 27, missing=3)
    out = root / "out"
    manifest_out = run(config(manifest, out), workers=1, echo=False)
    return {"root": root, "manifest": manifest, "out": out, "result": manifest_out}


# --- where a run may write ---------------------------------------------------------------------
def test_output_folders_that_are_refused(tmp_path):
    (tmp_path / "in").mkdir()
    for bad, why in (
        ("/", "filesystem root"),
        (str(Path.home()), "home folder"),
        ("~", "home folder"),
        (str(tmp_path), "contains the input"),  # --input data/shards --output data
        (str(tmp_path / "in"), "contains the input"),
        ("gs://bucket", "bucket root"),
        ("", "empty"),
        # file:// is a local path: the same checks
        ("file:///", "filesystem root"),
        (f"file://{Path.home()}", "home folder"),
        (f"file://{tmp_path}", "contains the input"),
        (f"file://localhost{tmp_path / 'in'}/", "contains the input"),
        ("file://otherhost/data", "another host"),
    ):
        with pytest.raises(OutputError, match=why):
            check_output(bad, str(tmp_path / "in" / "*.tar"))
    with pytest.raises(OutputError, match="contains the input"):  # the input as file:// too
        check_output(str(tmp_path), f"file://{tmp_path / 'in' / 'a.jsonl'}")
    for bad, source, why in (
        ("gs://bucket", "gs://bucket/data/x.jsonl", "bucket root"),
        ("gs://bucket/", "/local/in", "bucket root"),
        ("s3://bucket//", "/local/in", "bucket root"),
        ("gs://b/data", "gs://b/data/shards/*.tar", "contains the input"),
        ("gs://b/data/", "gs://b/data", "contains the input"),
        ("gs://b/data", "gs://b//data/./m.jsonl", "contains the input"),
        ("gs://b/x/../data", "gs://b/y", "'..'"),
    ):
        with pytest.raises(OutputError, match=why):
            check_output(bad, source)
    assert check_output("gs://b/data2", "gs://b/data/x.jsonl") == "gs://b/data2"
    assert check_output("gs://b/data", "gs://c/data/x.jsonl") == "gs://b/data"
    assert check_output("gs://b/data", "s3://b/data/x.jsonl") == "gs://b/data"
    assert check_output(f"file://{tmp_path / 'o'}", str(tmp_path / "in")) == str(tmp_path / "o")
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "data" / "mine.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="did not write"):
        check_output(str(user), str(tmp_path / "in"))
    assert check_output(str(tmp_path / "fresh"), str(tmp_path / "in")) == str(tmp_path / "fresh")


def test_cli_refuses_output_root_and_writes_nothing(tmp_path):
    manifest = make_inputs(tmp_path / "in", 2)
    before = tree(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "babelcap.cli",
            "augment",
            "--input",
            str(manifest),
            "--output",
            "/",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0 and "filesystem root" in proc.stderr
    assert tree(tmp_path) == before  # not the current folder either


def test_run_touches_only_its_own_files(tmp_path):
    """User files inside and around the output survive runs, re-runs and an overwrite."""
    manifest = make_inputs(tmp_path / "in", 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "shards").mkdir()
    (out / "shards" / "mine.tar").write_bytes(b"tar of mine")
    (out / "README.md").write_text("# my own readme\n")
    (tmp_path / "beside.txt").write_text("neighbour")
    around = tree(tmp_path, skip=("out",))
    run(config(manifest, out), workers=1, echo=False)
    run(config(manifest, out, seed=1, overwrite=True), workers=1, echo=False)
    assert tree(tmp_path, skip=("out",)) == around
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "shards" / "mine.tar").read_bytes() == b"tar of mine"
    assert (out / "README.md").read_text() == "# my own readme\n"  # no card over it
    assert find_shards(out).num_rows == 10


# --- the lock ----------------------------------------------------------------------------------
def test_second_run_fails_while_the_first_holds_the_output(tmp_path, capsys):
    manifest = make_inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    # A live process holds the output (as a running augment would).
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {
            "run_id": "20260101T000000-0123abcd",
            "pid": holder.pid,
            "host": socket.gethostname(),
        }
        (out / "_lock").write_text(json.dumps(lock))
        with pytest.raises(OutputLockedError, match="20260101T000000-0123abcd"):
            run(config(manifest, out), workers=1, echo=False)
        assert json.loads((out / "_lock").read_text()) == lock  # the holder's lock stays
        assert not (out / "data").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Its process is gone: the stale lock is taken over, with a message.
    run(config(manifest, out), workers=1, echo=False)
    assert "taking it over" in capsys.readouterr().out
    assert not (out / "_lock").exists() and find_shards(out).num_rows == 3


LOCK_CONTENDER = r"""
import sys, time
from pathlib import Path
from babelcap.pipelines import publish

out, me = Path(sys.argv[1]), sys.argv[2]
judge = publish._pid_alive


def slow_judge(pid):  # a slow check: every contender judges the same dead holder at once
    alive = judge(pid)
    time.sleep(0.3)
    return alive


publish._pid_alive = slow_judge
lock = publish.OutputLock(str(out), me)
(out.parent / f"ready-{me}").touch()
while not (out.parent / "go").exists():
    time.sleep(0.002)
try:
    lock.acquire()
except publish.OutputLockedError:
    print("locked", flush=True)
    sys.exit(0)
print("won", flush=True)
while not (out.parent / "stop").exists():
    time.sleep(0.02)
lock.release()
"""


def _last_word(proc: subprocess.Popen) -> str:
    """A contender's verdict: "won" or "locked" (the taker prints a note first)."""
    for line in proc.stdout:
        if line.strip() in ("won", "locked"):
            return line.strip()
    return ""


@pytest.mark.slow
def test_runs_finding_the_same_dead_holder_never_both_take_the_output(tmp_path, capfd):
    """Six processes start together on an output whose lock a dead process left: exactly one
    takes it over, the others fail naming it (issue 13 audit, G7)."""
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = {"run_id": "20200101T000000-deadbeef", "pid": gone.pid, "host": socket.gethostname()}
    (out / "_lock").write_text(json.dumps(stale))
    names = [f"20260101T00000{i}-0000000{i}" for i in range(6)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOCK_CONTENDER, str(out), name],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready-{n}").exists() for n in names):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        (tmp_path / "go").touch()
        said = {n: _last_word(p) for n, p in zip(names, procs, strict=True)}
        winners = [n for n, word in said.items() if word == "won"]
        assert len(winners) == 1, said
        assert sorted(said.values()) == ["locked"] * 5 + ["won"]
        assert json.loads((out / "_lock").read_text())["run_id"] == winners[0]
        # the lock appeared whole: no temporary file is left beside it
        assert sorted(p.name for p in out.iterdir()) == ["_lock"]
    finally:
        (tmp_path / "stop").touch()
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0] * 6
    assert not (out / "_lock").exists()  # released by its holder
    assert capfd.readouterr().err.count("taking over the lock") == 1


def test_a_live_lock_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = OutputLock(str(out), "20260101T000000-00000001")
    mine.acquire()
    try:
        with pytest.raises(OutputLockedError, match="20260101T000000-00000001"):
            OutputLock(str(out), "20260101T000000-00000002").acquire()
        (out / "_lock").write_text("{not json")  # unreadable: not proof the holder is gone
        with pytest.raises(OutputLockedError, match="run \\?"):
            OutputLock(str(out), "20260101T000000-00000003").acquire()
    finally:
        (out / "_lock").unlink()


def test_stale_staging_is_removed_and_never_read(tmp_path):
    manifest = make_inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    stale = out / "_staging" / "20200101T000000-deadbeef" / "unit-00000" / "data"
    stale.mkdir(parents=True)
    schema_file = stale / "train-00000-of-00001.parquet"
    from babelcap.core.shards import write_shard

    write_shard(schema_file, [{"image_id": "f" * 64, "captions": []}])
    with pytest.raises(IncompleteOutputError):
        find_shards(out)  # a crashed run's staging is not an output's data
    run(config(manifest, out), workers=1, echo=False)
    assert not (out / "_staging").exists()
    assert find_shards(out).num_rows == 3


# --- the guard ---------------------------------------------------------------------------------
def test_mostly_failed_or_empty_run_leaves_the_previous_output_byte_identical(done, tmp_path):
    out = done["out"]
    before = tree(out, skip=("_staging",))
    bad = make_inputs(tmp_path / "bad", 2, missing=6)  # 6 of 8 inputs dead
    with pytest.raises(PublishGuardError, match=r"6 of 8 inputs dead-lettered"):
        run(config(bad, out, overwrite=True), workers=1, echo=False)
    assert tree(out, skip=("_staging",)) == before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PublishGuardError, match="no inputs"):
        run(config(empty, out, overwrite=True), workers=1, echo=False)
    assert tree(out, skip=("_staging",)) == before
    assert find_shards(out).num_rows == 27


@pytest.mark.slow
def test_overwrite_that_fails_the_guard_leaves_the_previous_output_byte_identical(done, tmp_path):
    """The real --overwrite replacement (another seed: every unit would be replaced), run by
    the multi-process runner, fails its guard: the old output is left exactly as it was."""
    out = tmp_path / "copy"
    shutil.copytree(done["out"], out)
    before = tree(out)
    bad = make_inputs(tmp_path / "bad", 2, missing=6)
    with pytest.raises(ConfigMismatchError, match="seed"):  # without --overwrite: refused
        run(config(bad, out, seed=5), workers=1, echo=False)
    with pytest.raises(PublishGuardError, match=r"6 of 8 inputs dead-lettered"):
        run(config(bad, out, seed=5, overwrite=True), workers=2, echo=False)
    assert tree(out, skip=("_staging",)) == before
    assert find_shards(out).num_rows == 27
    # and a replacement that passes the guard does replace it
    good = make_inputs(tmp_path / "good", 5)
    run(config(good, out, seed=5, overwrite=True), workers=1, echo=False)
    assert find_shards(out).num_rows == 5
    assert json.loads((out / "run_manifest.json").read_text())["accounting"]["inputs"] == 5


def test_another_configuration_is_refused_naming_the_keys(done):
    with pytest.raises(ConfigMismatchError, match=r"seed, store_image"):
        run(
            config(done["manifest"], done["out"], seed=3, store_image="path"),
            workers=1,
            echo=False,
        )


# --- unit records ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "listed",
    [
        "../victim.parquet",
        "{victim}",
        "notes.txt",
        "data/unit-00001/../../../victim.parquet",
        "dead_letter/unit-00002.parquet",  # another unit's file
        "data/unit-00001/train-00000-of-00001.parquet/../../../../victim.parquet",
    ],
)
def test_a_unit_record_listing_other_files_stops_the_run_before_it_changes_anything(
    done, tmp_path, listed
):
    out = tmp_path / "copy"
    shutil.copytree(done["out"], out)
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    path = out / "_units" / "unit-00001.json"
    record = json.loads(path.read_text())
    own = [out / f["path"] for f in record["files"]]
    record["files"].append({"kind": "shard", "path": listed.format(victim=victim), "rows": 1})
    path.write_text(json.dumps(record))
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="not one of babelcap's own file names"):
        run(config(done["manifest"], out, seed=9, overwrite=True), workers=1, echo=False)
    assert tree(tmp_path, skip=("copy/_staging",)) == before
    with pytest.raises(OutputError, match="not one of babelcap's own file names"):
        remove_unit_files(str(out), "unit-00001", record)
    assert all(p.exists() for p in own)  # checked before anything is deleted
    assert victim.read_bytes() == b"mine" and (out / "notes.txt").read_text() == "mine"


# --- world build and convert-translator -------------------------------------------------------
def test_world_build_never_replaces_a_users_images(tmp_path):
    from babelcap.world.build import build_world

    mine = tmp_path / "photos"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.jpg").write_bytes(b"precious")
    (mine / "gold").mkdir()
    with pytest.raises(FileExistsError, match="not a babelcap world"):
        build_world(mine, n_images=4, workers=1, progress=False)
    # a world.json of someone else's is not proof either (issue 13 audit, G9)
    (mine / "world.json").write_text(json.dumps({"version": 1, "name": "my photo world"}))
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="not a babelcap world"):
        build_world(mine, n_images=4, workers=1, progress=False)
    assert tree(tmp_path) == before
    world = tmp_path / "world"
    build_world(world, n_images=4, workers=1, progress=False)
    (world / "images" / "train" / "notes.txt").write_text("mine")  # a user's file in a world
    (world / ".babelcap-world").unlink()  # world.json alone (babelcap's keys) is proof enough
    build_world(world, n_images=5, workers=1, progress=False)  # a world: rebuilt in place
    assert len(list((world / "images").rglob("*.png"))) == 5
    assert (world / "images" / "train" / "notes.txt").read_text() == "mine"


def test_convert_force_replaces_only_an_earlier_conversion(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    import pipeline_testkit as kit

    from babelcap.translators import convert_model

    ct2 = kit.tiny_translator(tmp_path / "tr", languages=("pt",))
    hf = tmp_path / "tr-hf"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a converted translator"):
        convert_model(hf, mine, force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    around = tree(tmp_path, skip=("tr",))
    convert_model(hf, ct2, force=True)  # an earlier conversion: replaced
    assert (ct2 / "model.bin").exists()
    assert tree(tmp_path, skip=("tr",)) == around  # nothing beside it changed or was left
    # a file of the user's inside the conversion's folder survives --force (audit G9)
    (ct2 / "NOTES.md").write_text("where this model came from")
    (ct2 / "eval").mkdir()
    (ct2 / "eval" / "bleu.txt").write_text("31.2")
    old_meta = json.loads((ct2 / "babelcap-translator.json").read_text())
    (ct2 / "stale_vocabulary.txt").write_text("x")  # not recorded: not the conversion's
    convert_model(hf, ct2, force=True)
    assert (ct2 / "NOTES.md").read_text() == "where this model came from"
    assert (ct2 / "eval" / "bleu.txt").read_text() == "31.2"
    assert (ct2 / "stale_vocabulary.txt").read_text() == "x"
    meta = json.loads((ct2 / "babelcap-translator.json").read_text())
    assert meta["model_id"] == old_meta["model_id"] and "model.bin" in meta["files"]
    assert {p.name for p in ct2.iterdir()} == {
        *meta["files"],
        "babelcap-translator.json",
        "NOTES.md",
        "eval",
        "stale_vocabulary.txt",
    }
    assert tree(tmp_path, skip=("tr",)) == around


# --- what the ecosystem reads ------------------------------------------------------------------
def test_output_layout_and_card(done):
    out = done["out"]
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    data = [n for n in names if n.startswith("data/")]
    assert data and all(n.split("/")[1].startswith("unit-") for n in data)
    assert all(n.endswith(".parquet") for n in data)
    assert {n.split("/")[-1].split("-")[0] for n in data} == {"train", "validation", "test"}
    assert [n for n in names if n.startswith("dead_letter/")]
    card = (out / "README.md").read_text()
    header = card.split("---")[1]
    assert 'path: "data/*/train-*.parquet"' in header and "- en" in header
    assert "size_categories:\n- n<1K" in header
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["complete"] and len(manifest["units"]) == 4  # ceil(30 / 8)
    assert manifest["accounting"] == {
        "inputs": 30,
        "rows_written": 27,
        "dead_lettered": 3,
        "duplicates_dropped": 0,
        "balanced": True,
    }
    assert manifest["splits"] == {"test": 3, "train": 21, "validation": 3}

    # The card's sections, from the manifest; no folder of this machine in either.
    import yaml
    from datasets import Features

    meta = yaml.safe_load(header)
    features = json.loads(pq.read_schema(find_shards(out).files[0]).metadata[b"huggingface"])
    want = Features.from_dict(features["info"]["features"])
    assert meta["dataset_info"]["features"] == want._to_yaml_list()
    assert {"name": "image", "dtype": "image"} in meta["dataset_info"]["features"]
    assert "license" not in meta and "# license: set the licence" in header
    assert "## Licence\n\nNot set" in card
    assert "## Models\n\n- none" in card  # a model-free run
    filters = card.split("## Filters\n\n```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(filters) == {"text": manifest["config"]["text"]}
    for line in ("- inputs: 30", "- rows written: 27", "- dead-lettered: 3", "units committed: 4"):
        assert line in card.split("## Accounting", 1)[1]
    assert "| language | source | all |" in card and "| en | 27 | 27 |" in card
    assert manifest["captions"] == {"en/source": 27}
    drops = {k: v for k, v in manifest["caption_drops"].items() if v}
    assert all(f"| {k} | {v} |" in card for k, v in drops.items())
    assert drops or "## Captions dropped by the filters\n\n- none" in card
    for text in (card, (out / "run_manifest.json").read_text()):
        assert str(done["root"]) not in text and os.path.realpath(done["root"]) not in text


def test_hugging_face_datasets_loads_the_output_folder(done):
    from datasets import load_dataset

    ds = load_dataset(str(done["out"]))
    assert {k: len(v) for k, v in ds.items()} == {"test": 3, "train": 21, "validation": 3}
    row = ds["test"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (24, 24)
    assert row["captions"][0]["language"] == "en" and row["split"] == "test"
    meta = pq.read_schema(find_shards(done["out"]).files[0]).metadata
    assert json.loads(meta[schema.META_HUGGINGFACE])["info"]["features"]["image"] == {
        "_type": "Image"
    }


def test_globs_of_duckdb_polars_and_pyarrow_agree_with_find_shards(done):
    import duckdb
    import polars as pl
    import pyarrow.dataset as pds

    out = done["out"]
    n = find_shards(out).num_rows
    assert n == 27
    con = duckdb.connect()
    assert (
        con.execute(f"SELECT count(*) FROM read_parquet('{out}/data/**/*.parquet')").fetchall()[0][
            0
        ]
        == n
    )
    assert pl.scan_parquet(f"{out}/data/**/*.parquet").select(pl.len()).collect().item() == n
    assert pds.dataset(out / "data", format="parquet").count_rows() == n
    dead = con.execute(f"SELECT count(*) FROM read_parquet('{out}/dead_letter/*.parquet')")
    assert dead.fetchall()[0][0] == find_shards(out, kind="dead_letter").num_rows == 3


def test_readers_see_only_committed_units(done, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(done["out"], out)
    record = out / "_units" / "unit-00001.json"
    rows = json.loads(record.read_text())["accounting"]["rows_written"]
    record.unlink()  # unit 1's files are in place but its commit record is not
    assert find_shards(out).num_rows == 27 - rows
    assert find_shards(out / "data").num_rows == 27 - rows
    assert find_shards(str(out / "data" / "*" / "*.parquet")).num_rows == 27 - rows

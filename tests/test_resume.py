"""Incremental, resumable augmentation (issue 14): real `babelcap augment` child processes
killed with SIGKILL at several points, then resumed; adding images; two concurrent runs.

Inputs are generated PNGs with alt-text (no models), so each unit costs a pipeline start and
little else; units of 3 inputs, one unit per wave, so there are many commit points to hit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_publish import make_inputs

from babelcap.core import schema
from babelcap.core.shards import find_shards

pytestmark = pytest.mark.slow  # whole augment runs in child processes
N = 12  # 4 units of 3


def augment_cmd(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "babelcap.cli",
        "augment",
        "--input",
        str(manifest),
        "--output",
        str(out),
        "--unit-size",
        "3",
        "--units-per-wave",
        "1",
        "--workers",
        "1",
        *extra,
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def rows(out: Path, kind: str = schema.KIND_SHARD) -> list[dict]:
    files = find_shards(out, kind=kind).files
    table = pa.concat_tables([pq.read_table(f) for f in files])
    key = "image_id" if kind == schema.KIND_SHARD else "input_ref"
    return table.sort_by(key).to_pylist()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    """One uninterrupted run through the CLI (its progress bar on stderr)."""
    root = tmp_path_factory.mktemp("resume")
    manifest = make_inputs(root / "in", N - 1, missing=1)
    out = root / "clean"
    proc = subprocess.run(augment_cmd(manifest, out), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4/4" in proc.stderr and "unit" in proc.stderr  # progress: units done, ETA
    manifest_out = json.loads((out / "run_manifest.json").read_text())
    return {"root": root, "manifest": manifest, "out": out, "books": manifest_out["accounting"]}


def _kill_when(cmd: list[str], ready, timeout: float = 240) -> bool:
    """Start the command, SIGKILL it as soon as `ready()` holds; False if it ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _staged(out: Path, what: str) -> bool:
    return any((out / "_staging").glob(f"*/{what}"))


@pytest.mark.parametrize(
    "point",
    [
        "writing",  # the first wave's pipeline is writing its unit
        "after_commits",  # two units committed, the next wave computing
        "committing",  # a unit's data folder is being moved in
    ],
)
def test_kill_then_resume_gives_the_rows_of_one_uninterrupted_run(clean, tmp_path, point):
    out = tmp_path / "out"
    ready = {
        "writing": lambda: _staged(out, "unit-00000/data"),
        "after_commits": lambda: (out / "_units" / "unit-00001.json").exists(),
        "committing": lambda: (out / "data" / "unit-00002").exists(),
    }[point]
    killed = _kill_when(augment_cmd(clean["manifest"], out), ready)
    assert killed, "the run finished before the kill point"
    committed = (
        sorted(p.name for p in (out / "_units").glob("unit-*.json"))
        if (out / "_units").exists()
        else []
    )
    assert len(committed) < 4
    assert (out / "_lock").exists()  # left by the killed run: taken over on resume

    proc = subprocess.run(
        augment_cmd(clean["manifest"], out), capture_output=True, text=True, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking it over" in proc.stdout
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["this_run"]["units"] == 4 - len(committed)  # only what was missing
    assert manifest["complete"] and manifest["accounting"] == clean["books"]
    assert rows(out) == rows(clean["out"])
    assert rows(out, schema.KIND_DEAD_LETTER) == rows(clean["out"], schema.KIND_DEAD_LETTER)
    assert not (out / "_staging").exists() and not (out / "_lock").exists()


def test_adding_images_computes_only_the_new_ones(clean, tmp_path):
    root = tmp_path
    manifest = make_inputs(root / "in", 6)
    out = root / "out"
    first = subprocess.run(augment_cmd(manifest, out), capture_output=True, text=True, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    make_inputs(root / "in", 4, start=6)  # 4 new images appended to the manifest
    with open(manifest, "a") as f:  # and the first image once more
        f.write(json.dumps({"image_path": str(root / "in" / "images" / "0000.png")}) + "\n")
    proc = subprocess.run(augment_cmd(manifest, out), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "run_manifest.json").read_text())
    assert result["this_run"]["units"] == 2  # 5 new inputs: units 2 and 3, nothing else
    assert result["this_run"]["accounting"] == {
        "inputs": 5,
        "rows_written": 4,
        "dead_lettered": 0,
        "duplicates_dropped": 1,
        "balanced": True,
    }
    assert result["dead_letters"] == {"dedup/already_present": 1}
    assert len(rows(out)) == 10 and len({r["image_id"] for r in rows(out)}) == 10


def test_two_concurrent_runs_cannot_both_write(clean, tmp_path):
    """The first run is frozen (SIGSTOP) while it holds the output: a second run fails naming
    it and writes nothing; the first, thawed, finishes with the rows of a clean run."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        augment_cmd(clean["manifest"], out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        lock = out / "_lock"
        while not (lock.exists() and lock.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.005)  # written in one call: a size means the whole lock
        first.send_signal(signal.SIGSTOP)
        holder = json.loads((out / "_lock").read_text())
        second = subprocess.run(
            augment_cmd(clean["manifest"], out), capture_output=True, text=True, env=ENV
        )
        assert second.returncode != 0 and "is being written by run" in second.stderr
        assert holder["run_id"] in second.stderr
        assert json.loads((out / "_lock").read_text()) == holder
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)  # reads stderr as it comes (a full pipe stalls)
    assert first.returncode == 0, err[-3000:]
    assert rows(out) == rows(clean["out"])

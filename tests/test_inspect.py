"""`babelcap inspect`: splits, the run's caption drops, honest sample counts, escaped values,
and quiet on a closed pipe (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from babelcap.cli import main
from babelcap.core import schema
from babelcap.core.shards import RUN_MANIFEST, write_shard
from babelcap.pipelines.inspect import cell, format_report, inspect_paths, printable

C = schema.caption
BABELCAP = str(Path(sys.executable).parent / "babelcap")
EVIL = "\x1b[31mred\x1b[0m \u202eevil\x9b2J"


def _output(root: Path, rows: list[dict], drops: dict | None = None, dead: list | None = None):
    """An augment-output-like folder: shards, dead letters and a run manifest."""
    (root / "shards").mkdir(parents=True)
    (root / "dead_letter").mkdir()
    write_shard(root / "shards" / "shard-00000.parquet", rows)
    write_shard(
        root / "dead_letter" / "dead-letter-00000.parquet",
        dead or [],
        kind=schema.KIND_DEAD_LETTER,
    )
    manifest = {"run_id": "r1", "caption_drops": drops or {}, "accounting": {"inputs": 1}}
    (root / RUN_MANIFEST).write_text(json.dumps(manifest))
    return root


def _row(i: int, split: str | None, caps: list[dict], text_len: int = 0) -> dict:
    return {
        "image_id": f"{i:064x}",
        "source_uri": f"img/{i}.png",
        "split": split,
        "image": None,
        "width": None,
        "height": None,
        "captions": caps or [C("x" * max(1, text_len), "en", "synthetic")],
    }


def test_splits_caption_drops_and_honest_sample_counts(tmp_path):
    many = [C(f"caption {k}", "en", "synthetic") for k in range(20)]
    rows = [_row(0, "train", many)]
    rows += [_row(i, "train", []) for i in range(1, 12)]
    rows += [_row(i, "test", []) for i in range(12, 17)] + [_row(17, None, [])]
    drops = {"source.empty": 2, "translate.degenerate": 5, "text.too_short": 0}
    out = _output(tmp_path / "out", rows, drops)
    data = inspect_paths(str(out), n_samples=3)
    assert data["by_split"] == {"(none)": 1, "test": 5, "train": 12}
    assert data["caption_drops"] == {"source.empty": 2, "translate.degenerate": 5}
    assert data["runs"][0]["run_id"] == "r1"
    text = format_report(data)
    assert "| train | 12 |" in text and "| test | 5 |" in text and "| (none) | 1 |" in text
    assert "captions dropped by the run: 7" in text
    assert "| translate.degenerate | 5 |" in text
    assert "samples: showing 3 of 18 rows" in text
    assert "showing 8 of 20 captions" in text
    # the same through a shard file inside the output: its manifest is found above it
    one = inspect_paths(str(out / "shards" / "shard-00000.parquet"), n_samples=0)
    assert one["caption_drops"] == data["caption_drops"] and one["samples"] == []


def test_values_from_files_are_escaped(tmp_path):
    rows = [_row(0, "tr|ain\nx", [C(EVIL, "p|t", "translated"), C("ok", "en", "source")])]
    dead = [schema.dead_letter("ref", "decode", "bad|kind\n| fake | row |", "m")]
    out = _output(tmp_path / "out", rows, {"x\x1b]0;title\x07": 1}, dead)
    text = format_report(inspect_paths(str(out), n_samples=5))
    controls = {ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf") and ch != "\n"}
    assert controls == set(), controls
    assert "\\x1b[31mred\\x1b[0m \\u202eevil\\x9b2J" in text  # visible, not interpreted
    header_cells = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header_cells = None
            continue
        cells = line.replace("\\|", "").count("|") - 1
        if header_cells is None:  # a table's first line is its header
            header_cells = cells
        assert cells == header_cells, line  # each table row keeps its table's columns
    assert "| p\\|t |" in text and "| decode | bad\\|kind\\x0a\\| fake \\| row \\| | 1 |" in text
    assert cell("a\\|b") == "a\\\\\\|b" and printable("हिन्दी\u200d") == "हिन्दी\u200d"

    # --json: valid JSON that reads back to the same values, with no raw control characters
    proc = subprocess.run([BABELCAP, "inspect", str(out), "--json"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    raw = proc.stdout.decode()
    assert not {ch for ch in raw if unicodedata.category(ch) in ("Cc", "Cf") and ch != "\n"}
    data = json.loads(raw)
    assert data["samples"][0]["captions"][0]["text"] == EVIL


@pytest.fixture
def big_output(tmp_path) -> Path:
    """Enough sample text (> a pipe buffer) that the writer meets the closed pipe."""
    rows = [_row(i, "train", [], text_len=400) for i in range(400)]
    return _output(tmp_path / "big", rows)


def test_closed_pipe_is_quiet(big_output):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [BABELCAP, "inspect", str(big_output), "--samples", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait() == 0
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err

    shell = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"'{BABELCAP}' inspect '{big_output}' --samples 400 | head -n 2",
        ],
        capture_output=True,
        env=env,
    )
    assert shell.returncode == 0 and shell.stdout.decode().startswith("files: 2")
    assert b"Traceback" not in shell.stderr and b"BrokenPipe" not in shell.stderr, shell.stderr


def test_inspect_cli_still_reports_missing_paths(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err

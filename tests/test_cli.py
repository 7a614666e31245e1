"""The command line's front door: every command is quiet when its reader goes away
(`babelcap ... | head`), a broken pipe that is not stdout's still fails loudly, and the
training command export-wds prints works as printed."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from babelcap.cli import main
from babelcap.core import schema
from babelcap.core.shards import write_shard

BABELCAP = str(Path(sys.executable).parent / "babelcap")
ENV_QUIET = {"PYTHONWARNINGS": "ignore"}

# A child running babelcap's real `main` with one extra command added to the real parser.
CHILD = textwrap.dedent(
    """
    import sys
    from babelcap import cli

    real = cli.build_parser

    def build():
        parser = real()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.add_parser("extra").set_defaults(func=COMMAND)
        return parser

    cli.build_parser = build
    sys.exit(cli.main(["extra"]))
    """
)
STREAM = """
def COMMAND(args):  # like `babelcap translate`: a line per chunk, flushed, for a long time
    for i in range(200_000):
        print(f"line {i}", flush=True)
    return 0
"""
BOOM = """
def COMMAND(args):  # a pipe of the command's own (a worker's) breaks: a real failure
    raise BrokenPipeError(32, "Broken pipe (a worker's)")
"""


def _tiny_shards(root: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    rows = [
        {
            "image_id": schema.image_id_for(data + bytes([i])),
            "source_uri": f"images/{i}.png",
            "split": "train",
            "image": {"bytes": data, "path": None},
            "width": 8,
            "height": 6,
            "captions": [
                schema.caption(f"a red square {i}", "en", "synthetic", score=0.3),
                schema.caption(f"um quadrado vermelho {i}", "pt", "translated", source_index=0),
            ],
        }
        for i in range(5)
    ]
    folder = root / "shards"
    folder.mkdir(parents=True)
    write_shard(folder / "part-0.parquet", rows)
    return folder


def _quiet(err: bytes) -> bool:
    return b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["world", "--help"], ["eval", "--help"], ["translate", "--help"], ["export-wds"]],
    ids=["help", "world", "eval", "translate", "export-wds"],
)
def test_every_command_is_quiet_on_a_closed_pipe(argv, tmp_path):
    if argv == ["export-wds"]:  # a real command's output (JSON + the training hint)
        argv = ["export-wds", str(_tiny_shards(tmp_path)), "--out", str(tmp_path / "wds")]
        argv += ["--lang", "pt"]
    proc = subprocess.Popen(
        [BABELCAP, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV_QUIET},
    )
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait() == 0, err
    assert _quiet(err), err


def test_a_command_cut_mid_stream_stops_quietly():
    shell = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f'{shlex.quote(sys.executable)} -c "$CHILD" | head -1'],
        capture_output=True,
        env={**os.environ, **ENV_QUIET, "CHILD": STREAM + CHILD},
        timeout=120,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout == b"line 0\n"
    assert _quiet(shell.stderr), shell.stderr


def test_a_broken_pipe_that_is_not_stdouts_still_fails():
    proc = subprocess.run(
        [sys.executable, "-c", BOOM + CHILD],
        capture_output=True,
        env={**os.environ, **ENV_QUIET},
        timeout=120,
    )
    assert proc.returncode == 1
    assert b"Traceback" in proc.stderr and b"a worker's" in proc.stderr


def test_export_wds_prints_a_training_command_that_works_as_printed(tmp_path, monkeypatch, capsys):
    shards = _tiny_shards(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["export-wds", str(shards), "--out", "wds-pt", "--lang", "pt"]) == 0
    printed, _, hint = capsys.readouterr().out.partition("\ntrain with open_clip")
    summary = json.loads(printed)
    hint = hint.strip().splitlines()[-1].strip()
    assert hint.startswith("cd EXPORT && python -m open_clip_train.main --model local-dir:. ")
    words = shlex.split(hint.split("&&", 1)[1])
    data = words[words.index("--train-data") + 1]
    assert Path(data).is_absolute()  # the command runs from inside the model export
    head, first, last, tail = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*)", data).groups()
    tars = [Path(f"{head}{i:0{len(first)}d}{tail}") for i in range(int(first), int(last) + 1)]
    assert tars and all(t.is_file() for t in tars)
    assert sorted(tars) == sorted((tmp_path / "wds-pt").glob("*.tar"))
    assert words[words.index("--train-num-samples") + 1] == str(summary["written"]) == "5"

"""open_clip's own trainer on babelcap's outputs, as the README shows it: `babelcap export-wds`
tars of a world output and `export_open_clip` of the world's CLIP, then a few real steps of
`python -m open_clip_train.main` (a subprocess on the CPU; no config edited by hand).

open_clip_train comes with the `openclip-train` extra (webdataset <= 0.2.86, pandas), which
the dev extra includes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip_train", reason="needs babelcap[openclip-train]")
pytestmark = pytest.mark.slow

BABELCAP = str(Path(sys.executable).parent / "babelcap")


def test_open_clip_train_runs_on_the_export(world_dir, world_models, tmp_path):
    from babelcap.models.clip import load_clip
    from babelcap.training.export import export_open_clip
    from babelcap.world.load import load_manifest
    from babelcap.world.shards import write_world_shards

    base = world_models("clip-base")["clip-base"]
    # A world output: every split, English alt-text and gold captions in pt.
    write_world_shards(world_dir, tmp_path / "out", ["en", "pt"], split=None, with_alt_text=True)
    export_open_clip(load_clip(str(base)), tmp_path / "export", name="world-clip")

    # The README's commands.
    wds = tmp_path / "wds"
    proc = subprocess.run(
        [BABELCAP, "export-wds", str(tmp_path / "out"), "--out", str(wds), "--lang", "pt"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((wds / "_info.json").read_text())
    sizes = json.loads((wds / "sizes.json").read_text())
    n_train = len(load_manifest(world_dir, "train"))
    assert info["written"] == sum(sizes.values()) == n_train and info["pattern"]
    batch = 32
    steps = n_train // batch
    logs = tmp_path / "logs"
    command = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", "local-dir:.",  # run from the export folder: its paths are relative
        "--dataset-type", "webdataset",
        "--train-data", str(wds / info["pattern"]),
        "--batch-size", str(batch),
        "--epochs", "1",
        "--lr", "1e-4",
        "--warmup", "2",
        "--workers", "0",
        "--precision", "fp32",
        "--device", "cpu",
        "--log-every-n-steps", "1",
        "--logs", str(logs),
        "--name", "oc",
        "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        command, cwd=tmp_path / "export", capture_output=True, text=True, env=env, timeout=900
    )
    log = (logs / "oc" / "out.log").read_text() if (logs / "oc" / "out.log").exists() else ""
    assert run.returncode == 0, run.stderr[-4000:] + log[-2000:]
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+) \(", log)]
    assert steps >= 5 and steps <= len(losses) <= steps + 1, log[-2000:]  # each step logged
    assert all(0 < x < 20 for x in losses)
    print(f"open_clip_train: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert (logs / "oc" / "checkpoints" / "epoch_1.pt").is_file()

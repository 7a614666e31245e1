"""World models built in parallel processes: independent models at the same time, a model only
after the models it requires, each once, a failure named (real spawned processes, toy
builders)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from babelcap.core.devices import available_cores
from babelcap.world import models as wm
from babelcap.world.models.parallel import build_models_parallel

BUILDER = '''
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).parent


def build(world_dir, out_dir, config):
    """Log the build; meet the builders named in `meet` (each must be running too)."""
    import torch

    name = config["name"]
    record = {"name": name, "pid": os.getpid(), "threads": torch.get_num_threads()}
    with open(ROOT / "builds.log", "a") as f:
        f.write(json.dumps(record) + "\\n")
    for dep in config.get("needs", []):  # `requires` kept: its stamp is there already
        assert (Path(world_dir) / "models" / dep / "babelcap-build.json").exists(), dep
    if config.get("fail"):
        raise ValueError("this toy model cannot be built")
    (ROOT / f"{name}.started").touch()
    for _ in range(600):  # at most 60 s: built one after another, they would never meet
        if all((ROOT / f"{other}.started").exists() for other in config.get("meet", [])):
            return {"name": name}
        time.sleep(0.1)
    raise TimeoutError(f"{name}: never ran at the same time as {config['meet']}")
'''


@pytest.fixture()
def toy_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A world folder and a registry of toy models (`a`, `b` independent, `c` after both)."""
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text(json.dumps({"toy": True}))
    src = tmp_path / "src"
    src.mkdir()
    (src / "toybuilder.py").write_text(textwrap.dedent(BUILDER))
    monkeypatch.syspath_prepend(str(src))  # spawned children start with the parent's sys.path
    specs = {
        "toy-a": wm.ModelSpec("toy-a", "toybuilder:build", {"name": "toy-a", "meet": ["toy-b"]}),
        "toy-b": wm.ModelSpec("toy-b", "toybuilder:build", {"name": "toy-b", "meet": ["toy-a"]}),
        "toy-c": wm.ModelSpec(
            "toy-c",
            "toybuilder:build",
            {"name": "toy-c", "needs": ["toy-a", "toy-b"]},
            requires=("toy-a", "toy-b"),
        ),
    }
    for name, spec in specs.items():
        monkeypatch.setitem(wm.MODELS, name, spec)
    yield world, src
    sys.modules.pop("toybuilder", None)


def _builds(src: Path) -> list[dict]:
    log = src / "builds.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_independent_models_build_at_once_requirements_first(toy_models):
    world, src = toy_models
    stamps = build_models_parallel(world, only=["toy-c"], jobs=2)

    builds = _builds(src)
    # toy-a and toy-b met (each waited for the other to start), so they ran at the same time,
    # in two processes other than this one; toy-c ran after both (it checks their stamps).
    assert sorted(b["name"] for b in builds[:2]) == ["toy-a", "toy-b"]
    assert builds[2]["name"] == "toy-c"
    assert len({b["pid"] for b in builds[:2]}) == 2 and os.getpid() not in {
        b["pid"] for b in builds
    }
    # Each build runs on its share of the cores: two builds never ask for more threads than cores.
    assert {b["threads"] for b in builds} == {max(1, available_cores() // 2)}
    assert set(stamps) == {"toy-a", "toy-b", "toy-c"}
    assert all(wm.is_built(world, name) for name in stamps)
    assert stamps["toy-c"]["summary"] == {"name": "toy-c"}

    # Built once: a second call reuses every model.
    again = build_models_parallel(world, only=["toy-c"], jobs=2)
    assert len(_builds(src)) == 3
    assert again == stamps


def test_a_failed_build_is_named_and_leaves_no_half_model(toy_models, monkeypatch):
    world, src = toy_models
    spec = wm.MODELS["toy-b"]
    monkeypatch.setitem(
        wm.MODELS, "toy-b", wm.ModelSpec("toy-b", spec.builder, {"name": "toy-b", "fail": True})
    )
    monkeypatch.setitem(  # toy-a alone: nothing to meet
        wm.MODELS, "toy-a", wm.ModelSpec("toy-a", spec.builder, {"name": "toy-a"})
    )
    with pytest.raises(RuntimeError, match=r"toy-b.*cannot be built"):
        build_models_parallel(world, only=["toy-c"], jobs=2)
    assert wm.is_built(world, "toy-a")  # the independent model finished and kept its stamp
    assert not wm.is_built(world, "toy-b") and not wm.is_built(world, "toy-c")
    assert "toy-c" not in {b["name"] for b in _builds(src)}  # never started without toy-b


def test_one_job_or_one_model_builds_in_this_process(toy_models, monkeypatch):
    world, src = toy_models
    monkeypatch.setitem(
        wm.MODELS, "toy-a", wm.ModelSpec("toy-a", "toybuilder:build", {"name": "toy-a"})
    )
    build_models_parallel(world, only=["toy-a"])
    assert [(b["name"], b["pid"]) for b in _builds(src)] == [("toy-a", os.getpid())]
    with pytest.raises(ValueError, match="jobs"):
        build_models_parallel(world, only=["toy-a"], jobs=0)


def test_a_spec_replaced_at_run_time_is_the_one_built(toy_models, monkeypatch):
    """The child builds the parent's spec, even under the name of a default model (whose
    module registers the default on import in the child)."""
    world, src = toy_models
    wm._register_all()
    spec = wm.ModelSpec("captioner", "toybuilder:build", {"name": "captioner", "meet": ["toy-a"]})
    monkeypatch.setitem(wm.MODELS, "captioner", spec)
    monkeypatch.setitem(
        wm.MODELS,
        "toy-a",
        wm.ModelSpec("toy-a", "toybuilder:build", {"name": "toy-a", "meet": ["captioner"]}),
    )
    stamps = build_models_parallel(world, only=["toy-a", "captioner"], jobs=2)
    assert stamps["captioner"]["summary"] == {"name": "captioner"}
    assert sorted(b["name"] for b in _builds(src)) == ["captioner", "toy-a"]

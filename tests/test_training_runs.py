"""The training package's house: methods are parameter selection + loss, drivers are known by
name, the trainer imports neither, and no run changes the user's configuration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from babelcap.training.config import TrainConfig

METHOD_MODULES = ("babelcap.training.alignment", "babelcap.training.continual.method")
DRIVER_MODULES = (
    "babelcap.training.runs",
    "babelcap.training.alignment_driver",
    "babelcap.training.continual.driver",
)


def _loaded_after(module: str) -> set[str]:
    """babelcap modules in sys.modules after importing `module` in a fresh interpreter."""
    code = (
        f"import json, sys, {module}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('babelcap'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_trainer_imports_no_method_plugin_and_no_driver():
    loaded = _loaded_after("babelcap.training.trainer")
    assert "babelcap.training.methods" in loaded  # the CLIP method it builds by default
    plugins = {
        m
        for m in loaded
        if m.startswith(("babelcap.training.alignment", "babelcap.training.continual"))
    }
    assert not plugins, plugins
    assert not loaded & set(DRIVER_MODULES)


@pytest.mark.parametrize("module", METHOD_MODULES)
def test_method_modules_import_neither_trainer_nor_drivers(module):
    loaded = _loaded_after(module)
    assert "babelcap.training.trainer" not in loaded
    assert not loaded & set(DRIVER_MODULES)


def test_registry_maps_names_to_method_classes_and_drivers():
    from babelcap.training import runs
    from babelcap.training.methods import ClipMethod

    assert set(runs.METHODS) == {"clip", "capivara", "alignment", "continual"}
    for name, cls in runs.METHODS.items():
        assert isinstance(cls, type) and issubclass(cls, ClipMethod), name
        # A method is parameters + loss: runs are drivers, looked up by name, never `cls.run`.
        assert not hasattr(cls, "run"), name
    assert set(runs.DRIVERS) == {"alignment", "continual"} <= set(runs.METHODS)
    assert runs.build_method(TrainConfig().method).__class__ is ClipMethod
    with pytest.raises(ValueError, match=r"unknown training method 'nope'.*alignment"):
        runs.method_class("nope")


def test_run_dispatches_by_name(monkeypatch):
    from babelcap.training import runs, trainer

    calls: list[tuple[str, object]] = []
    monkeypatch.setitem(runs.DRIVERS, "continual", lambda cfg: calls.append(("driver", cfg)))
    monkeypatch.setattr(
        trainer, "train", lambda cfg, bundle=None, method=None: calls.append(("train", method))
    )
    continual = TrainConfig.from_dict({"method": {"name": "continual"}})
    runs.run(continual)
    runs.run(TrainConfig.from_dict({"method": {"name": "capivara"}}))
    assert calls == [("driver", continual), ("train", runs.build_method)]
    with pytest.raises(ValueError, match="unknown training method"):
        runs.run(TrainConfig.from_dict({"method": {"name": "contiunal"}}))
    assert len(calls) == 2


def test_trainer_builds_only_the_clip_method_itself(tmp_path):
    from babelcap.training.trainer import Trainer

    cfg = TrainConfig.from_dict(
        {"method": {"name": "alignment"}, "run": {"output_dir": str(tmp_path), "device": "cpu"}}
    )
    # Refused before any model is loaded (the default model name is not even available here).
    with pytest.raises(ValueError, match=r"'alignment'.*babelcap\.training\.runs"):
        Trainer(cfg)


@pytest.mark.parametrize(
    "pairing,adapters,languages,origins,adapter_languages",
    [
        ("native-en", "per_language", ["en", "pt", "es"], ["gold", "source"], ["pt", "es"]),
        ("native-mt", "per_language", ["pt"], ["translated"], ["pt"]),
        ("translate-test", "shared", ["pt"], ["translated"], None),
    ],
)
def test_alignment_driver_derives_a_copy(pairing, adapters, languages, origins, adapter_languages):
    from babelcap.training.alignment_driver import alignment_config

    cfg = TrainConfig.from_dict(
        {
            "data": {"languages": languages},
            "method": {"name": "alignment", "options": {"pairing": pairing, "adapters": adapters}},
        }
    )
    asked = cfg.to_dict()
    derived = alignment_config(cfg)
    assert cfg.to_dict() == asked
    assert derived.data.with_source and derived.data.origins == origins
    assert derived.method.options.get("languages") == adapter_languages
    if pairing == "translate-test":
        assert derived.data.languages == ["en"]

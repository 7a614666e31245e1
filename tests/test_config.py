"""The one configuration system (babelcap.core.config): augment and train configs are typed,
validated, reject unknown keys by name, parse numbers one way, and take YAML files, dotted
overrides, `${name}` variables and flags derived from their fields."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest

from babelcap.cli import build_parser, main
from babelcap.core.config import ConfigError, apply_overrides, parse_value
from babelcap.pipelines.options import (
    AugmentConfig,
    CaptionerConfig,
    ClipConfig,
    TextFilterConfig,
    TranslationStageConfig,
)
from babelcap.training.config import LoraConfig, MethodConfig, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def _augment_config(argv: list[str]) -> AugmentConfig:
    from babelcap.commands.augment import config_from_args

    return config_from_args(build_parser().parse_args(["augment", *argv]))


def _train_config(argv: list[str]) -> TrainConfig:
    from babelcap.commands.train import config_from_args

    return config_from_args(build_parser().parse_args(["train", *argv]))


# --- augment -----------------------------------------------------------------------------


def test_yaml_augment_config_reads_exponent_floats(tmp_path):
    path = tmp_path / "augment.yaml"
    path.write_text(
        f"input: {tmp_path / 'in'}\noutput: {tmp_path / 'out'}\n"
        "clip:\n  model: clipdir\n  score_threshold: 2e-1\n"
        "text: {near_duplicate_threshold: 1.0e-2}\n"
    )
    cfg = _augment_config(["--config", str(path)])
    assert cfg.clip.score_threshold == 0.2 and isinstance(cfg.clip.score_threshold, float)
    assert cfg.text.near_duplicate_threshold == 0.01
    # The same parser for flags and overrides.
    cfg = _augment_config(["--config", str(path), "--clip-threshold", "3e-1"])
    assert cfg.clip.score_threshold == 0.3
    cfg = _augment_config(["--config", str(path), "--set", "clip.score_threshold=4e-1"])
    assert cfg.clip.score_threshold == 0.4


def test_misspelt_augment_key_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    path = tmp_path / "augment.yaml"
    path.write_text(
        f"input: {tmp_path / 'in'}\noutput: {out}\n"
        "clip:\n  model: clipdir\n  score_threshold: 2e-1\n  scor_threshold: 0.3\n"
    )
    assert main(["augment", "--config", str(path), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "clip.scor_threshold" in err and "unknown config key" in err
    assert "did you mean 'score_threshold'" in err and str(path) in err
    assert not out.exists()  # no output folder, no staging: nothing started

    # A misspelt key given with --set or --filter is refused the same way.
    with pytest.raises(ConfigError, match=r"text\.min_word'"):
        _augment_config(["--input", "i", "--output", "o", "--set", "text.min_word=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _augment_config(["--input", "i", "--output", "o", "--filter", "min_word=3"])


def test_augment_values_are_validated():
    with pytest.raises(ConfigError, match="store_image"):
        AugmentConfig(input="i", output="o", store_image="png")
    with pytest.raises(ConfigError, match="input_format"):
        AugmentConfig.from_dict({"input": "i", "output": "o", "input_format": "tar"})
    with pytest.raises(ConfigError, match=r"clip\.top_k"):
        AugmentConfig.from_dict({"input": "i", "output": "o", "clip": {"model": "m", "top_k": "x"}})
    with pytest.raises(ConfigError, match="seed: expected a number"):
        AugmentConfig(input="i", output="o", seed=True)
    with pytest.raises(ConfigError, match="no translator"):
        AugmentConfig(input="i", output="o", languages="pt")
    with pytest.raises(ConfigError, match="output: required"):
        _augment_config(["--input", "i"])
    cfg = AugmentConfig(
        input="i",
        output="o",
        languages="pt, es,,pt",
        translator=TranslationStageConfig(model="t"),
    )
    assert cfg.languages == ("pt", "es")


def test_augment_config_pickles_and_round_trips():
    cfg = AugmentConfig(
        input="in",
        output="out",
        languages=("pt", "es"),
        captioner=CaptionerConfig(model="cap", num_captions=3),
        translator=TranslationStageConfig(model="tr", options={"max_decoding_length": 8}),
        clip=ClipConfig(model="clip", score_threshold=0.2),
        text=TextFilterConfig(min_words=3),
        seed=7,
    )
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    from apache_beam.internal import pickler  # what Beam uses for DoFns

    assert pickler.loads(pickler.dumps(cfg)) == cfg
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-plain (Parquet metadata, manifest)
    assert AugmentConfig.from_dict(json.loads(json.dumps(data))) == cfg
    assert list(data)[:3] == ["input", "output", "languages"]  # field order: stable output
    assert hash(AugmentConfig.from_dict(data)) == hash(cfg)
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 1  # type: ignore[misc]
    changed = cfg.updated({"clip.top_k": 2})
    assert changed.clip.top_k == 2 and cfg.clip.top_k is None


def test_augment_flags_are_derived_from_the_config():
    cfg = _augment_config(
        [
            "--input",
            "i",
            "--output",
            "o",
            "--captioner",
            "cap",
            "--clip",
            "clipdir",
            "--device",
            "cpu",
            "--rows-per-shard",
            "50",
            "--image-extensions",
            ".png, .jpg",
            "--prompt",
            "a photo of",
            "--prompt",
            "a drawing of",
            "--sampling",
        ]
    )
    # --device reaches every model the config has, and creates none.
    assert cfg.captioner.device == "cpu" and cfg.clip.device == "cpu" and cfg.translator is None
    assert cfg.rows_per_shard == 50 and cfg.image_extensions == (".png", ".jpg")
    assert cfg.captioner.prompts == ("a photo of", "a drawing of") and cfg.captioner.sampling
    with pytest.raises(SystemExit):  # argparse checks a flag's type against the field
        build_parser().parse_args(["augment", "--rows-per-shard", "many"])


def test_beam_runner_uses_the_augment_parser(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("beam_runner", REPO / "beam_runner.py")
    beam_runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(beam_runner)
    seen = {}

    def fake_run(config, beam_args, workers):
        seen.update(config=config, beam_args=beam_args, workers=workers)
        return {}

    monkeypatch.setattr("babelcap.pipelines.runner.run", fake_run)
    argv = ["--input", "i", "--output", "o", "--set", "seed=3", "--runner", "DataflowRunner"]
    assert beam_runner.main([*argv, "--setup_file", "./setup.py"]) == 0
    assert seen["config"].seed == 3
    assert seen["beam_args"] == ["--runner", "DataflowRunner", "--setup_file", "./setup.py"]


# --- train -------------------------------------------------------------------------------


def test_train_languages_flag_is_a_parsed_list():
    cfg = _train_config(["--languages", "pt, es"])
    assert cfg.data.languages == ["pt", "es"]
    cfg = _train_config(["--set", "data.languages=pt, es,pt"])
    assert cfg.data.languages == ["pt", "es"]


def test_world_variable_comes_from_the_flag_not_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("BABELCAP_WORLD", raising=False)
    before = dict(os.environ)
    config = str(REPO / "configs" / "world-capivara.yaml")
    cfg = _train_config(["--config", config, "--world", str(tmp_path), "--steps", "3"])
    assert cfg.model.name == f"{tmp_path}/models/clip-base"
    assert cfg.data.train == [f"{tmp_path}/shards"] and cfg.optim.max_steps == 3
    assert dict(os.environ) == before
    with pytest.raises(ConfigError, match=r"\$\{BABELCAP_WORLD\} is not set"):
        _train_config(["--config", config])
    # Without --world, an exported BABELCAP_WORLD is still read (never written).
    monkeypatch.setenv("BABELCAP_WORLD", "/w")
    assert _train_config(["--config", config]).model.name == "/w/models/clip-base"
    assert load_config(config, variables={"BABELCAP_WORLD": "/v"}).model.name.startswith("/v/")


def test_train_flags_and_overrides(tmp_path):
    cfg = _train_config(
        [
            "--set",
            "optim.lr=3e-4",
            "--set",
            "method.lora.r=4",
            "--shards",
            "a",
            "--shards",
            "b",
            "--no-resume",
            "--output",
            str(tmp_path),
            "--steps",
            "5",
        ]
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.method.lora.r == 4 and cfg.method.lora.modules_to_save == ["proj"]
    assert cfg.data.train == ["a", "b"] and cfg.run.resume is False
    assert cfg.run.output_dir == str(tmp_path) and cfg.optim.max_steps == 5
    assert parse_value("3e-4") == 3e-4 and parse_value("1e-3x") == "1e-3x"
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        _train_config(["--set", "optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"method\.lora\.rank"):
        _train_config(["--set", "method.lora.rank=1"])
    with pytest.raises(ConfigError, match=r"run\.precision"):
        load_config(None, ["run.precision=fp8"])


def test_overrides_and_updates_return_copies():
    data = {"optim": {"lr": 1.0}}
    out = apply_overrides(data, ["optim.lr=3e-4", "run.seed=2"])
    assert data == {"optim": {"lr": 1.0}} and out["optim"]["lr"] == 3e-4
    cfg = TrainConfig()
    other = cfg.updated(["run.seed=5", "data.languages=pt,es"])
    assert (other.run.seed, other.data.languages) == (5, ["pt", "es"])
    assert (cfg.run.seed, cfg.data.languages) == (0, None)
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])


def test_train_config_saves_and_loads_back(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "data.languages=[pt, hi]", "method.lora.r=2"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "c.json") == cfg


# --- LoRA: defined once ------------------------------------------------------------------


def test_lora_settings_are_one_definition():
    from babelcap.training import adapters

    assert adapters.AdapterSpec is LoraConfig
    assert type(MethodConfig().lora) is LoraConfig
    assert MethodConfig().lora.modules_to_save == ["proj"]  # CAPIVARA trains the projection
    spec = adapters.AdapterSpec.from_options({"kind": "ia3"})
    assert spec.targets == ["key", "value", "output.dense"] and spec.modules_to_save == []
    with pytest.raises(ConfigError, match=r"method\.options\.adapter\.rank"):
        adapters.AdapterSpec.from_options({"kind": "lora", "rank": 2})
    with pytest.raises(ConfigError, match="kind"):
        adapters.AdapterSpec.from_options({"kind": "prefix"})
    with pytest.raises(ConfigError, match="must be kind lora"):
        MethodConfig(lora={"kind": "ia3"})


def test_flat_lora_keys_still_load_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = TrainConfig.from_dict({"method": {"lora_r": 4, "lora_alpha": 16}})
    assert any("method.lora" in str(w.message) for w in caught)
    assert (cfg.method.lora.r, cfg.method.lora.alpha) == (4, 16)
    assert cfg.method.lora.modules_to_save == ["proj"]
    assert "lora_r" not in cfg.to_dict()["method"]


# --- method options ----------------------------------------------------------------------


@dataclasses.dataclass
class _Options:
    weight: float = 1.0
    steps: int | None = None
    names: list[str] = dataclasses.field(default_factory=list)


class _ModelOptions(LoraConfig):
    pass


def test_options_from_accepts_dataclasses_and_models():
    from babelcap.training.config import options_from

    opts = options_from(_Options, {"weight": "3e-4", "steps": 2}, "test")
    assert opts == _Options(weight=3e-4, steps=2)
    with pytest.raises(ConfigError, match=r"unknown test option\(s\) \['wieght'\]"):
        options_from(_Options, {"wieght": 1.0}, "test")
    with pytest.raises(ConfigError, match=r"method\.options\.steps"):
        options_from(_Options, {"steps": "many"}, "test")
    assert options_from(_ModelOptions, {"r": 2}, "test").r == 2
    with pytest.raises(ConfigError, match=r"method\.options\.rank"):
        options_from(_ModelOptions, {"rank": 2}, "test")

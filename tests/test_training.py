"""Trainer behaviour on the world's base CLIP: parameter selection, LiT, checkpointing, embedding
path, resume, export, schema errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from babelcap.core import schema
from babelcap.core.shards import find_shards
from babelcap.models.clip import image_tower_id, load_clip
from babelcap.training.config import TrainConfig, load_config
from babelcap.training.data import CaptionSelection, ShardStream, StreamConfig
from babelcap.training.export import merged_model
from babelcap.training.lit import enable_grad_checkpointing, lora_parameter_formula
from babelcap.training.runs import build_method
from babelcap.training.trainer import Trainer, checkpoints
from babelcap.world.shards import write_world_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_dir(world_models) -> Path:
    return world_models("clip-base")["clip-base"]


@pytest.fixture(scope="module")
def pt_shards(world_dir, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("pt-shards")
    return [
        str(p)
        for p in write_world_shards(
            world_dir, out, ["en", "pt"], split="train", rows_per_shard=128, row_group_size=32
        )
    ]


def _cfg(base_dir: Path, shards: list[str], out: Path, **sections) -> TrainConfig:
    data = {
        "model": {"name": str(base_dir)},
        "data": {
            "train": shards,
            "languages": ["pt"],
            "origins": ["gold"],
            "batch_size": 32,
            "shuffle_buffer": 64,
            "embeddings": "never",
        },
        "method": {"lora": {"r": 4, "alpha": 8}},
        "optim": {"lr": 2e-3, "warmup_steps": 1, "max_steps": 4},
        "run": {
            "output_dir": str(out),
            "progress": False,
            "plot": False,
            "export": False,
            "log_every": 1,
            "seed": 3,
        },
    }
    for key, value in sections.items():
        data[key].update(value)
    return TrainConfig.from_dict(data)


def _stream(bundle, shards, **kw) -> ShardStream:
    return ShardStream(
        find_shards(shards),
        CaptionSelection(languages=("pt",), origins=("gold",)),
        StreamConfig(batch_size=16, shuffle_buffer=32, seed=1, **kw),
        bundle.tokenizer,
        bundle.preprocess_val,
    )


def test_lora_only_trains_adapters_and_projection(base_dir, pt_shards):
    bundle = load_clip(str(base_dir))
    expected = lora_parameter_formula(
        bundle.model, r=4, target_modules=("query", "value"), modules_to_save=("proj",)
    )
    cfg = _cfg(base_dir, pt_shards, Path("unused"))
    method = build_method(cfg.method)
    model = method.setup(bundle.model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_" in n or "modules_to_save" in n for n in trainable), sorted(trainable)
    assert any("query" in n for n in trainable) and any("value" in n for n in trainable)

    batch = next(iter(_stream(bundle, pt_shards)))
    method.train_mode(model)
    loss, _ = method.loss(model, batch)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    # LoRA B starts at zero, so only B and the projection get non-zero gradients at step 0.
    assert all(float(p.grad.abs().sum()) > 0 for n, p in trainable.items() if "lora_A" not in n)


def test_locked_image_tower_is_bit_identical_after_training(base_dir, pt_shards, tmp_path):
    bundle = load_clip(str(base_dir))
    before = {k: v.clone() for k, v in bundle.model.visual.state_dict().items()}
    text_before = {k: v.clone() for k, v in bundle.model.text.state_dict().items()}
    trainer = Trainer(_cfg(base_dir, pt_shards, tmp_path), bundle=bundle)
    trainer.method.train_mode(trainer.model)
    assert not trainer.raw_model.visual.training and trainer.raw_model.text.training
    trainer.fit()
    after = trainer.raw_model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    merged = merged_model(trainer.raw_model).text.state_dict()
    assert merged.keys() == text_before.keys()
    changed = {k for k in text_before if not torch.equal(text_before[k], merged[k])}
    assert "proj.weight" in changed  # the projection (modules_to_save) trained...
    assert any(k.endswith("query.weight") for k in changed)  # ...LoRA moved query/value...
    assert all(
        k == "proj.weight" or k.endswith(("query.weight", "value.weight")) for k in changed
    )  # ...and nothing else moved


def test_grad_checkpointing_gives_same_loss_and_grads(base_dir, pt_shards):
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        bundle = load_clip(str(base_dir))
        cfg = _cfg(base_dir, pt_shards, Path("unused"), method={"text_tower": "full"})
        method = build_method(cfg.method)
        model = method.setup(bundle.model)
        if ckpt:
            enable_grad_checkpointing(model)
        method.train_mode(model)
        batch = next(iter(_stream(bundle, pt_shards)))
        torch.manual_seed(1)  # same dropout masks in both runs
        loss, _ = method.loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_trimmed_padding_gives_the_same_text_features_and_gradients(base_dir):
    """The HF tower's tokenizer drops the padding past the batch's longest caption: the same
    features (and LoRA gradients) as the full context, from fewer columns."""
    import pickle

    bundle = load_clip(str(base_dir))
    texts = ["um círculo vermelho pequeno", "uma estrela azul grande e um quadrado verde"]
    trimmed = bundle.tokenizer(texts)
    full = bundle.tokenizer.inner(texts)
    context = bundle.model_cfg["text_cfg"]["context_length"]
    assert full.shape[1] == context and trimmed.shape[1] < context
    assert torch.equal(full[:, : trimmed.shape[1]], trimmed)
    assert (full[:, trimmed.shape[1] :] == bundle.tokenizer.tokenizer.pad_token_id).all()
    model = build_method(TrainConfig().method).setup(bundle.model)
    model.eval()  # dropout draws depend on the shape; gradients flow in eval mode too
    got = model.encode_text(trimmed, normalize=True)
    got.sum().backward()
    g_trim = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert g_trim
    model.zero_grad()
    want = model.encode_text(full, normalize=True)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_trim[n], p.grad, atol=1e-5), n
    assert torch.equal(pickle.loads(pickle.dumps(bundle.tokenizer))(texts), trimmed)


def test_embedding_column_gives_same_loss_as_images(base_dir, pt_shards, tmp_path):
    from babelcap.training.embeddings import embed_shards

    bundle = load_clip(str(base_dir))
    embedded = [str(p) for p in embed_shards(bundle, pt_shards, tmp_path / "emb")]
    method = build_method(_cfg(base_dir, pt_shards, tmp_path).method)
    model = method.setup(bundle.model)
    model.eval()  # no dropout: the two passes must see the same network
    tower = image_tower_id(model)
    img_batch = next(iter(_stream(bundle, pt_shards)))
    emb_batch = next(
        iter(_stream(bundle, embedded, use_embeddings=True, expected_embedding_model=tower))
    )
    assert img_batch["image_ids"] == emb_batch["image_ids"]
    assert "images" not in emb_batch and emb_batch["image_features"].shape[0] == 16
    with torch.no_grad():
        loss_img, _ = method.loss(model, img_batch)
        loss_emb, _ = method.loss(model, emb_batch)
    assert float(loss_img) == pytest.approx(float(loss_emb), rel=1e-5, abs=1e-6)

    # Embeddings from another image tower are refused, naming the column.
    other = _stream(bundle, embedded, use_embeddings=True, expected_embedding_model="other")
    with pytest.raises(schema.SchemaError, match="embedding_model"):
        next(iter(other))


def test_resume_equals_uninterrupted_run(base_dir, pt_shards, tmp_path):
    # 5 batches per epoch: 7 steps cross an epoch; the checkpoint at step 3 is mid-epoch.
    sections = {
        "optim": {"max_steps": 7},
        "run": {"save_every": 3, "keep_checkpoints": 5},
        "data": {"batch_size": 64},
        "method": {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
    }
    full = Trainer(_cfg(base_dir, pt_shards, tmp_path / "a", **copy.deepcopy(sections)))
    full.fit()
    ckpts = checkpoints(tmp_path / "a")
    assert [p.name for p in ckpts] == ["step-0000003", "step-0000006", "step-0000007"]

    # "Kill" a run after step 3: its folder holds only that checkpoint; resuming finishes it.
    import shutil

    shutil.copytree(ckpts[0], tmp_path / "b" / "checkpoints" / ckpts[0].name)
    resumed = Trainer(_cfg(base_dir, pt_shards, tmp_path / "b", **copy.deepcopy(sections)))
    assert resumed.state.step == 3 and resumed.state.batch_in_epoch == 3
    resumed.fit()
    a = dict(full.raw_model.named_parameters())
    b = dict(resumed.raw_model.named_parameters())
    trained = [n for n, p in a.items() if p.requires_grad]
    assert trained
    for name in trained:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    losses_a, losses_b = losses("a"), losses("b")
    assert losses_b == pytest.approx(losses_a[3:], rel=1e-6)


def test_export_reloads_with_open_clip_and_peft(base_dir, pt_shards, tmp_path, monkeypatch):
    import open_clip
    from peft import PeftModel

    cfg = _cfg(base_dir, pt_shards, tmp_path, run={"export": True})
    trainer = Trainer(cfg)
    summary = trainer.fit()
    export_dir = Path(summary["export"]).parent
    adapter_dir = Path(summary["adapter"])
    assert (adapter_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_model.safetensors").exists()

    model = trainer.raw_model.eval()
    tokens = trainer.bundle.tokenizer(["um círculo vermelho pequeno", "uma estrela azul"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want_t, want_i = model.encode_text(tokens), model.encode_image(images)

    # The export names its text tower `text/` relative to the folder (relocatable); plain
    # open_clip resolves that against the working directory, so it loads from inside the export
    # (as the README shows).
    monkeypatch.chdir(export_dir)
    # 1. plain open_clip, local-dir schema
    oc, _, _ = open_clip.create_model_and_transforms("local-dir:.")
    # 2. plain open_clip, registered config name + pretrained checkpoint path
    # The folder also holds the tokenizer's JSON files; the model config is named after the model.
    name = next(p.stem for p in export_dir.glob("babelcap-*.json"))
    open_clip.add_model_config(export_dir / f"{name}.json")
    oc2, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=str(export_dir / "open_clip_model.safetensors")
    )
    # 3. base model + peft adapter
    base = load_clip(str(base_dir)).model
    base.text = PeftModel.from_pretrained(base.text, str(adapter_dir))
    for other in (oc.eval(), oc2.eval(), base.eval()):
        with torch.no_grad():
            torch.testing.assert_close(other.encode_text(tokens), want_t, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(other.encode_image(images), want_i, rtol=0, atol=0)


def test_shard_that_breaks_the_schema_is_a_clear_error(pt_shards, tmp_path):
    table = pq.read_table(pt_shards[0])
    bad = tmp_path / "no-captions.parquet"
    pq.write_table(table.drop_columns(["captions"]), bad)
    with pytest.raises(schema.SchemaError, match=r"no-captions\.parquet.*'captions'"):
        find_shards([str(bad)])
    wrong = tmp_path / "wrong-type.parquet"
    cols = {n: table.column(n) for n in table.column_names}
    cols["embedding"] = pa.array(["x"] * table.num_rows)
    pq.write_table(pa.table(cols), wrong)
    with pytest.raises(schema.SchemaError, match=r"wrong-type\.parquet.*'embedding'"):
        find_shards(str(tmp_path / "wrong-type.parquet"))


def test_caption_selection_by_origin_score_and_top_k():
    caps = [
        schema.caption("a red circle", "en", "source"),
        schema.caption("um círculo", "pt", "translated", score=0.9, source_index=0),
        schema.caption("um círculo vermelho", "pt", "translated", score=0.2, source_index=0),
        schema.caption("um circulo", "pt", "translated", score=0.5, source_index=0),
        schema.caption("um círculo vermelho", "pt", "gold", source_index=0),
    ]
    assert CaptionSelection(languages=("pt",)).select(caps) == [1, 2, 3]  # gold is not training
    assert CaptionSelection(languages=("pt",), min_score=0.4).select(caps) == [1, 3]
    assert CaptionSelection(languages=("pt",), top_k=1).select(caps) == [1]
    assert CaptionSelection(origins=("gold",)).select(caps) == [4]
    assert ShardStream._source_text(caps, 2) == "a red circle"


def test_config_yaml_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("BABELCAP_WORLD", "/w")
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: '${BABELCAP_WORLD}/models/clip-base'}\noptim: {lr: 0.001}\n")
    cfg = load_config(path, ["optim.max_steps=7", "data.languages=[pt, hi]"])
    assert cfg.model.name == "/w/models/clip-base" and cfg.optim.lr == 0.001
    assert cfg.optim.max_steps == 7 and cfg.data.languages == ["pt", "hi"]
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["optim.learning_rate=1"])
    # Exponent floats without a dot are numbers (YAML 1.2), in files and overrides alike.
    path.write_text("optim: {lr: 3e-4, weight_decay: 1E-2}\n")
    assert load_config(path).optim.lr == 3e-4
    cfg = load_config(path, ["optim.lr=3e-3", "run.output_dir=1e-3x"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (3e-3, 1e-2)
    assert cfg.run.output_dir == "1e-3x"


def test_cli_train_then_eval_compares_before_and_after(
    base_dir, world_dir, pt_shards, tmp_path, monkeypatch, capsys
):
    """`babelcap train` then `babelcap eval --model before=... --model after=...`, run from a
    folder outside the repository: each model's numbers in the report are the evaluator's own
    for that model, and training on gold Portuguese raised Portuguese retrieval."""
    from babelcap.cli import main
    from babelcap.training.eval_data import load_eval_data
    from babelcap.training.evaluate import evaluate

    repo = Path(__file__).resolve().parents[1]
    steps = 20  # enough for gold Portuguese to show in retrieval
    monkeypatch.chdir(tmp_path)  # relative paths below resolve here, never in the repository
    (tmp_path / "oracle.yaml").write_text((repo / "configs" / "world-oracle.yaml").read_text())
    args = [
        "train",
        "--config",
        "oracle.yaml",
        "--world",
        str(world_dir),
        "--shards",
        str(Path(pt_shards[0]).parent),
        "--steps",
        str(steps),
        "--output",
        "run",
        "--set",
        "data.batch_size=32",
        "--set",
        "optim.warmup_steps=2",
        "--set",
        "run.progress=false",
    ]
    assert main(args) == 0
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "training_curve.png").exists()
    assert (run / "export" / "open_clip_config.json").exists()
    capsys.readouterr()
    languages = ["en", "pt"]
    models = {"before": base_dir, "after": run / "export"}
    argv = ["eval", "--world", str(world_dir), "--languages", ",".join(languages)]
    for label, path in models.items():
        argv += ["--model", f"{label}={path}"]
    assert main([*argv, "--out", "eval"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "eval" / "mean_recall.png").exists()
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(report) == set(models)

    # The report's numbers are each model's, as the evaluator computes them on the same data.
    data = load_eval_data(f"world:{world_dir}", languages, split="test")
    for label, path in models.items():
        want = evaluate(load_clip(str(path)), data, name=label)["languages"]
        got = report[label]["languages"]
        assert set(got) == set(languages)
        for lang in languages:
            assert set(got[lang]) == set(want[lang]), (label, lang)
            assert "mean_recall" in got[lang] and any(k.startswith("zs_") for k in got[lang])
            for key, value in want[lang].items():
                assert got[lang][key] == pytest.approx(value, abs=1e-6), (label, lang, key)
                assert 0 <= got[lang][key] <= 100 or key == "captions"

    # Training moved the numbers, the right way, and the printed table says so.
    before = report["before"]["languages"]["pt"]["mean_recall"]
    after = report["after"]["languages"]["pt"]["mean_recall"]
    assert after > before + 2.0, (before, after)
    assert f"| pt | {before:.1f} | {after:.1f} | {after - before:+.1f} |" in printed

"""Continual language learning (CLL-CLIP): metrics, vocabulary growth, TEIR, and learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from babelcap.training import cl_metrics

# ----------------------------------------------------------------------------- AA, F, F_en

# rows: start, +pt, +de, +hi; columns: en, pt, de, hi
MATRIX = [
    [80.0, 10.0, 12.0, 5.0],
    [78.0, 50.0, 20.0, 6.0],
    [75.0, 52.0, 55.0, 8.0],
    [70.0, 40.0, 50.0, 60.0],
]


def test_metrics_on_a_hand_made_matrix():
    assert cl_metrics.average_accuracy(MATRIX) == pytest.approx((40 + 50 + 60) / 3)
    # pt fell from its best (52, after de) to 40; de from 55 to 50.
    assert cl_metrics.forgetting(MATRIX) == pytest.approx(((52 - 40) + (55 - 50)) / 2)
    assert cl_metrics.english_forgetting(MATRIX) == pytest.approx(80 - 70)
    # After the second stage: pt rose (negative forgetting: backward transfer), English fell 5.
    assert cl_metrics.average_accuracy(MATRIX, 2) == pytest.approx((52 + 55) / 2)
    assert cl_metrics.forgetting(MATRIX, 2) == pytest.approx(-2.0)
    assert cl_metrics.english_forgetting(MATRIX, 2) == pytest.approx(5.0)
    assert cl_metrics.forgetting(MATRIX, 1) == 0.0
    assert cl_metrics.average_accuracy(MATRIX, 1, include_base=True) == pytest.approx(64.0)
    summary = cl_metrics.summarize(MATRIX)
    assert [s["stage"] for s in summary["per_stage"]] == [1, 2, 3]
    assert summary["F"] == pytest.approx(8.5)


def test_matrix_csv_round_trip():
    acc = [row[:] for row in MATRIX]
    acc[0][3] = math.nan
    text = cl_metrics.matrix_to_csv(acc, ["start", "+pt", "+de", "+hi"], ["en", "pt", "de", "hi"])
    assert text.splitlines()[0] == "stage,en,pt,de,hi"
    back, stages, langs = cl_metrics.matrix_from_csv(text)
    assert stages == ["start", "+pt", "+de", "+hi"] and langs == ["en", "pt", "de", "hi"]
    assert math.isnan(back[0][3]) and back[3][2] == pytest.approx(50.0)


def test_metrics_reject_bad_stage():
    with pytest.raises(ValueError):
        cl_metrics.forgetting(MATRIX, 7)


# ----------------------------------------------------------------------------- model pieces


@pytest.fixture(scope="module")
def base_dir(world_models) -> Path:
    return world_models("clip-base")["clip-base"]


def test_vocabulary_extension_is_used_and_reloads(world_dir, base_dir, tmp_path):
    from transformers import AutoTokenizer

    from babelcap.training.continual.vocabulary import (
        extend_tokenizer,
        token_usage,
        train_vocabulary,
    )
    from babelcap.world.load import load_gold

    tok = AutoTokenizer.from_pretrained(base_dir / "text")
    texts = [c for r in load_gold(world_dir, "hi", "train") for c in r["captions"]]
    pieces = train_vocabulary(texts, 300)
    known = set(tok.get_vocab())
    grown, added = extend_tokenizer(tok, pieces, tmp_path / "tok")
    # Only pieces the tokenizer lacked are added, after the old ids.
    assert added and added[0] == len(tok) and len(grown) == len(tok) + len(added)
    new_pieces = grown.convert_ids_to_tokens(added)
    assert not set(new_pieces) & known
    # The tokenizer's own segmentation now produces the new tokens (the world's multilingual
    # base vocabulary already covers most Hindi words, so few pieces are new)...
    for piece, i in zip(new_pieces, added, strict=True):
        assert [t.id for t in grown.backend_tokenizer.model.tokenize(piece)] == [i]
    probes = [p.replace("\u2581", " ") for p in new_pieces]
    assert token_usage(grown, probes) & set(added)
    assert token_usage(grown, texts)  # and the language's captions still tokenize
    # ... old ids keep their meaning, and the saved tokenizer reloads identically.
    assert grown.convert_ids_to_tokens(list(range(len(tok)))) == tok.convert_ids_to_tokens(
        list(range(len(tok)))
    )
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(texts[:20])["input_ids"] == grown(texts[:20])["input_ids"]


def test_teir_initialisation_statistics(base_dir):
    from babelcap.models.clip import load_clip
    from babelcap.training.continual.token_embeddings import grow_embeddings, word_embeddings

    bundle = load_clip(str(base_dir))
    emb = word_embeddings(bundle.model)
    old = emb.weight.detach().clone()
    special = bundle.tokenizer.tokenizer.all_special_ids
    n_old, n_new = old.shape[0], 4000
    grow_embeddings(
        bundle.model,
        n_old + n_new,
        "teir",
        exclude_ids=special,
        generator=torch.Generator().manual_seed(0),
    )
    weight = word_embeddings(bundle.model).weight.detach()
    assert weight.shape == (n_old + n_new, old.shape[1])
    assert torch.equal(weight[:n_old], old)  # old rows kept bit for bit
    keep = torch.ones(n_old, dtype=torch.bool)
    keep[special] = False
    ref, new = old[keep], weight[n_old:]
    # Same per-dimension distribution as the existing rows.
    assert torch.allclose(new.mean(0), ref.mean(0), atol=4 * float(ref.std(0).max()) / n_new**0.5)
    assert torch.allclose(new.std(0), ref.std(0), rtol=0.1)
    # Plain init is the architecture's N(0, initializer_range): a different distribution.
    plain = load_clip(str(base_dir))
    grow_embeddings(plain.model, n_old + n_new, "plain", generator=torch.Generator().manual_seed(0))
    pw = word_embeddings(plain.model).weight.detach()[n_old:]
    assert float(pw.std()) == pytest.approx(0.02, rel=0.1)
    assert float(pw.mean(0).abs().max()) < 4 * 0.02 / n_new**0.5


def test_teir_row_scale():
    from babelcap.training.continual.token_embeddings import teir_row_scale

    scale = teir_row_scale(10, current={4, 5, 6, 7}, earlier=[{5, 6}, {6, 8}], special_ids=[0, 7])
    expected = torch.tensor([0, 0, 0, 0, 1, 1 / 2, 1 / 3, 0, 0, 0])
    assert torch.allclose(scale, expected)
    plain = teir_row_scale(10, {4}, [{5}], special_ids=[0], teir=False)
    assert plain[0] == 0 and bool((plain[1:] == 1).all())


def test_row_scaled_update_scales_gradient_and_decay():
    from babelcap.training.continual.token_embeddings import RowScaledUpdate

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    before = p.detach().clone()
    scale = torch.tensor([0.0, 1.0, 0.5, 0.0])
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    ref = torch.nn.Parameter(before.clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.5)
    RowScaledUpdate(p, scale).attach(opt)
    for _ in range(3):
        for param, o in ((p, opt), (ref, ref_opt)):
            o.zero_grad()
            (param**2).sum().backward()
            o.step()
    assert torch.equal(p[0], before[0]) and torch.equal(p[3], before[3])  # untouched rows
    assert torch.allclose(p[1], ref[1])  # scale 1: plain AdamW (decay included)
    assert not torch.allclose(p[2], ref[2]) and not torch.equal(p[2], before[2])
    assert p.grad is not None and bool((p.grad[0] == 0).all())


# ----------------------------------------------------------------------------- on the world


def _shards(world_dir: Path, base_dir: Path, tmp_path: Path, languages: list[str]) -> list[Path]:
    """World gold shards (linked to English) with the base image tower's embeddings."""
    from babelcap.models.clip import load_clip
    from babelcap.training.embeddings import embed_shards
    from babelcap.world.shards import write_world_shards

    raw = write_world_shards(world_dir, tmp_path / "raw", languages, split="train")
    return embed_shards(load_clip(str(base_dir)), raw, tmp_path / "shards")


def _config(
    base_dir: Path,
    shards: list[Path],
    out: Path,
    world_dir: Path,
    teir: bool,
    languages: list[str],
    steps: int,
    evaluate: bool = True,
):
    from babelcap.training.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "model": {"name": str(base_dir)},
            "data": {
                "train": [str(p) for p in shards],
                "languages": languages,
                "origins": ["gold"],
                "batch_size": 32,
                "shuffle_buffer": 256,
            },
            "method": {
                "name": "continual",
                "options": {
                    "teir": teir,
                    "vocab_size": 300,
                    # Mean recall after every stage (the accuracy matrix), or none at all.
                    "eval_data": f"world:{world_dir}" if evaluate else None,
                    "eval_max_captions": 2,
                },
            },
            "optim": {"lr": 2e-3, "warmup_steps": 5, "max_steps": steps, "weight_decay": 0.1},
            "run": {
                "output_dir": str(out),
                "seed": 0,
                "progress": False,
                "plot": False,
                "log_every": 10,
                "grad_checkpointing": False,
            },
        }
    )


def test_continual_learns_and_only_embeddings_change(world_dir, base_dir, tmp_path):
    from safetensors.torch import load_file

    from babelcap.training.runs import run

    shards = _shards(world_dir, base_dir, tmp_path, ["en", "hi"])
    cfg = _config(
        base_dir, shards, tmp_path / "run", world_dir, teir=True, languages=["hi"], steps=60
    )
    asked = cfg.to_dict()
    result = run(cfg)
    assert cfg.to_dict() == asked  # the stages train on copies; the user's config is as it was

    # Learning: Hindi mean recall measurably up; English kept.
    acc = result["matrix"]["mean_recall"]
    langs = result["matrix"]["languages"]
    hi, en = langs.index("hi"), langs.index("en")
    assert acc[1][hi] > acc[0][hi] + 5, acc
    assert result["F_en"] < 5
    assert (tmp_path / "run" / "accuracy.csv").exists()
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 0
    assert en == 0

    # Only the token embeddings changed; with TEIR, rows outside Hindi did not move at all.
    before = load_file(str(base_dir / "open_clip_model.safetensors"))
    after = load_file(
        str(tmp_path / "run" / "stage-1-hi" / "export" / "open_clip_model.safetensors")
    )
    key = next(k for k in before if k.endswith("word_embeddings.weight"))
    assert set(before) == set(after)
    for k in before:
        if k != key:
            assert torch.equal(before[k], after[k]), k
    state = json.loads(
        (tmp_path / "run" / "stage-1-hi" / "export" / "continual_state.json").read_text()
    )
    used = set(state["usage"]["hi"])
    old_rows = before[key].shape[0]
    assert after[key].shape[0] == state["vocab_size"] > old_rows
    absent = [i for i in range(old_rows) if i not in used]
    present = [i for i in range(old_rows) if i in used]
    assert torch.equal(after[key][absent], before[key][absent])
    assert not torch.equal(after[key][present], before[key][present])


def test_plain_mode_moves_rows_outside_the_language(world_dir, base_dir, tmp_path):
    """Without TEIR, weight decay reaches every row: the contrast TEIR is there for."""
    from safetensors.torch import load_file

    from babelcap.training.runs import run

    shards = _shards(world_dir, base_dir, tmp_path, ["en", "pt"])
    cfg = _config(
        base_dir,
        shards,
        tmp_path / "run",
        world_dir,
        teir=False,
        languages=["pt"],
        steps=8,
        evaluate=False,
    )
    run(cfg)
    before = load_file(str(base_dir / "open_clip_model.safetensors"))
    after = load_file(
        str(tmp_path / "run" / "stage-1-pt" / "export" / "open_clip_model.safetensors")
    )
    key = next(k for k in before if k.endswith("word_embeddings.weight"))
    state = json.loads(
        (tmp_path / "run" / "stage-1-pt" / "export" / "continual_state.json").read_text()
    )
    absent = [
        i
        for i in range(before[key].shape[0])
        if i not in set(state["usage"]["pt"]) and i > 3 and i != before[key].shape[0] - 1
    ]
    assert not torch.equal(after[key][absent], before[key][absent])


def test_resume_reuses_finished_stages_even_after_a_move(world_dir, base_dir, tmp_path):
    import shutil

    from babelcap.training.runs import run

    shards = _shards(world_dir, base_dir, tmp_path, ["en", "pt"])
    cfg = _config(
        base_dir,
        shards,
        tmp_path / "a",
        world_dir,
        teir=True,
        languages=["pt"],
        steps=4,
        evaluate=False,
    )
    first = run(cfg)
    weights = tmp_path / "a" / "stage-1-pt" / "export" / "open_clip_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    shutil.move(tmp_path / "a", tmp_path / "b")
    cfg = cfg.updated({"run.output_dir": str(tmp_path / "b"), "run.resume": True})
    again = run(cfg)
    assert again["stages"][0]["resumed"] is True
    moved = tmp_path / "b" / "stage-1-pt" / "export" / "open_clip_model.safetensors"
    assert again["export"] == str(moved) != first["export"]
    assert moved.stat().st_mtime_ns == stamp  # not trained again
    # A stage grown from other weights (say, a rebuilt base model) is trained again.
    state_file = moved.parent / "continual_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "run_start": "some-other-model"}))
    third = run(cfg)
    assert third["stages"][0].get("resumed") is not True
    assert json.loads(state_file.read_text())["run_start"] == state["run_start"]

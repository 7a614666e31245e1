"""Translation-based alignment (PECTVLM): losses, pairings from shard links, and learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from babelcap.core import schema
from babelcap.core.shards import write_shard
from babelcap.training import adapters as ad
from babelcap.training.alignment import PAIRINGS, AlignmentMethod, alignment_loss, apply_pairing
from babelcap.training.config import TrainConfig

# ----------------------------------------------------------------------------- losses


def test_mse_alignment_is_chordal_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    cos = torch.tensor([2**-0.5, 1.0])
    assert alignment_loss(a, b, "mse") == pytest.approx(float((2 - 2 * cos).mean()))
    assert alignment_loss(a, a, "mse") == pytest.approx(0.0)


def test_text_text_infonce_prefers_the_parallel_pair():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    matched = alignment_loss(x, x + 0.01 * torch.randn(8, 16), "infonce")
    shuffled = alignment_loss(x, x.roll(1, 0), "infonce")
    assert matched < 0.1 < shuffled
    assert alignment_loss(x[:0], x[:0], "infonce") == 0.0


# ----------------------------------------------------------------------------- pairings


def _row(i: int) -> dict:
    caps = [
        schema.caption(f"a red circle {i}", "en", "source"),  # 0: original English
        schema.caption(f"um círculo vermelho {i}", "pt", "translated", source_index=0),  # MT
        schema.caption(f"círculo vermelho {i}", "pt", "gold", source_index=0),  # native
        schema.caption(f"red circle {i}", "en", "translated", source_index=2),  # MT(pt->en)
    ]
    return {
        "image_id": f"{i:04d}",
        "captions": caps,
        "embedding": [0.5, 0.5, 0.5, 0.5],
        "embedding_model": "m",
    }


@pytest.mark.parametrize(
    "pairing,student",
    [
        ("native-en", "círculo vermelho"),
        ("native-mt", "um círculo vermelho"),
        ("translate-test", "red circle"),
    ],
)
def test_pairings_select_the_linked_pairs(tmp_path, pairing, student):
    from babelcap.core.shards import find_shards
    from babelcap.training.data import CaptionSelection, ShardStream, StreamConfig

    path = tmp_path / "shard.parquet"
    write_shard(str(path), [_row(i) for i in range(4)])
    asked = TrainConfig.from_dict({"data": {"train": [str(path)], "languages": ["en", "pt"]}})
    cfg = apply_pairing(asked, pairing)
    assert cfg.data.with_source and tuple(cfg.data.origins) == PAIRINGS[pairing].origins
    # A copy: the user's configuration keeps its own selection.
    assert not asked.data.with_source and asked.data.origins is None
    assert asked.data.languages == ["en", "pt"]
    stream = ShardStream(
        find_shards(cfg.data.train),
        CaptionSelection(languages=tuple(cfg.data.languages), origins=tuple(cfg.data.origins)),
        StreamConfig(batch_size=4, caption_mode="all", use_embeddings=True, with_source=True),
        tokenizer=None,
        preprocess=None,
    )
    batch = next(iter(stream))
    for caption, source in zip(batch["captions"], batch["source_captions"], strict=True):
        assert caption.rsplit(" ", 1)[0] == student
        # The English partner is the end of the source_index chain: the original English.
        assert source == "a red circle " + caption.rsplit(" ", 1)[1]


def test_unknown_options_are_rejected():
    from babelcap.training.config import MethodConfig

    with pytest.raises(ValueError, match="pairing"):
        AlignmentMethod(MethodConfig(name="alignment", options={"pairing": "nope"}))
    with pytest.raises(ValueError, match="unknown"):
        AlignmentMethod(MethodConfig(name="alignment", options={"wieght": 1.0}))


# ----------------------------------------------------------------------------- on the world


@pytest.fixture(scope="module")
def base_dir(world_models) -> Path:
    return world_models("clip-base")["clip-base"]


def test_per_language_gradients_reach_only_that_languages_adapter(base_dir):
    from babelcap.models.clip import load_clip
    from babelcap.training.config import MethodConfig

    bundle = load_clip(str(base_dir))
    method = AlignmentMethod(
        MethodConfig(
            name="alignment", options={"languages": ["pt", "hi"], "adapter": {"kind": "lora"}}
        )
    )
    model = method.setup(bundle.model)
    method.train_mode(model)
    texts = ["um círculo vermelho", "um quadrado azul", "a red circle", "a blue square"]
    batch = {
        "captions": texts[:2],
        "languages": ["pt", "pt"],
        "source_captions": texts[2:],
        "text": bundle.tokenizer(texts[:2]),
        "source_text": bundle.tokenizer(texts[2:]),
        "image_features": torch.randn(2, model.visual.output_dim),
    }
    loss, logs = method.loss(model, batch)
    loss.backward()
    assert logs["loss_align"] > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".pt." in n for n in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    # Both adapters stay in the optimizer's reach.
    assert all(p.requires_grad for p in ad.adapter_parameters(model, "hi").values())


def test_alignment_with_language_adapters_learns(world_dir, base_dir, tmp_path):
    from babelcap.models.clip import load_clip
    from babelcap.training.embeddings import embed_shards
    from babelcap.training.eval_data import load_eval_data
    from babelcap.world.shards import write_world_shards

    raw = write_world_shards(world_dir, tmp_path / "raw", ["en", "pt", "es"], split="train")
    shards = embed_shards(load_clip(str(base_dir)), raw, tmp_path / "shards")
    cfg = TrainConfig.from_dict(
        {
            "model": {"name": str(base_dir)},
            "data": {
                "train": [str(p) for p in shards],
                "languages": ["pt", "es"],
                "batch_size": 32,
                "shuffle_buffer": 256,
            },
            "method": {
                "name": "alignment",
                "options": {
                    "adapters": "per_language",
                    "pairing": "native-en",
                    # The shipped spec (configs/world-adapters.yaml).
                    "adapter": {
                        "kind": "lora",
                        "r": 1,
                        "alpha": 1,
                        "target_modules": ["query", "value", "word_embeddings"],
                    },
                },
            },
            "optim": {"lr": 1e-2, "warmup_steps": 5, "max_steps": 40, "weight_decay": 0.0},
            "run": {
                "output_dir": str(tmp_path / "run"),
                "seed": 0,
                "progress": False,
                "plot": False,
                # Asked for (the default); the trainer turns it off for per-language adapters
                # (see test_mixed_language_batch_trains_each_adapter_as_if_alone).
                "grad_checkpointing": True,
            },
        }
    )
    from babelcap.training.runs import run

    asked = cfg.to_dict()
    summary = run(cfg)
    assert cfg.to_dict() == asked  # the driver trains on a copy
    adapter_dir = Path(summary["adapter"])
    assert sorted(ad.adapter_dirs(adapter_dir)) == ["es", "pt"]
    # One merged checkpoint would hold one adapter only: per-language runs export none.
    assert summary["export"] is None and not (tmp_path / "run" / "export").exists()

    data = load_eval_data(f"world:{world_dir}", ["en", "pt", "es"], "test", max_captions=2)
    before = ad.evaluate_with_adapters(load_clip(str(base_dir)), data, zero_shot=False)
    bundle = load_clip(str(base_dir))
    ad.load_language_adapters(bundle.model, adapter_dir)
    after = ad.evaluate_with_adapters(bundle, data, zero_shot=False)
    mr = {
        k: {lang: m["mean_recall"] for lang, m in r["languages"].items()}
        for k, r in (("before", before), ("after", after))
    }
    assert after["languages"]["pt"]["adapter"] == "pt"
    assert after["languages"]["en"]["adapter"] is None
    for lang in ("pt", "es"):
        assert mr["after"][lang] > mr["before"][lang] + 3, mr
    assert mr["after"]["en"] == pytest.approx(mr["before"]["en"])  # English: no adapter


def _trainer(world_dir, base_dir, tmp_path, adapters: str):
    from babelcap.training.runs import build_method
    from babelcap.training.trainer import Trainer
    from babelcap.world.shards import write_world_shards

    shards = write_world_shards(world_dir, tmp_path / "s", ["en", "pt", "hi"], split="val")
    cfg = TrainConfig.from_dict(
        {
            "model": {"name": str(base_dir)},
            # The small val split keeps this quick; the trainer must be told to read it.
            "data": {
                "train": [str(p) for p in shards],
                "languages": ["pt", "hi"],
                "splits": ["val"],
            },
            "method": {
                "name": "alignment",
                "options": {"adapters": adapters, "languages": ["pt", "hi"]},
            },
            "run": {"output_dir": str(tmp_path / "run"), "grad_checkpointing": True},
        }
    )
    return Trainer(cfg, method=build_method)


@pytest.mark.parametrize("adapters", ["per_language", "shared"])
def test_checkpointing_stays_off_only_for_per_language_adapters(
    world_dir, base_dir, tmp_path, adapters
):
    from babelcap.training.lit import text_transformer

    trainer = _trainer(world_dir, base_dir, tmp_path, adapters)
    assert text_transformer(trainer.raw_model).is_gradient_checkpointing == (adapters == "shared")


def test_mixed_language_batch_trains_each_adapter_as_if_alone(world_dir, base_dir, tmp_path):
    """A pt+hi batch gives every adapter the gradient of its own captions alone. With
    checkpointing on, hi's layers were recomputed through pt's adapter (the batch's last)."""
    trainer = _trainer(world_dir, base_dir, tmp_path, "per_language")
    model, method = trainer.model, trainer.method
    method.train_mode(model)  # train mode (checkpointing recomputes only there), but:
    for m in model.modules():  # no dropout, so both passes compute the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tok = trainer.bundle.tokenizer
    pt = ["um círculo vermelho grande", "um quadrado azul pequeno"]
    hi = ["एक बड़ा लाल वृत्त", "एक छोटा नीला वर्ग"]
    en = ["a big red circle", "a small blue square"] * 2
    feats = torch.nn.functional.normalize(torch.randn(4, model.visual.output_dim), dim=-1)

    def grads(idx: list[int]) -> dict[str, torch.Tensor]:
        texts, langs = [(pt + hi)[i] for i in idx], [(["pt"] * 2 + ["hi"] * 2)[i] for i in idx]
        batch = {
            "captions": texts,
            "languages": langs,
            "source_captions": [en[i] for i in idx],
            "text": tok(texts),
            "source_text": tok([en[i] for i in idx]),
            "image_features": feats[idx],
        }
        model.zero_grad(set_to_none=True)
        loss, _ = method.loss(model, batch)
        (loss * len(idx)).backward()  # the loss averages over the batch: undo it
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed = grads([0, 1, 2, 3])
    alone = {**grads([0, 1]), **grads([2, 3])}
    assert mixed.keys() == alone.keys() and any(".hi." in n for n in mixed)
    for name, g in mixed.items():
        assert torch.allclose(g, alone[name], atol=1e-5), name

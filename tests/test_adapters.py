"""Per-language peft adapters: swap by language code, size formula, save/load, spread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from babelcap.training import adapters as ad


@pytest.fixture(scope="module")
def base_dir(world_models) -> Path:
    return world_models("clip-base")["clip-base"]


def _load(base_dir: Path):
    from babelcap.models.clip import load_clip

    bundle = load_clip(str(base_dir))
    bundle.model.eval()
    return bundle


def _perturb(model, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.adapter_parameters(model, name).values():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_adapter_size_matches_formula(base_dir, kind):
    bundle = _load(base_dir)
    spec = ad.AdapterSpec(kind=kind, r=2, alpha=2)  # LoRA r=2 on query/value: ~0.16%
    expected = ad.adapter_parameter_formula(bundle.model.text, spec)
    total = sum(p.numel() for p in bundle.model.parameters())
    bundle.model.requires_grad_(False)  # LiT + frozen text tower, as the method sets it
    ad.add_language_adapters(bundle.model, ["pt", "hi"], spec)
    for lang in ("pt", "hi"):
        size = ad.adapter_size(bundle.model, lang)
        assert size["parameters"] == expected > 0
        assert size["model_parameters"] == total
        assert size["percent"] <= 0.2  # PECTVLM's budget: ~0.16% per language
    # Only adapter weights train, all of them.
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "ia3_" in n) for n in trainable)
    assert sum(p.numel() for p in bundle.model.parameters() if p.requires_grad) == 2 * expected


def test_formula_counts_lora_rank_and_saved_modules(base_dir):
    bundle = _load(base_dir)
    text = bundle.model.text
    width = text.transformer.config.hidden_size
    layers = text.transformer.config.num_hidden_layers
    spec = ad.AdapterSpec(kind="lora", r=4, modules_to_save=["proj"])
    proj = sum(p.numel() for p in text.proj.parameters())
    assert ad.adapter_parameter_formula(text, spec) == layers * 2 * 4 * 2 * width + proj
    ad.add_language_adapters(bundle.model, ["de"], spec)
    assert ad.adapter_size(bundle.model, "de")["parameters"] == layers * 16 * width + proj
    # LoRA on the token embeddings: r * (rows + dim).
    bundle = _load(base_dir)
    rows = bundle.model.text.transformer.config.vocab_size
    spec = ad.AdapterSpec(kind="lora", r=1, target_modules=["query", "value", "word_embeddings"])
    expected = layers * 2 * 2 * width + (rows + width)
    assert ad.adapter_parameter_formula(bundle.model.text, spec) == expected
    ad.add_language_adapters(bundle.model, ["hi"], spec)
    assert ad.adapter_size(bundle.model, "hi")["parameters"] == expected


def test_swap_by_language_code_gives_that_languages_embeddings(base_dir, tmp_path):
    from peft import PeftModel

    tokens = _load(base_dir).tokenizer(["um círculo vermelho", "एक लाल वृत्त"])
    base = _load(base_dir)
    with torch.no_grad():
        base_emb = base.model.encode_text(tokens)
    multi = _load(base_dir)
    ad.add_language_adapters(multi.model, ["pt", "hi"], ad.AdapterSpec(kind="lora"))
    _perturb(multi.model, "pt", 1)
    _perturb(multi.model, "hi", 2)
    saved = ad.save_language_adapters(multi.model, tmp_path / "adapter")
    assert saved == {"pt": tmp_path / "adapter" / "pt", "hi": tmp_path / "adapter" / "hi"}
    assert ad.is_language_adapter_dir(tmp_path / "adapter")

    loaded = _load(base_dir)
    ad.load_language_adapters(loaded.model, tmp_path / "adapter")
    assert sorted(ad.language_adapters(loaded.model)) == ["hi", "pt"]
    embs = {}
    for lang in ("pt", "hi", "en"):
        assert ad.set_language(loaded.model, lang) == (None if lang == "en" else lang)
        with torch.no_grad():
            embs[lang] = loaded.model.encode_text(tokens)
    for lang in ("pt", "hi"):
        # The same as a model carrying only that language's adapter.
        single = _load(base_dir)
        single.model.text = PeftModel.from_pretrained(
            single.model.text, str(tmp_path / "adapter" / lang)
        )
        with torch.no_grad():
            ref = single.model.encode_text(tokens)
        assert torch.allclose(embs[lang], ref, atol=1e-6)
        with ad.use_language(multi.model, lang), torch.no_grad():
            assert torch.allclose(multi.model.encode_text(tokens), ref, atol=1e-6)
    assert not torch.allclose(embs["pt"], embs["hi"], atol=1e-3)
    # A language without an adapter uses the base model.
    assert torch.allclose(embs["en"], base_emb, atol=1e-6)


def test_shared_adapter_serves_every_language(base_dir, tmp_path):
    bundle = _load(base_dir)
    ad.add_language_adapters(bundle.model, [ad.SHARED], ad.AdapterSpec(kind="ia3"))
    assert ad.adapter_for(bundle.model, "hi") == ad.SHARED
    ad.save_language_adapters(bundle.model, tmp_path / "shared")
    assert not ad.is_language_adapter_dir(tmp_path / "shared")
    assert ad.adapter_dirs(tmp_path / "shared") == {ad.SHARED: tmp_path / "shared"}


def test_spread():
    s = ad.spread({"pt": 50.0, "hi": 30.0, "de": 40.0})
    assert s["max_min"] == pytest.approx(20.0)
    assert s["std"] == pytest.approx((200 / 3) ** 0.5)
    assert s["mean"] == pytest.approx(40.0)

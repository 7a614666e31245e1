"""The world's translation models through the CTranslate2 engine: trained on fresh scenes,
they must translate the world's held-out English captions into the gold captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from babelcap.translators import Translator
from babelcap.world.models.translator import gold_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def marian(world_models) -> Path:
    return world_models("marian-en-pt")["marian-en-pt"]


@pytest.fixture(scope="module")
def m2m(world_models) -> Path:
    return world_models("m2m-multi")["m2m-multi"]


def _exact(hyps: list[str], refs: list[str]) -> float:
    return sum(h == r for h, r in zip(hyps, refs, strict=True)) / len(refs)


def test_world_marian_translates_held_out_captions(world_dir, marian):
    pairs = gold_pairs(world_dir, "en", "pt")
    assert len(pairs) >= 100
    engine = Translator(marian / "ct2")
    hyps = engine.translate([s for s, _ in pairs], "en", "pt")
    # Chance of an exact sentence match is ~0; a trained model gets most of them (all 240 here).
    assert _exact(hyps, [t for _, t in pairs]) >= 0.7
    summary = json.loads((marian / "babelcap-build.json").read_text())["summary"]
    assert summary["quality"]["en-pt"]["chrf"] >= 90
    assert engine.info.family == "marian" and (marian / "hf" / "source.spm").exists()


def test_world_m2m_translates_every_pair(world_dir, m2m):
    engine = Translator(m2m / "ct2")
    assert engine.info.family == "m2m100"
    for tgt in ("pt", "es", "de", "hi"):
        pairs = gold_pairs(world_dir, "en", tgt)[:120]
        hyps = engine.translate([s for s, _ in pairs], "en", tgt)
        assert _exact(hyps, [t for _, t in pairs]) >= 0.6, tgt
    with pytest.raises(ValueError, match="cannot translate pt->en"):
        engine.translate(["um círculo"], "pt", "en")  # trained en->X only


def test_order_preserved_under_length_sorting(world_dir, marian):
    texts = [s for s, _ in gold_pairs(world_dir, "en", "pt")][:60]
    texts = texts[::2] + texts[1::2][::-1]  # lengths all over the place
    single = Translator(marian / "ct2", memory_size=0)
    one_by_one = [single.translate([t], "en", "pt")[0] for t in texts]
    # a 24-token budget: CTranslate2 sorts by length into many batches, then restores order
    batched = Translator(marian / "ct2", max_batch_size=24, memory_size=0)
    assert batched.translate(texts, "en", "pt") == one_by_one
    assert len(set(one_by_one)) > 20


def test_cli_translates_world_captions(world_dir, marian, tmp_path):
    from babelcap.cli import main

    pairs = gold_pairs(world_dir, "en", "pt")[:50]
    src = tmp_path / "en.txt"
    src.write_text("\n".join(s for s, _ in pairs) + "\n", encoding="utf-8")
    dst = tmp_path / "pt.txt"
    assert (
        main(
            [
                "translate",
                "--model",
                str(marian / "ct2"),
                "--src",
                "en",
                "--tgt",
                "pt-BR",
                "--input",
                str(src),
                "--output",
                str(dst),
            ]
        )
        == 0
    )
    out = dst.read_text(encoding="utf-8").splitlines()
    assert len(out) == len(pairs)
    assert _exact(out, [t for _, t in pairs]) >= 0.6

"""Translation quality scores with the world's real models (CTranslate2 translators, captioner,
CLIP): a translation of another sentence scores below a faithful one; the pipeline drops junk
alt-text before translating it, stores the scores in the shards (read back through
`find_shards`), and counts what its filters drop.

The forward translator is the world's `m2m-multi` (the demo's, built for other tests anyway);
the bad translations are made here, each source paired with another picture's translation.
Round trips go through the world's reverse model `m2m-pt-en` (pt->en: every round trip here
starts in pt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from babelcap.core import schema
from babelcap.core.shards import find_shards


@pytest.fixture(scope="module")
def translators(world_models):
    from babelcap.translators import Translator

    dirs = world_models("m2m-multi", "m2m-pt-en")
    return Translator(str(dirs["m2m-multi"] / "ct2")), Translator(str(dirs["m2m-pt-en"] / "ct2"))


def test_a_mismatched_source_scores_below_a_faithful_translation(world_dir, translators):
    from babelcap.translators.scoring import TranslationScorer
    from babelcap.world.models.translator import gold_pairs

    forward, reverse = translators
    sources = list(dict.fromkeys(s for s, _ in gold_pairs(world_dir, "en", "pt")))[:40]
    faithful = forward.translate(sources, "en", "pt")
    # Each source paired with the translation of another picture's caption.
    swapped = faithful[1:] + faithful[:1]
    scorer = TranslationScorer(forward, reverse)
    good = scorer.score(sources, faithful, "en", "pt")
    bad = scorer.score(sources, swapped, "en", "pt")
    for signal in ("roundtrip_chrf", "logprob", "combined"):
        g = [getattr(x, signal) for x in good]
        b = [getattr(x, signal) for x in bad]
        assert None not in g and None not in b
        wins = sum(x > y for x, y in zip(g, b, strict=True))
        assert wins >= 0.9 * len(sources), (signal, wins)
        assert sum(g) / len(g) > sum(b) / len(b)
    # The faithful round trip comes back close to the source.
    assert sum(x.roundtrip_chrf for x in good) / len(good) > 0.5
    # A second call is answered by the translation memory, with the same numbers.
    hits = forward.memory.hits
    assert scorer.score(sources, faithful, "en", "pt") == good
    assert forward.memory.hits > hits


JUNK = ("stock image", "IMG_0412.jpg")


@pytest.fixture(scope="module")
def run(world_dir, world_models, tmp_path_factory):
    """A small world run with junk alt-text, scored with the reverse model, filtered."""
    from babelcap.pipelines.options import (
        AugmentConfig,
        CaptionerConfig,
        ClipConfig,
        TextFilterConfig,
        TranslationStageConfig,
    )
    from babelcap.pipelines.runner import run as run_augment

    dirs = world_models("captioner", "m2m-multi", "m2m-pt-en", "clip-base")
    root = tmp_path_factory.mktemp("scores")
    rows = [json.loads(x) for x in (world_dir / "manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][:10]
    for r, junk in zip(rows, JUNK, strict=False):
        r["caption"] = junk
    with open(root / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "image_path": str(world_dir / r["image_path"])}) + "\n")
    config = AugmentConfig(
        input=str(root / "manifest.jsonl"),
        output=str(root / "out"),
        languages=("pt",),
        captioner=CaptionerConfig(model=str(dirs["captioner"]), num_captions=3, batch_size=8),
        translator=TranslationStageConfig(
            model=str(dirs["m2m-multi"] / "ct2"),
            reverse_model=str(dirs["m2m-pt-en"] / "ct2"),
            batch_size=8,
        ),
        clip=ClipConfig(model=str(dirs["clip-base"]), batch_size=16),
        text=TextFilterConfig(translation_top_k=2),
    )
    manifest = run_augment(config, workers=1, echo=False)
    return {"manifest": manifest, "out": root / "out", "rows": rows}


def _read(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    found = find_shards(out)
    return [
        row
        for f in found.files
        for row in pq.read_table(f, filesystem=found.filesystem).to_pylist()
    ]


def test_junk_alt_text_is_dropped_before_translation(run):
    rows = _read(run["out"])
    assert len(rows) == len(run["rows"])
    texts = [c["text"] for r in rows for c in r["captions"]]
    for junk in JUNK:
        assert junk not in texts
    for r in rows:
        caps = r["captions"]
        for c in caps:
            if c["origin"] == schema.ORIGIN_TRANSLATED:
                assert caps[c["source_index"]]["text"] not in JUNK
    drops = run["manifest"]["caption_drops"]
    assert drops.get("select.source_clip_below_synthetic", 0) >= len(JUNK)


def test_scores_are_stored_and_survive_the_shards(run):
    rows = _read(run["out"])
    translated = [c for r in rows for c in r["captions"] if c["origin"] == "translated"]
    assert translated
    for c in translated:
        assert 0.0 <= c["translation_score"] <= 1.0
        assert 0.0 <= c["roundtrip_chrf"] <= 1.0
        assert c["translation_logprob"] <= 0.0
    # top-2 per image and language, counted
    per_image = [sum(c["origin"] == "translated" for c in r["captions"]) for r in rows]
    assert max(per_image) <= 2
    drops = run["manifest"]["caption_drops"]
    assert drops.get("filter_tr.translation_not_top_k", 0) > 0


def test_translation_report_gives_distributions_and_lowest_examples(run):
    from babelcap.pipelines.translation_report import (
        format_translation_report,
        translation_report,
    )

    report = translation_report(run["out"], lowest=3)
    pt = report["pt"]
    assert pt["scored"] == pt["translations"] > 0
    assert pt["translation_score"]["n"] == pt["scored"]
    low = [e["translation_score"] for e in pt["lowest"]]
    assert low == sorted(low) and len(low) == 3
    assert low[0] == pytest.approx(pt["translation_score"]["p5"], abs=0.2)
    lines = format_translation_report(report)
    assert any("| pt | roundtrip_chrf |" in line for line in lines)
    assert any(pt["lowest"][0]["translation"] in line for line in lines)

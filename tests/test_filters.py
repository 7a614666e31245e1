"""Caption filters of issue 18 / 15 that need no model: degenerate translations, thresholds and
top k on translation scores, the source alt-text CLIP filter, empty translations by cause and
a language check whose verdict does not depend on the run's other languages. Every drop is
counted per stage and reason (what the run manifest reports)."""

from __future__ import annotations

import pytest

from babelcap.core import schema
from babelcap.pipelines.filters import FilterTranslations, SelectCaptions
from babelcap.pipelines.options import ClipConfig, TextFilterConfig
from babelcap.translators.scoring import combine, degenerate, repeated_ngram


def _src(text, score=None):
    return schema.caption(text, "en", schema.ORIGIN_SOURCE, score=score)


def _syn(text, score):
    return schema.caption(text, "en", schema.ORIGIN_SYNTHETIC, score=score)


def _tr(text, lang="pt", source_index=0, score=None):
    return schema.caption(
        text, lang, schema.ORIGIN_TRANSLATED, source_index=source_index, translation_score=score
    )


def _run(fn, rec):
    return next(fn.process({"stats": {}, **rec}))


def test_repetition_loops_and_length_ratio():
    loop = "um círculo azul grande um círculo azul grande um círculo azul grande um círculo"
    assert repeated_ngram(loop) == 3
    assert repeated_ngram("um círculo azul grande") == 1
    assert degenerate("a big blue circle", loop) == "repetition_loop"
    assert degenerate("a big blue circle and a small red star", "sim") == "length_ratio"
    assert degenerate("a big blue circle", "um círculo azul grande") is None
    # A source that loops itself may give a looping translation.
    assert degenerate(loop, loop) is None


def test_degenerate_translations_are_dropped_and_counted():
    fn = FilterTranslations(TextFilterConfig(language_check=False), ["pt"])
    loop = " ".join(["uma gota verde grande"] * 4)
    out = _run(
        fn,
        {
            "captions": [
                _src("a big green drop"),
                _tr(loop),
                _tr(
                    "uma gota verde grande à esquerda de um quadrado azul pequeno e de "
                    "uma estrela roxa",
                    lang="es",
                ),
                _tr("uma gota verde grande", lang="de"),
            ]
        },
    )
    assert [c["language"] for c in out["captions"]] == ["en", "de"]
    assert out["stats"] == {
        "caption_drop.filter_tr.repetition_loop": 1,
        "caption_drop.filter_tr.length_ratio": 1,
    }
    off = FilterTranslations(TextFilterConfig(language_check=False, degenerate_check=False), [])
    assert len(_run(off, {"captions": [_src("a big green drop"), _tr(loop)]})["captions"]) == 2


def test_empty_translations_are_counted_by_cause():
    fn = FilterTranslations(TextFilterConfig(language_check=False), ["pt"])
    out = _run(
        fn,
        {
            "captions": [
                _src("a red star"),
                _src(" "),
                _tr("", source_index=0),
                _tr("", source_index=1),
            ]
        },
    )
    assert out["stats"] == {
        "caption_drop.filter_tr.empty_output": 1,
        "caption_drop.filter_tr.empty_source": 1,
    }


def test_translation_score_threshold_and_top_k_per_language():
    caps = [
        _src("a big red star"),
        _src("a small blue circle"),
        _tr("uma estrela vermelha grande", "pt", 0, 0.9),
        _tr("um círculo azul pequeno", "pt", 1, 0.6),
        _tr("una estrella roja grande", "es", 0, 0.2),
        _tr("un círculo azul pequeño", "es", 1, 0.7),
    ]
    thr = FilterTranslations(TextFilterConfig(language_check=False, min_translation_score=0.5), [])
    out = _run(thr, {"captions": caps})
    assert [c["text"] for c in out["captions"][2:]] == [
        caps[2]["text"],
        caps[3]["text"],
        caps[5]["text"],
    ]
    assert out["stats"] == {"caption_drop.filter_tr.translation_score_below_threshold": 1}

    top = FilterTranslations(TextFilterConfig(language_check=False, translation_top_k=1), [])
    out = _run(top, {"captions": caps})
    assert [c["text"] for c in out["captions"]] == [
        caps[0]["text"],
        caps[1]["text"],
        caps[2]["text"],
        caps[5]["text"],
    ]
    assert out["stats"] == {"caption_drop.filter_tr.translation_not_top_k": 2}


def test_source_alt_text_filter_relative_and_absolute():
    text = TextFilterConfig(near_duplicate_threshold=0.95)
    rec = {
        "captions": [
            _src("stock image", 0.217),
            _syn("a photo of a small red star", 0.86),
            _syn("a picture of a small red star on the left", 0.84),
        ]
    }
    out = _run(SelectCaptions(text, ClipConfig(model="m")), rec)
    assert [c["origin"] for c in out["captions"]] == ["synthetic", "synthetic"]
    assert out["stats"]["caption_drop.select.source_clip_below_synthetic"] == 1
    # Off: the alt-text stays.
    out = _run(SelectCaptions(text, ClipConfig(model="m", source_filter=False)), rec)
    assert out["captions"][0]["text"] == "stock image"
    # No synthetic captions to compare with: only an absolute threshold applies.
    alone = {"captions": [_src("IMG_0412.jpg", 0.2), _src("a small red star", 0.8)]}
    out = _run(SelectCaptions(text, ClipConfig(model="m")), alone)
    assert len(out["captions"]) == 2
    out = _run(SelectCaptions(text, ClipConfig(model="m", source_min_score=0.5)), alone)
    assert [c["text"] for c in out["captions"]] == ["a small red star"]
    assert out["stats"]["caption_drop.select.source_clip_below_threshold"] == 1


@pytest.fixture(scope="module")
def detectors():
    fns = {}
    for langs in (("pt",), ("pt", "es")):
        fn = FilterTranslations(TextFilterConfig(), langs)
        fn.setup()
        fns[langs] = fn
    return fns


def test_language_verdict_does_not_depend_on_the_other_targets(detectors):
    # The example: taken for Spanish when the run targeted pt and es.
    pt = "um pentágono roxo grande, um hexágono roxo grande e uma gota verde grande"
    rec = {
        "captions": [
            _src("a big purple pentagon, a big purple hexagon and a big green drop"),
            _tr(pt, "pt"),
            _tr("a big purple pentagon and a big green drop", "pt"),  # not translated at all
        ]
    }
    outs = [_run(fn, rec) for fn in detectors.values()]
    for out in outs:
        assert [c["text"] for c in out["captions"]][1:] == [pt]
        assert out["stats"] == {"caption_drop.filter_tr.wrong_language": 1}


def test_combined_score_is_the_mean_of_the_signals():
    assert combine(0.5, 0.0) == pytest.approx(0.75)  # exp(0) = 1
    assert combine(None, None) is None and combine(0.4, None) == pytest.approx(0.4)


def test_scores_and_filters_are_augment_options():
    from babelcap.cli import build_parser
    from babelcap.commands.augment import config_from_args

    args = build_parser().parse_args(
        [
            "augment",
            "--input",
            "m.jsonl",
            "--output",
            "out",
            "--translator",
            "tr",
            "--languages",
            "pt",
            "--clip",
            "clipdir",
            "--filter",
            "min_translation_score=0.6",
            "--filter",
            "translation_top_k=2",
            "--set",
            "translator.reverse_model=back",
            "--set",
            "clip.source_relative=0.8",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.text.min_translation_score == 0.6 and cfg.text.translation_top_k == 2
    assert cfg.translator.reverse_model == "back" and cfg.translator.score is True
    assert cfg.clip.source_filter is True and cfg.clip.source_relative == 0.8
    assert cfg.text.degenerate_check is True  # on by default

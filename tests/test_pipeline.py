"""Pipeline stages one by one: decoding and checks, sources, dedup, filters, sinks, accounting,
the export to WebDataset. Beam transforms run under TestPipeline with assert_that/equal_to."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from babelcap.core import schema
from babelcap.pipelines import accounting
from babelcap.pipelines.deadletter import DEAD
from babelcap.pipelines.decode import DecodeImages, ImageError, decode_rgb
from babelcap.pipelines.dedup import DropDuplicateImages
from babelcap.pipelines.filters import (
    FilterEnglish,
    FilterTranslations,
    SelectCaptions,
    exact_key,
    near_duplicates,
    text_problem,
)
from babelcap.pipelines.options import (
    AugmentConfig,
    ClipConfig,
    TextFilterConfig,
    TranslationStageConfig,
)
from babelcap.pipelines.sources import detect_format

sys.path.insert(0, str(Path(__file__).parent / "data"))
import pipeline_testkit as kit


def _pipeline() -> BeamTestPipeline:
    """A TestPipeline on the local runner named explicitly (DirectRunner would try Prism)."""
    from babelcap.pipelines.runner import LOCAL_RUNNER

    return BeamTestPipeline(runner=LOCAL_RUNNER)


def _png(color=(200, 10, 10), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad")
    good = []
    for i in range(6):
        p = root / f"src{i}.png"
        p.write_bytes(_png((30 * i, 90, 160)))
        good.append(p)
    out = root / "corpus"
    return out, kit.bad_corpus(out, good)


# --- decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kind",
    [
        ("truncated.jpg", "truncated_image"),
        ("zero.jpg", "empty_file"),
        ("text.jpg", "not_an_image"),
        ("bomb.png", "decompression_bomb"),
    ],
)
def test_decode_rejects_bad_files(corpus, name, kind):
    folder, _ = corpus
    with pytest.raises(ImageError) as err:
        decode_rgb((folder / name).read_bytes(), max_pixels=64_000_000)
    assert err.value.kind == kind


@pytest.mark.parametrize(
    "name", ["cmyk.jpg", "gray16.png", "palette_transparent.png", "animated.gif"]
)
def test_decode_converts_odd_modes_to_rgb(corpus, name):
    folder, _ = corpus
    im = decode_rgb((folder / name).read_bytes())
    assert im.mode == "RGB" and im.size == (40, 40)


def test_decode_scales_16_bit_and_composites_transparency(corpus):
    folder, _ = corpus
    gray = decode_rgb((folder / "gray16.png").read_bytes())
    # A 0..65535 ramp must become a 0..255 ramp, not a saturated white image.
    assert gray.getpixel((0, 0))[0] < 10 and gray.getpixel((39, 39))[0] > 245
    assert len({gray.getpixel((20, y))[0] for y in range(40)}) > 30
    pal = decode_rgb((folder / "palette_transparent.png").read_bytes())
    assert pal.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert pal.getpixel((20, 20)) == (0, 255, 0)
    gif = decode_rgb((folder / "animated.gif").read_bytes())
    assert gif.getpixel((5, 5))[0] > 200  # first frame (red), not the blue second one


def test_pixel_limit_is_configurable():
    data = _png(size=(100, 100))
    decode_rgb(data, max_pixels=10_000)
    with pytest.raises(ImageError, match="10000 px"):
        decode_rgb(data, max_pixels=9_999)


def test_decode_stage_routes_and_checks_source_captions():
    cfg = AugmentConfig(input="x", output="y", store_image="reencode", resize_max_side=8)
    base = {
        "uri": "u",
        "split": None,
        "source_language": "en",
        "stats": {},
        "source_caption_error": None,
    }
    recs = [
        {**base, "input_ref": "ok", "data": _png(), "source_caption": "  a  red   square "},
        {**base, "input_ref": "long", "data": _png((1, 2, 3)), "source_caption": "x" * 2000},
        {**base, "input_ref": "empty", "data": b"", "source_caption": None},
    ]
    with _pipeline() as p:
        out = p | beam.Create(recs) | beam.ParDo(DecodeImages(cfg)).with_outputs(DEAD, main="ok")
        ok = out.ok | "ok" >> beam.Map(
            lambda r: (
                r["input_ref"],
                [c["text"] for c in r["captions"]],
                Image.open(io.BytesIO(r["image"]["bytes"])).size,
                r["stats"].get("caption_drop.source.too_long", 0),
            )
        )
        dead = out[DEAD] | "dead" >> beam.Map(
            lambda d: (d["row"]["input_ref"], d["row"]["stage"], d["row"]["error_kind"])
        )
        assert_that(
            ok,
            equal_to([("ok", ["a red square"], (8, 8), 0), ("long", [], (8, 8), 1)]),
            label="rows",
        )
        assert_that(dead, equal_to([("empty", "decode", "empty_file")]), label="dead")


# --- sources --------------------------------------------------------------------------------
def test_detect_format():
    assert detect_format("a/m.jsonl") == "manifest"
    assert detect_format("gs://b/m.parquet") == "manifest"
    assert detect_format("d/shard-{000..009}.tar") == "webdataset"
    assert detect_format("d/images") == "folder"


_run_expand = kit.expand_input


def test_manifest_jsonl_reports_bad_rows_and_bad_utf8(corpus):
    folder, _ = corpus
    cfg = AugmentConfig(input=str(folder / "manifest.jsonl"), output="o")
    recs, dead = _run_expand(cfg)
    assert [d["error_kind"] for d in dead] == ["bad_manifest_row"]
    bad = [r for r in recs if r["source_caption_error"]]
    assert len(bad) == 1 and bad[0]["source_caption_error"] == "invalid_utf8"
    assert all(r["uri"].startswith(str(folder)) for r in recs)  # relative to the manifest
    assert all(r["stats"] == {accounting.INPUTS: 1} for r in recs)


def test_manifest_csv_and_parquet(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    (tmp_path / "m.csv").write_text('path,text,lang\nimg/a.png,"um quadrado, vermelho",pt\n')
    pq.write_table(
        pa.table({"image": ["img/a.png"], "caption": [b"\xffbad"]}), tmp_path / "m.parquet"
    )
    recs, _ = _run_expand(AugmentConfig(input=str(tmp_path / "m.csv"), output="o"))
    assert recs[0]["source_caption"] == "um quadrado, vermelho"
    assert recs[0]["source_language"] == "pt"
    assert recs[0]["input_ref"].endswith("m.csv#L2")
    recs, _ = _run_expand(AugmentConfig(input=str(tmp_path / "m.parquet"), output="o"))
    assert recs[0]["source_caption_error"] == "invalid_utf8"
    assert recs[0]["uri"] == str(tmp_path / "img" / "a.png")


def test_folder_source_is_recursive_and_skips_hidden(tmp_path):
    for rel in ("a.png", "sub/b.jpg", "sub/deeper/c.PNG", ".hidden/d.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_png())
    recs, _ = _run_expand(AugmentConfig(input=str(tmp_path), output="o"))
    names = sorted(Path(r["uri"]).name for r in recs)
    assert names == ["a.png", "b.jpg", "c.PNG"]


def test_webdataset_source_reads_members_in_memory(tmp_path):
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("k1.png", _png())
        add("k1.txt", b"a red square")
        add("k2.jpg", _png((0, 0, 200)))
        add("k2.json", json.dumps({"caption": "um quadrado", "language": "pt"}).encode())
        add("k3.txt", b"caption without an image")
        add("../../escape.png", _png())  # a hostile name: read in memory, never extracted
    recs, dead = _run_expand(AugmentConfig(input=str(tar_path), output="o"))
    by_ref = {r["input_ref"].split("#")[1]: r for r in recs}
    assert by_ref["k1"]["source_caption"] == "a red square" and by_ref["k1"]["data"]
    assert by_ref["k2"]["source_language"] == "pt"
    assert [d["error_kind"] for d in dead] == ["no_image_in_sample"]
    assert not (tmp_path.parent / "escape.png").exists()


# --- dedup ----------------------------------------------------------------------------------
def test_duplicate_images_keep_first_in_input_order():
    def rec(ref, order, image_id):
        return {"input_ref": ref, "order": order, "image_id": image_id, "stats": {}}

    recs = [rec("m#L10", ("m", 10), "aa"), rec("m#L9", ("m", 9), "aa"), rec("m#L2", ("m", 2), "bb")]
    with _pipeline() as p:
        unique, dups = p | beam.Create(recs) | DropDuplicateImages()
        assert_that(
            unique | "u" >> beam.Map(lambda r: r["input_ref"]),
            equal_to(["m#L9", "m#L2"]),
            label="unique",
        )
        assert_that(
            dups
            | "d"
            >> beam.Map(
                lambda d: (
                    d["row"]["input_ref"],
                    d["row"]["message"],
                    d["stats"][accounting.DUPLICATES],
                )
            ),
            equal_to([("m#L10", "duplicate of m#L9", 1)]),
            label="dups",
        )


# --- filters --------------------------------------------------------------------------------
def test_text_filters_and_keys():
    cfg = TextFilterConfig(min_chars=3, min_words=2, max_chars=20)
    assert text_problem("", cfg) == "empty"
    assert text_problem("red", cfg) == "too_short"
    assert text_problem("a very long caption indeed", cfg) == "too_long"
    assert text_problem("a red circle", cfg) is None
    assert exact_key("A red, circle!") == exact_key("a red circle")


def test_near_duplicates_keep_minimum():
    texts = ["a photo of a red circle", "a photo of a red circle ", "a drawing of a blue star"]
    assert near_duplicates(texts, [0, 1, 2], 0.9, 1) == [0, 2]
    assert near_duplicates(texts[:2], [0, 1], 0.9, 2) == [0, 1]  # min_keep brings one back


def _cap(text, origin="synthetic", lang="en", score=None, source_index=None):
    return schema.caption(text, lang, origin, score=score, source_index=source_index)


def test_select_captions_capivara_style():
    rec = {
        "stats": {},
        "captions": [
            _cap("a red circle", "source", score=0.3),
            _cap("a photo of a red circle", score=0.9),
            _cap("a photo of a red circle on the left", score=0.5),
            _cap("a drawing of a blue square", score=0.1),
            _cap("a picture of a green star", score=0.7),
        ],
    }
    clip = ClipConfig(model="m", score_threshold=0.2, top_k=2)
    out = next(SelectCaptions(TextFilterConfig(near_duplicate_threshold=0.95), clip).process(rec))
    assert [c["text"] for c in out["captions"]] == [
        "a red circle",
        "a photo of a red circle",
        "a picture of a green star",
    ]
    assert out["stats"]["caption_drop.select.clip_below_threshold"] == 1
    assert out["stats"]["caption_drop.select.clip_not_top_k"] == 1


def test_filter_english_drops_repeats_of_the_source():
    prompt_only = schema.caption("a photo of", "en", "synthetic", prompt="a photo of")
    rec = {
        "stats": {},
        "captions": [
            _cap("A red circle.", "source"),
            _cap("a red circle"),
            _cap("x"),
            _cap("a photo of a red circle"),
            prompt_only,
        ],
    }
    out = next(FilterEnglish(TextFilterConfig()).process(rec))
    assert [c["text"] for c in out["captions"]] == ["A red circle.", "a photo of a red circle"]
    assert out["stats"] == {
        "caption_drop.filter_en.exact_duplicate": 1,
        "caption_drop.filter_en.too_short": 1,
        "caption_drop.filter_en.prompt_only": 1,
    }


def test_language_check_with_lingua():
    fn = FilterTranslations(TextFilterConfig(), ["pt", "es"])
    fn.setup()
    rec = {
        "stats": {},
        "captions": [
            _cap("a small red circle next to a big blue square", "source"),
            _cap(
                "um pequeno círculo vermelho ao lado de um grande quadrado azul",
                "translated",
                "pt",
                source_index=0,
            ),
            _cap(
                "a small red circle next to a big blue square", "translated", "es", source_index=0
            ),
        ],
    }
    out = next(fn.process(rec))
    assert [c["language"] for c in out["captions"]] == ["en", "pt"]
    assert out["stats"] == {"caption_drop.filter_tr.wrong_language": 1}


# --- accounting and early errors ----------------------------------------------------------
def test_accounting_balance_and_mismatch():
    books = accounting.balance({accounting.INPUTS: 10}, rows=6, dead_letter_rows=4, duplicates=1)
    assert books == {
        "inputs": 10,
        "rows_written": 6,
        "dead_lettered": 3,
        "duplicates_dropped": 1,
        "balanced": True,
    }
    with pytest.raises(accounting.AccountingError, match="mismatch"):
        accounting.balance({accounting.INPUTS: 10}, rows=6, dead_letter_rows=3, duplicates=1)


def test_unknown_target_language_fails_before_any_work(tmp_path):
    from babelcap.pipelines.runner import run

    translator = kit.tiny_translator(tmp_path / "tr", languages=("pt",))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png())
    for bad, match in (("xx-nope", "unknown target language"), ("de", "not served")):
        cfg = AugmentConfig(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            languages=("pt", bad),
            translator=TranslationStageConfig(model=str(translator)),
        )
        with pytest.raises(ValueError, match=match):
            run(cfg, workers=1)
        assert not (tmp_path / "out").exists()  # nothing started


# --- sinks ----------------------------------------------------------------------------------
def test_unit_files_are_deterministic_and_valid(tmp_path):
    """Each unit's rows of one split: sorted by image_id, cut into ceil(rows / rows_per_shard)
    files, byte-identical whatever the input order; unit.json lists them with the stats."""
    from babelcap.pipelines.sinks import WriteOutputs

    recs = [
        {
            "input_ref": f"in#{i}",
            "image_id": schema.image_id_for(str(i).encode()),
            "split": "test" if i % 5 == 0 else None,
            "captions": [_cap(f"caption {i} here", "source")],
            "stats": {"read.inputs": 1},
        }
        for i in range(0, 4000, 97)
    ]
    unit_of = {r["input_ref"]: (0 if i < 30 else 1) for i, r in enumerate(recs)}

    def write(folder):
        with _pipeline() as p:
            records = p | "R" >> beam.Create(list(reversed(recs)) if folder.name == "b" else recs)
            dead = p | "D" >> beam.Create([])
            _ = (records, dead) | WriteOutputs(
                str(folder), {"seed": 0}, {}, num_shards=None, rows_per_shard=8, unit_of=unit_of
            )

    write(tmp_path / "a")
    write(tmp_path / "b")
    files_a = sorted((tmp_path / "a").glob("unit-*/data/*.parquet"))
    names = [f.relative_to(tmp_path / "a").as_posix() for f in files_a]
    assert names == [
        f.relative_to(tmp_path / "b").as_posix()
        for f in sorted((tmp_path / "b").glob("unit-*/data/*.parquet"))
    ]
    # unit 0: 30 inputs, 6 of them test -> train 24 rows in 3 files, test 6 in 1
    assert [n for n in names if n.startswith("unit-00000")] == [
        "unit-00000/data/test-00000-of-00001.parquet",
        "unit-00000/data/train-00000-of-00003.parquet",
        "unit-00000/data/train-00001-of-00003.parquet",
        "unit-00000/data/train-00002-of-00003.parquet",
    ]
    for fa in files_a:
        assert fa.read_bytes() == (tmp_path / "b" / fa.relative_to(tmp_path / "a")).read_bytes()
        info = schema.validate(str(fa))
        ids = pq.read_table(fa)["image_id"].to_pylist()
        assert ids == sorted(ids) and info.config == {"seed": 0}
    assert sum(schema.validate(str(f)).num_rows for f in files_a) == len(recs)
    record = json.loads((tmp_path / "a" / "unit-00001" / "unit.json").read_text())
    assert record["stats"]["read.inputs"] == len(recs) - 30
    assert sum(f["rows"] for f in record["files"]) == len(recs) - 30


# --- CLI --------------------------------------------------------------------------------------
def test_augment_cli_builds_the_config_and_passes_beam_options():
    from babelcap.cli import build_parser
    from babelcap.commands.augment import config_from_args

    args = build_parser().parse_args(
        [
            "augment",
            "--input",
            "m.jsonl",
            "--output",
            "out",
            "--captioner",
            "cap",
            "--translator",
            "tr",
            "--languages",
            "pt, es",
            "--num-captions",
            "3",
            "--filter",
            "min_words=3",
            "--filter",
            "language_check=false",
            "--clip",
            "clipdir",
            "--clip-top-k",
            "2",
            "--workers",
            "3",
            "--",
            "--runner",
            "DataflowRunner",
            "--project",
            "p",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.languages == ("pt", "es") and cfg.captioner.num_captions == 3
    assert cfg.captioner.prompts[0] == "a photo of" and len(cfg.captioner.prompts) == 10
    assert cfg.text.min_words == 3 and cfg.text.language_check is False
    assert cfg.clip.top_k == 2 and args.workers == 3
    assert [a for a in args.beam_args if a != "--"] == [
        "--runner",
        "DataflowRunner",
        "--project",
        "p",
    ]
    assert AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="KEY=VALUE"):
        config_from_args(
            build_parser().parse_args(
                ["augment", "--input", "i", "--output", "o", "--filter", "nope=1"]
            )
        )


def test_local_runner_is_chosen_explicitly():
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    from babelcap.pipelines.runner import LOCAL_RUNNER, pipeline_options

    opts = pipeline_options([], workers=2)
    assert opts.view_as(StandardOptions).runner == LOCAL_RUNNER  # not DirectRunner -> Prism
    assert opts.view_as(DirectOptions).direct_running_mode == "multi_processing"
    assert opts.view_as(DirectOptions).direct_num_workers == 2
    # Local workers log warnings only, unless asked otherwise.
    assert opts.get_all_options()["default_sdk_harness_log_level"] == "WARNING"
    opts = pipeline_options(["--default_sdk_harness_log_level", "DEBUG"], workers=2)
    assert opts.get_all_options()["default_sdk_harness_log_level"] == "DEBUG"
    opts = pipeline_options(["--runner", "DataflowRunner", "--project", "p"], workers=2)
    assert opts.view_as(StandardOptions).runner == "DataflowRunner"
    assert opts.get_all_options()["project"] == "p"
    assert opts.get_all_options()["default_sdk_harness_log_level"] is None  # Dataflow's own


def test_a_job_without_models_never_imports_torch(tmp_path):
    """Alt-text in, no captioner, CLIP or translation: the model stages (Beam's RunInference,
    which imports torch and scipy) stay unimported, in the CLI process and its in-process
    worker, so such a job starts in about a second and a half instead of five."""
    from test_publish import make_inputs

    manifest = make_inputs(tmp_path / "in", 4)
    out = tmp_path / "out"
    child = (
        "import sys; from babelcap.cli import main; rc = main(sys.argv[1:]); "
        "print('heavy:', [m for m in ('torch', 'scipy', 'transformers') if m in sys.modules]); "
        "sys.exit(rc)"
    )
    args = ["augment", "--input", str(manifest), "--output", str(out), "--workers", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", child, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy: []" in proc.stdout, proc.stdout
    assert json.loads((out / "run_manifest.json").read_text())["accounting"]["balanced"]


def test_runner_options_leave_the_environment_alone(monkeypatch):
    """`pipeline_options` only builds options (it used to export PYTHONPATH and the torch
    thread count into this process, for every later test); `worker_environment` sets the
    thread count for the workers of a local multi-process run, only while the run lasts."""
    from babelcap.core.devices import THREADS_ENV
    from babelcap.pipelines.runner import pipeline_options, worker_environment

    monkeypatch.delenv(THREADS_ENV, raising=False)
    before = dict(os.environ)
    dataflow = ["--runner", "DataflowRunner", "--project", "p"]
    multi = pipeline_options([], workers=2)
    single = pipeline_options([], workers=1)
    remote = pipeline_options(dataflow, workers=2)
    pipeline_options(["--direct_num_workers", "3"], workers=2)
    assert dict(os.environ) == before

    with worker_environment(multi):
        inside = dict(os.environ)
    assert dict(os.environ) == before
    assert 1 <= int(inside.pop(THREADS_ENV)) <= (os.cpu_count() or 1)
    assert inside == before  # the thread count is the only change, PYTHONPATH included

    for options in (single, remote):  # in-process and remote runs: nothing to set
        with worker_environment(options):
            assert dict(os.environ) == before

    # A value the caller had comes back, also when the run fails.
    monkeypatch.setenv(THREADS_ENV, "caller's")
    with pytest.raises(RuntimeError, match="run failed"), worker_environment(multi):
        assert os.environ[THREADS_ENV] != "caller's"
        raise RuntimeError("run failed")
    assert os.environ[THREADS_ENV] == "caller's"
    assert {k: v for k, v in os.environ.items() if k != THREADS_ENV} == before


def test_translator_threads_follow_the_workers_share_of_cores(monkeypatch, tmp_path):
    """CTranslate2 would take 4 threads in every worker; in a local multi-process run each
    worker's engine gets the worker's share, unless the options name intra_threads."""
    from babelcap.core.devices import THREADS_ENV
    from babelcap.pipelines.options import TranslationStageConfig
    from babelcap.pipelines.runner import pipeline_options, worker_environment
    from babelcap.pipelines.translation import engine_config

    monkeypatch.delenv(THREADS_ENV, raising=False)
    cfg = TranslationStageConfig(model=str(tmp_path))
    assert engine_config(cfg).intra_threads == 0  # outside a local run: CTranslate2 decides
    with worker_environment(pipeline_options([], workers=2)):
        share = int(os.environ[THREADS_ENV])
        assert engine_config(cfg).intra_threads == share
        mine = TranslationStageConfig(model=str(tmp_path), options={"intra_threads": 3})
        assert engine_config(mine).intra_threads == 3


# --- model stages (tiny real models, in-process runner) ----------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "captioner": str(kit.tiny_blip(root / "blip")),
        "translator": str(kit.tiny_translator(root / "tr", languages=("pt", "es"))),
    }


def test_caption_and_translate_transforms(tiny_models):
    from babelcap.pipelines.captioning import Caption
    from babelcap.pipelines.options import CaptionerConfig
    from babelcap.pipelines.translation import Translate

    recs = [
        {
            "input_ref": f"r{i}",
            "image_id": f"id{i}",
            "data": _png((60 * i, 20, 20)),
            "stats": {},
            "captions": [_cap(f"a red square number {i}", "source")],
        }
        for i in range(3)
    ]
    captioner = CaptionerConfig(
        model=tiny_models["captioner"],
        num_captions=3,
        prompts=("a photo of", "a drawing of"),
        max_new_tokens=5,
        batch_size=2,
    )
    translator = TranslationStageConfig(
        model=tiny_models["translator"], batch_size=2, options={"max_decoding_length": 8}
    )

    def shape(rec):
        return rec["input_ref"], [
            (c["origin"], c["prompt"], c["language"], c["source_index"]) for c in rec["captions"]
        ]

    english = [
        ("source", None, "en", None),
        ("synthetic", "a photo of", "en", None),
        ("synthetic", "a drawing of", "en", None),
        ("synthetic", "a photo of", "en", None),
    ]
    translated = [("translated", None, lang, j) for lang in ("pt", "es") for j in range(4)]
    with _pipeline() as p:
        captioned, cap_dead = p | beam.Create(recs) | "Cap" >> Caption(captioner, 0, 10**8)
        done, tr_dead = captioned | "Tr" >> Translate(translator, ("pt", "es"))
        assert_that(
            done | beam.Map(shape), equal_to([(f"r{i}", english + translated) for i in range(3)])
        )
        assert_that((cap_dead, tr_dead) | beam.Flatten(), equal_to([]), label="no dead")
        assert_that(
            done
            | "txt"
            >> beam.Map(
                lambda r: all(
                    c["text"].startswith(c["prompt"]) for c in r["captions"] if c["prompt"]
                )
            ),
            equal_to([True] * 3),
            label="prefix",
        )


def test_sampled_captions_do_not_depend_on_batching(tiny_models):
    from babelcap.pipelines.captioning import CaptionModelHandler
    from babelcap.pipelines.options import CaptionerConfig

    cfg = CaptionerConfig(
        model=tiny_models["captioner"],
        num_captions=2,
        sampling=True,
        max_new_tokens=6,
        prompts=("a photo of",),
    )
    handler = CaptionModelHandler(cfg, seed=3)
    model = handler.load_model()
    recs = [
        {"image_id": f"id{i}", "data": _png((90 * i, 10, 10)), "captions": [], "stats": {}}
        for i in range(2)
    ]

    def texts(batch):
        return [[c["text"] for c in r["captions"]] for r in handler.run_inference(batch, model)]

    together = texts(recs)
    assert texts(recs[1:]) == together[1:]

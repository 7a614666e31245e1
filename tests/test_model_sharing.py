"""One model copy shared by Beam's worker processes (`AugmentConfig.model_copies`, issue 17).

With `model_copies` N >= 1 RunInference keeps N copies of each model per machine, in one of the
worker processes, and the others call them through Beam's proxy (`multi_process_shared`): only
public methods cross, arguments and results pickled. The handlers call the loaded model the same
way whether it is shared or not, so:

- each handler gives the same records through Beam's proxy as with the model in hand (tiny
  real models, the proxy served from a thread of this process);
- the real pipeline on the test world, 2 worker processes, gives the same rows with
  `model_copies=1` as without, and loads every model once instead of once per worker (Beam's
  own load count: RunInference records one `load_model_latency_milli_secs` per load);
- the setting changes nothing a run is compared by (it is not part of "the same run").
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from babelcap.pipelines import units
from babelcap.pipelines.options import (
    AugmentConfig,
    CaptionerConfig,
    ClipConfig,
    TranslationStageConfig,
)

sys.path.insert(0, str(Path(__file__).parent / "data"))
import pipeline_testkit as kit

STAGES = ("caption", "clip", "translate")


def _png(color, size=(50, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# --- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize("copies", [0, 1, 2])
def test_handlers_share_their_model_as_configured(copies, tmp_path):
    from babelcap.pipelines.captioning import CaptionModelHandler
    from babelcap.pipelines.clipscore import ClipModelHandler
    from babelcap.pipelines.translation import TranslateModelHandler

    handlers = [
        CaptionModelHandler(CaptionerConfig(model="m"), copies=copies),
        ClipModelHandler(ClipConfig(model="m"), copies=copies),
        TranslateModelHandler(TranslationStageConfig(model=str(tmp_path)), ("pt",), copies=copies),
    ]
    for handler in handlers:
        assert handler.share_model_across_processes() is (copies >= 1)
        assert handler.model_copies() == max(1, copies)


def test_model_copies_is_a_flag_and_not_part_of_the_run():
    """`--model-copies` sets the field; a run differing only in it is the same run (same
    fingerprint, nothing incompatible), unlike one with another seed."""
    from babelcap.cli import build_parser
    from babelcap.commands.augment import config_from_args
    from babelcap.pipelines.runner import config_fingerprint

    args = build_parser().parse_args(["augment", "--input", "i", "--output", "o"])
    plain = config_from_args(args)
    args = build_parser().parse_args(
        ["augment", "--input", "i", "--output", "o", "--model-copies", "1"]
    )
    shared = config_from_args(args)
    assert (plain.model_copies, shared.model_copies) == (0, 1)
    with pytest.raises(ValueError, match="model_copies"):
        plain.updated({"model_copies": -1})
    assert config_fingerprint(shared) == config_fingerprint(plain)
    assert units.config_differences(plain.to_dict(), shared.to_dict()) == []
    assert config_fingerprint(plain.updated({"seed": 1})) != config_fingerprint(plain)


def test_one_process_runs_keep_their_own_models():
    """In-process local runs have no other process to share with (and a shared copy would be
    served from the caller's process, never released): the runner turns sharing off there."""
    from babelcap.pipelines.runner import for_runner, pipeline_options

    config = AugmentConfig(input="i", output="o", model_copies=1)
    assert for_runner(config, pipeline_options([], workers=1)).model_copies == 0
    assert for_runner(config, pipeline_options([], workers=2)).model_copies == 1
    threads = ["--direct_running_mode", "multi_threading"]
    assert for_runner(config, pipeline_options(threads, workers=2)).model_copies == 0
    dataflow = ["--runner", "DataflowRunner", "--project", "p"]
    assert for_runner(config, pipeline_options(dataflow, workers=1)).model_copies == 1


def test_a_shared_copy_gets_the_cores_of_all_the_workers(monkeypatch, tmp_path):
    """In a local run each worker process gets its share of the cores; a shared copy runs one
    batch at a time for all of them, so it gets them all (divided between the copies)."""
    from babelcap.core.devices import THREADS_ENV
    from babelcap.pipelines.models import model_threads
    from babelcap.pipelines.runner import pipeline_options, worker_environment
    from babelcap.pipelines.translation import engine_config

    monkeypatch.delenv(THREADS_ENV, raising=False)
    cfg = TranslationStageConfig(model=str(tmp_path))
    assert model_threads(1) is None and engine_config(cfg, copies=1).intra_threads == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # 8 cores
    with worker_environment(pipeline_options([], workers=4)):
        assert model_threads(0) == 2 and engine_config(cfg).intra_threads == 2
        assert model_threads(1) == 8 and engine_config(cfg, copies=1).intra_threads == 8
        assert model_threads(2) == 4


# --- the handlers through Beam's proxy -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "captioner": str(kit.tiny_blip(root / "blip")),
        "translator": str(kit.tiny_translator(root / "tr", languages=("pt", "es"))),
        "clip": str(kit.tiny_clip(root / "clip")),
    }


def _through_proxy(
    handler, batch: list[dict], path: Path, attribute: str, images: bool = True
) -> tuple[list[dict], list[dict]]:
    """(records with the model in hand, records through Beam's proxy to a copy of it); the
    model's `attribute` is there in hand, not through the proxy. A model that reads `images`
    fails on a broken one the same way both ways."""
    from apache_beam.utils.multi_process_shared import MultiProcessShared

    model = handler.load_model()
    assert getattr(model, attribute) is not None
    mine = list(handler.run_inference(batch, model))
    shared = MultiProcessShared(
        handler.load_model, tag=uuid.uuid4().hex, path=str(path), always_proxy=True
    )
    proxy = shared.acquire()
    try:
        assert type(proxy).__name__ == "_AutoProxyWrapper"
        assert proxy.process_id() == os.getpid()  # a method call crosses ...
        with pytest.raises(AttributeError):  # ... an attribute does not
            getattr(proxy, attribute)
        served = list(handler.run_inference(batch, proxy))
        if images:  # a model's failure comes back as itself: the dead letter's reason
            from babelcap.core.images import ImageError  # crosses with its kind

            broken = [{**batch[0], "data": b"no image"}]
            failures = []
            for where in (model, proxy):
                with pytest.raises(ImageError) as failed:
                    handler.run_inference(broken, where)
                failures.append((failed.value.kind, re.sub("0x[0-9a-f]+", "", str(failed.value))))
            assert failures[0] == failures[1]
    finally:
        shared.release(proxy)
    return mine, served


def test_handlers_give_the_same_records_through_the_proxy(tiny, tmp_path):
    from babelcap.pipelines.captioning import CaptionModelHandler
    from babelcap.pipelines.clipscore import ClipModelHandler
    from babelcap.pipelines.translation import TranslateModelHandler

    images = [
        {"image_id": f"id{i}", "data": _png((70 * i, 30, 200 - 60 * i)), "captions": []}
        for i in range(3)
    ]
    # Sampled captions: their per-image seeds must survive the trip.
    captioner = CaptionModelHandler(
        CaptionerConfig(
            model=tiny["captioner"],
            prompts=("a photo of", ""),
            num_captions=3,
            sampling=True,
            max_new_tokens=6,
        ),
        seed=4,
        copies=1,
    )
    mine, served = _through_proxy(captioner, images, tmp_path, "max_image_pixels")
    assert served == mine and all(len(r["captions"]) == 3 for r in served)

    clip = ClipModelHandler(ClipConfig(model=tiny["clip"], embed_images=True), copies=1)
    mine, served = _through_proxy(clip, mine, tmp_path, "model_id")
    assert served == mine
    assert all(c["score"] is not None for r in served for c in r["captions"])
    assert all(len(r["embedding"]) > 0 and r["embedding_model"] for r in served)

    translator = TranslateModelHandler(
        TranslationStageConfig(model=tiny["translator"], options={"max_decoding_length": 8}),
        ("pt", "es"),
        copies=1,
    )
    mine, served = _through_proxy(translator, mine, tmp_path, "languages", images=False)
    assert served == mine
    translated = [c for r in served for c in r["captions"] if c["origin"] == "translated"]
    assert len(translated) == 2 * 3 * 3 and all(
        c["translation_score"] is not None for c in translated
    )


# --- the real pipeline, 2 worker processes -----------------------------------------------


@pytest.fixture(scope="module")
def runs(world_dir, world_models, tmp_path_factory) -> dict[int, dict]:
    """The same small world job with each worker process loading its own models (0) and with
    one copy of each shared by both (1)."""
    from babelcap.pipelines.runner import run

    dirs = world_models("captioner", "marian-en-pt", "clip-base")
    root = tmp_path_factory.mktemp("sharing")
    rows = [json.loads(x) for x in (world_dir / "manifest.jsonl").read_text().splitlines()]
    manifest = root / "manifest.jsonl"
    with open(manifest, "w") as f:
        for r in rows[:12]:
            f.write(json.dumps({**r, "image_path": str(world_dir / r["image_path"])}) + "\n")
    out = {}
    for copies in (0, 1):
        config = AugmentConfig(
            input=str(manifest),
            output=str(root / f"out-{copies}"),
            languages=("pt",),
            captioner=CaptionerConfig(
                model=str(dirs["captioner"]), num_captions=3, max_new_tokens=16, batch_size=4
            ),
            translator=TranslationStageConfig(
                model=str(dirs["marian-en-pt"] / "ct2"), batch_size=8
            ),
            clip=ClipConfig(
                model=str(dirs["clip-base"]),
                top_k=2,
                embed_images=True,
                batch_size=8,
                source_filter=False,
            ),
            model_copies=copies,
        )
        out[copies] = {"config": config, "manifest": run(config, workers=2, echo=False)}
    return out


@pytest.mark.slow
def test_shared_models_write_the_same_rows(runs):
    from test_pipeline_e2e import _rows, _same_rows

    own, shared = (_rows(Path(runs[c]["config"].output)) for c in (0, 1))
    assert len(own) == 12
    assert sum(c["origin"] == "translated" for r in own for c in r["captions"]) > 12
    _same_rows(shared, own)
    assert shared[0]["embedding"] == pytest.approx(own[0]["embedding"], abs=1e-5)
    assert runs[1]["manifest"]["stats"] == runs[0]["manifest"]["stats"]
    assert runs[1]["manifest"]["accounting"] == runs[0]["manifest"]["accounting"]
    assert runs[1]["manifest"]["config"]["model_copies"] == 1  # recorded as run


@pytest.mark.slow
def test_shared_models_are_loaded_once_not_once_per_worker(runs):
    """RunInference counts a load wherever `load_model` runs: every worker process without
    sharing (each gets a part of every stage), the one process serving the copy with it."""
    for copies, workers_loads in ((0, 2), (1, 1)):
        metrics = runs[copies]["manifest"]["metrics"]
        for stage in STAGES:
            loads = metrics[f"babelcap.{stage}/load_model_latency_milli_secs"]["count"]
            assert loads == workers_loads, (copies, stage, loads)
            assert metrics[f"babelcap.{stage}/inference_batch_latency_micro_secs"]["count"] >= 1
    # The engine's counters come back through the proxy too.
    assert runs[1]["manifest"]["metrics"]["babelcap/translate.engine.translated"] > 0


@pytest.mark.slow
def test_a_run_differing_only_in_model_copies_is_the_same_run(runs):
    from babelcap.pipelines.runner import published_run, run

    config = runs[0]["config"].updated({"model_copies": 1})
    assert published_run(config) is not None
    again = run(config, workers=1, echo=False)  # nothing refused, nothing recomputed
    assert again["this_run"]["units"] == 0

"""Run the augmentation: check, build, run on a Beam runner, balance the books, publish.

`run(config, beam_args)` is what `babelcap augment` and `beam_runner.py` call. `beam_args` are
ordinary Beam pipeline options and pass through untouched (`--runner DataflowRunner --project
... --region ... --temp_location gs://... --setup_file ./setup.py`). Without `--runner`, the
job runs locally on Beam's portable FnApiRunner (chosen explicitly: DirectRunner would first
try to download the Prism runner), with `direct_running_mode=multi_processing` and
`direct_num_workers=workers` (in_memory for one worker).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from babelcap.core import schema
from babelcap.core.devices import THREADS_ENV
from babelcap.core.shards import DEAD_LETTER_DIR
from babelcap.pipelines import accounting, publish
from babelcap.pipelines.builder import build
from babelcap.pipelines.options import AugmentConfig

log = logging.getLogger(__name__)

LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def pipeline_options(beam_args: Sequence[str] = (), workers: int = 2) -> PipelineOptions:
    """Beam options from `beam_args`; the local multi-process runner when none is named."""
    options = PipelineOptions(list(beam_args))
    std = options.view_as(StandardOptions)
    if not std.runner:
        std.runner = LOCAL_RUNNER
        direct = options.view_as(DirectOptions)
        if not any(a.startswith("--direct_num_workers") for a in beam_args):
            direct.direct_num_workers = max(1, workers)
        if not any(a.startswith("--direct_running_mode") for a in beam_args):
            direct.direct_running_mode = (
                "multi_processing" if direct.direct_num_workers > 1 else "in_memory"
            )
        if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
            # Local worker processes print every INFO line of Beam's harness to the console.
            options.view_as(WorkerOptions).default_sdk_harness_log_level = "WARNING"
    return options


@contextlib.contextmanager
def worker_environment(options: PipelineOptions) -> Iterator[None]:
    """While a local multi-process run lasts, its worker processes (which inherit this
    environment) split the cores between them; the caller's environment is restored after."""
    direct = options.view_as(DirectOptions)
    local = options.view_as(StandardOptions).runner == LOCAL_RUNNER
    if not (local and direct.direct_running_mode == "multi_processing"):
        yield
        return
    before = os.environ.get(THREADS_ENV)
    cores = os.cpu_count() or 1
    os.environ[THREADS_ENV] = str(max(1, cores // max(1, direct.direct_num_workers or 1)))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before


def model_ids(config: AugmentConfig) -> dict[str, Any]:
    models: dict[str, Any] = {}
    if config.captioner:
        models["captioner"] = config.captioner.model
    if config.translator:
        models["translator"] = config.translator.model
        if "://" not in config.translator.model:
            try:
                from babelcap.translators import read_model_info

                models["translator"] = read_model_info(config.translator.model).model_id
            except Exception as exc:  # informative only
                log.debug("no translator model id: %s", exc)
    if config.clip:
        clip = config.clip
        models["clip"] = f"{clip.model}:{clip.pretrained}" if clip.pretrained else clip.model
    return models


def check_config(config: AugmentConfig) -> tuple[str, ...]:
    """Fail fast, before any work: languages, model folders, input. Returns target codes."""
    languages: tuple[str, ...] = ()
    if config.languages:
        from babelcap.pipelines.translation import check_languages

        languages = check_languages(config.translator, config.languages)
    for name, model in (
        ("captioner", config.captioner and config.captioner.model),
        ("translator", config.translator and config.translator.model),
    ):
        local_path = model and "://" not in model and model.startswith((".", "/"))
        if local_path and not Path(model).exists():
            raise FileNotFoundError(f"{name} model {model} does not exist")
    local = "://" not in config.input and not any(c in config.input for c in "*?[{")
    if local and not Path(config.input).exists():
        raise FileNotFoundError(f"input {config.input} does not exist")
    return languages


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "apache-beam",
        "pyarrow",
        "torch",
        "transformers",
        "ctranslate2",
        "open_clip_torch",
        "pillow",
        "lingua-language-detector",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _metrics(result: Any) -> dict[str, Any]:
    """Counters and distributions (RunInference latencies, ...) where the runner reports them."""
    try:
        res = result.metrics().query()
    except Exception:
        return {}
    out: dict[str, Any] = {}
    for c in res.get("counters", []):
        key = f"{c.key.metric.namespace}/{c.key.metric.name}"
        out[key] = out.get(key, 0) + (c.committed or c.attempted or 0)
    for d in res.get("distributions", []):
        key = f"{d.key.metric.namespace}/{d.key.metric.name}"
        val = d.committed or d.attempted
        if val is not None:
            prev = out.get(key, {"sum": 0, "count": 0})
            out[key] = {"sum": prev["sum"] + val.sum, "count": prev["count"] + val.count}
    return dict(sorted(out.items()))


def published_run(config: AugmentConfig) -> dict[str, Any] | None:
    """The manifest of a run of exactly this configuration already published at its output
    (so it need not run again), else None."""
    try:
        manifest = publish.read_manifest(config.output)
    except FileNotFoundError:
        return None
    same = manifest.get("config") == json.loads(json.dumps(config.to_dict()))
    return manifest if same else None


def run(
    config: AugmentConfig, beam_args: Sequence[str] = (), workers: int = 2, echo: bool = True
) -> dict[str, Any]:
    """Run the augmentation; returns the run manifest (also written to OUTPUT)."""
    languages = check_config(config)
    models = model_ids(config)
    output = config.output.rstrip("/")
    if "://" not in output:
        output = str(Path(output).resolve())
        Path(output).mkdir(parents=True, exist_ok=True)
    publish.clean_stale_staging(output)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + (
        "-" + uuid.uuid4().hex[:8]
    )
    staging = FileSystems.join(output, publish.STAGING_DIR, run_id)
    options = pipeline_options(beam_args, workers)
    runner = options.view_as(StandardOptions).runner
    log.info("augment run %s: runner %s, staging %s", run_id, runner, staging)

    start = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config, staging, models, languages)
    with worker_environment(options):
        result = pipeline.run()
        result.wait_until_finish()
    seconds = time.perf_counter() - start

    staged = publish.read_staged(staging)
    stats = staged["stats"]
    publish.ensure_dead_letter_file(staging, config.to_dict())
    dead_dir = FileSystems.join(staging, DEAD_LETTER_DIR)
    dead_counts = publish.count_dead_letters(publish._ls(dead_dir, ".parquet"))
    shard_files = [f for f in staged["files"] if f"/{DEAD_LETTER_DIR}/" not in f["path"]]
    rows = sum(f["rows"] for f in shard_files)
    duplicates = sum(v for k, v in dead_counts.items() if k.endswith("/duplicate_image"))
    books = accounting.balance(stats, rows, sum(dead_counts.values()), duplicates)

    manifest = {
        "run_id": run_id,
        "schema_version": schema.SCHEMA_VERSION,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "seconds": round(seconds, 2),
        "runner": str(runner),
        "workers": workers,
        "config": config.to_dict(),
        "languages": list(languages),
        "models": models,
        "versions": _versions(),
        "accounting": books,
        "dead_letters": dead_counts,
        "caption_drops": accounting.caption_drops(stats),
        "stats": stats,
        "metrics": _metrics(result),
        "shards": [
            {"path": FileSystems.split(f["path"])[1], "rows": f["rows"], "bytes": f["bytes"]}
            for f in sorted(shard_files, key=lambda f: f["path"])
        ],
    }
    publish.publish(staging, output, manifest)
    if echo:
        print(accounting.format_summary(stats, books))
        print(f"wrote {rows} rows in {len(shard_files)} shards to {output} in {seconds:.1f}s")
    return manifest

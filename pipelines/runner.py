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
import hashlib
import io
import json
import logging
import os
import platform
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
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
from tqdm import tqdm

from babelcap.core import schema
from babelcap.core.devices import THREADS_ENV, available_cores
from babelcap.core.shards import DATA_DIR, STAGING_DIR, committed_units
from babelcap.pipelines import accounting, card, publish, units
from babelcap.pipelines.builder import build
from babelcap.pipelines.options import AugmentConfig
from babelcap.pipelines.sinks import DEAD_LETTER_FILE, unit_folder

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


def one_process(options: PipelineOptions) -> bool:
    """Whether the local runner runs every worker in this process (one worker, or a
    running mode other than multi_processing)."""
    local = options.view_as(StandardOptions).runner in (LOCAL_RUNNER, "DirectRunner")
    mode = options.view_as(DirectOptions).direct_running_mode
    return local and mode != "multi_processing"


def for_runner(config: AugmentConfig, options: PipelineOptions) -> AugmentConfig:
    """`config` as the pipelines run it on this runner: where every worker runs in this process,
    there is nothing to share a model with, and a shared copy would be served from this process
    through a proxy and outlive the run (Beam never releases it), so `model_copies` is 0."""
    if config.model_copies and one_process(options):
        log.info("model_copies %d ignored: every worker runs in this process", config.model_copies)
        return config.updated({"model_copies": 0})
    return config


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
    cores = available_cores()
    os.environ[THREADS_ENV] = str(max(1, cores // max(1, direct.direct_num_workers or 1)))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = before


def model_ids(config: AugmentConfig) -> dict[str, Any]:
    """The models of the run as they are written into the output (shard metadata, manifest,
    card): Hub ids and URIs as given, a local folder by its name (`schema.portable`), a
    translator by its content id."""
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
        clip = schema.portable({"model": config.clip.model, "pretrained": config.clip.pretrained})
        models["clip"] = (
            f"{clip['model']}:{clip['pretrained']}" if clip["pretrained"] else clip["model"]
        )
    return schema.portable(models)


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
    """The manifest of a run of exactly this configuration already complete at its output
    (so it need not run again), else None."""
    try:
        manifest = publish.read_manifest(config.output)
    except FileNotFoundError:
        return None
    # The manifest's `config` is the portable one (no local folders): the full configuration
    # is compared through its fingerprint.
    same = manifest.get("config_fingerprint") == config_fingerprint(config)
    return manifest if same and manifest.get("complete", True) else None


def config_fingerprint(config: AugmentConfig) -> str:
    """A hash of the full configuration (local paths included), which the manifest records in
    place of those paths; settings of the run's resources only (`units.RESOURCE_KEYS`:
    `model_copies`) are left out, so a run that differs in nothing else is the same run."""
    data = {k: v for k, v in config.to_dict().items() if k not in units.RESOURCE_KEYS}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigMismatchError(ValueError):
    """The output holds rows made with another configuration."""


def _fs(output: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in output:
        return pafs.FileSystem.from_uri(output)
    return pafs.LocalFileSystem(), output


def _read_parquet(path: str, columns: list[str] | None) -> Any:
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_table(io.BytesIO(f.read()), columns=columns)


def _unit_contents(folder: str, files: list[dict[str, Any]]) -> tuple[set[str], dict, dict]:
    """(image ids, rows per split, captions per "language/origin") of a unit's data files."""
    import pyarrow.compute as pc

    ids: set[str] = set()
    splits: dict[str, int] = {}
    captions: dict[str, int] = {}
    for f in files:
        if f["kind"] != "shard":
            continue
        table = _read_parquet(FileSystems.join(folder, f["name"]), ["image_id", "captions"])
        ids.update(table["image_id"].to_pylist())
        splits[f["split"]] = splits.get(f["split"], 0) + table.num_rows
        caps = pc.list_flatten(table["captions"])
        if len(caps):
            keys = pc.binary_join_element_wise(
                pc.struct_field(caps, "language"), pc.struct_field(caps, "origin"), "/"
            )
            for item in pc.value_counts(keys).to_pylist():
                captions[item["values"]] = captions.get(item["values"], 0) + item["counts"]
    return ids, splits, captions


def _sum(dicts: list[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _stage_seconds(metrics: Mapping[str, Any], share: int) -> dict[str, float]:
    """Model time per stage (RunInference batch latencies and loads, summed over workers),
    split evenly over the `share` units of a wave."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        ns, _, name = key.partition("/")
        if not ns.startswith("babelcap.") or not isinstance(value, dict):
            continue
        scale = {"inference_batch_latency_micro_secs": 1e6, "load_model_latency_milli_secs": 1e3}
        if name in scale:
            stage = ns.split(".", 1)[1]
            out[stage] = round(out.get(stage, 0.0) + value["sum"] / scale[name] / share, 3)
    return dict(sorted(out.items()))


def _merge_metrics(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = {"sum": out[k]["sum"] + v["sum"], "count": out[k]["count"] + v["count"]}
        else:
            out[k] = out[k] + v
    return dict(sorted(out.items()))


def _translators(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Target language -> the translator models its committed translations came from (one,
    unless a retranslation was interrupted), portable (a local folder by its name)."""
    out: dict[str, set[str]] = {}
    for r in records:
        for lang, translator in units.translators_of(r).items():
            if translator:
                out.setdefault(lang, set()).add(schema.portable(translator["model"]))
    return {lang: sorted(models) for lang, models in sorted(out.items())}


def build_manifest(
    config: AugmentConfig,
    records: list[dict[str, Any]],
    complete: bool,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The dataset manifest: the run's facts (`extra`) and everything merged over the committed
    units' records. It is published with the data, so its configuration, models and
    translators are portable (`schema.portable`); the full configuration is compared through
    `config_fingerprint` (and the unit records under `_units/` keep it whole)."""
    records = sorted(records, key=lambda r: r["unit"])
    if "models" in extra:
        extra = {**extra, "models": schema.portable(extra["models"])}
    stats = _sum([r["stats"] for r in records])
    captions = _sum([r.get("captions", {}) for r in records])
    per_language: dict[str, int] = {}
    for key, n in captions.items():
        lang = key.split("/", 1)[0]
        per_language[lang] = per_language.get(lang, 0) + n
    return {
        **extra,
        "schema_version": schema.SCHEMA_VERSION,
        "config": schema.portable(config.to_dict()),
        "config_fingerprint": config_fingerprint(config),
        "complete": complete,
        "accounting": accounting.merge_books(r["accounting"] for r in records),
        "dead_letters": _sum([r["dead_letters"] for r in records]),
        "caption_drops": accounting.caption_drops(stats),
        "stats": stats,
        "splits": _sum([r.get("splits", {}) for r in records]),
        "captions": captions,
        "captions_per_language": dict(sorted(per_language.items())),
        "translators": _translators(records),
        "units": [
            {
                "unit": r["unit"],
                "run_id": r["run_id"],
                "inputs": r["accounting"]["inputs"],
                "rows": r["accounting"]["rows_written"],
                "dead_lettered": r["accounting"]["dead_lettered"],
            }
            for r in records
        ],
        "files": [f for r in records for f in r["files"]],
    }


def run(
    config: AugmentConfig, beam_args: Sequence[str] = (), workers: int = 2, echo: bool = True
) -> dict[str, Any]:
    """Compute the output's uncommitted work units (all of them on a first run), committing
    each wave's units as it ends; returns the dataset manifest (also written to OUTPUT)."""
    languages = check_config(config)
    models = model_ids(config)
    output = publish.check_output(config.output, config.input)
    if "://" not in output:
        Path(output).mkdir(parents=True, exist_ok=True)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + (
        "-" + uuid.uuid4().hex[:8]
    )
    with publish.OutputLock(output, run_id):
        publish.clean_stale_staging(output, keep=run_id)
        try:
            return _run_locked(config, output, run_id, languages, models, beam_args, workers, echo)
        finally:
            staging_root = FileSystems.join(output, STAGING_DIR, run_id)
            if FileSystems.exists(staging_root):  # a failed run's staging stays for a look
                log.info("staging of this run left at %s", staging_root)


def _run_locked(
    config: AugmentConfig,
    output: str,
    run_id: str,
    languages: tuple[str, ...],
    models: dict[str, Any],
    beam_args: Sequence[str],
    workers: int,
    echo: bool,
) -> dict[str, Any]:
    fs, root = _fs(output)
    old_records = committed_units(root, fs)
    publish.remove_unreferenced(output, old_records)
    # Only committed units hold rows to be compatible with (an output of the layout before
    # units keeps its files, which readers no longer take once units are committed).
    old_configs = [r["config"] for r in old_records]
    new_config = config.to_dict()
    diffs = sorted({d for old in old_configs for d in _differences(old, new_config)})
    # The translator is compared per language: a language whose translations came from another
    # translator is fine when it is translated again (--retranslate), and only then.
    stale = units.stale_translations(old_records, new_config) if new_config["translator"] else {}
    diffs = [d for d in diffs if not d.startswith("translator.")]
    if diffs and not config.overwrite:
        _refuse(output, [f"{', '.join(diffs)} differ"])
    replace = bool(diffs)

    inputs = units.list_inputs(config)
    if not inputs:
        raise publish.PublishGuardError(
            f"no inputs found at {config.input}: nothing committed (the output is left as it is)"
        )
    current = set(inputs)

    def planned(replace: bool) -> tuple[units.Plan, bool, dict[int, dict[str, Any]], list[int]]:
        """The plan, whether it is already on disk, the committed units kept, the units needed."""
        old_plan = None if replace else units.read_plan(output)
        plan = units.extend_plan(old_plan, inputs, config.unit_size)
        committed = {} if replace else {r["unit"]: r for r in old_records}
        needed = [u for u in range(len(plan.units)) if current & set(plan.units[u])]
        return plan, plan == old_plan, committed, needed

    plan, plan_written, committed, needed = planned(replace)
    pending = [u for u in needed if u not in committed]
    # The translator is compared per language. A language retranslated (--retranslate) takes
    # this translator; one not named keeps its translations (recorded with their translator)
    # as long as this run writes no new rows, which would mix two translators in it.
    unasked = {lang: keys for lang, keys in stale.items() if lang not in config.retranslate}
    if unasked and not replace and (not config.retranslate or pending):
        if not config.overwrite:
            why = f" and {len(pending)} new units would get this translator's" if pending else ""
            _refuse(
                output,
                [f"{', '.join(keys)} differ for {lang}" for lang, keys in unasked.items()],
                f" The committed {', '.join(unasked)} translations come from another "
                f"translator{why}. To translate them again with this one and keep everything "
                f"else, pass --retranslate {','.join(unasked)}.",
            )
        replace = True
        plan, plan_written, committed, needed = planned(replace)
        pending = needed
    # Units made with fewer target languages get the missing ones added, and languages made
    # with another translator are translated again when asked (translation only).
    missing = {} if replace else _languages_to_translate(old_records, config)
    present: set[str] = set()
    for record in committed.values():
        for f in record["files"]:
            if f["kind"] == "shard":
                present.update(
                    _read_parquet(FileSystems.join(output, f["path"]), ["image_id"])[
                        "image_id"
                    ].to_pylist()
                )

    staging = FileSystems.join(output, STAGING_DIR, run_id)
    options = pipeline_options(beam_args, workers)
    config = for_runner(config, options)
    runner = options.view_as(StandardOptions).runner
    metrics: dict[str, Any] = {}
    this_run: list[dict[str, Any]] = []
    if missing:
        this_run, metrics = _add_languages(
            config, output, staging, models, missing, committed, options, echo
        )
        _write_outputs(output, config, root, fs, needed, extra=None)
    if config.retry_failed and not replace:
        retried, retry_metrics = _retry_failed(
            config, output, staging, models, languages, committed, present, options, echo
        )
        this_run += retried
        metrics = _merge_metrics(metrics, retry_metrics)
        _write_outputs(output, config, root, fs, needed, extra=None)
    log.info(
        "augment run %s: %d of %d units to compute, runner %s, staging %s",
        run_id,
        len(pending),
        len(plan.units),
        runner,
        staging,
    )
    start = time.perf_counter()
    deferred: list[tuple[str, str, dict[str, Any]]] = []
    progress = tqdm(
        total=len(pending), unit="unit", desc="augment", disable=not echo or not pending
    )
    try:
        for wave in units.waves(pending, config.units_per_wave):
            wave_start = time.perf_counter()
            unit_of = {ref: u for ref, u in plan.unit_of(wave).items() if ref in current}
            pipeline = beam.Pipeline(options=options)
            build(pipeline, config, staging, models, languages, unit_of, frozenset(present))
            with worker_environment(options):
                result = pipeline.run()
                result.wait_until_finish()
            wave_metrics = _metrics(result)
            metrics = _merge_metrics(metrics, wave_metrics)
            wave_seconds = time.perf_counter() - wave_start
            per_stage = _stage_seconds(wave_metrics, len(wave))
            wave_records = []
            for u in wave:
                folder = unit_folder(staging, u)
                staged = publish.read_staged_unit(folder)
                dead_files = [
                    FileSystems.join(folder, f["name"])
                    for f in staged["files"]
                    if f["kind"] == "dead_letter"
                ]
                dead_counts = publish.count_dead_letters(dead_files)
                rows = sum(f["rows"] for f in staged["files"] if f["kind"] == "shard")
                books = accounting.balance(
                    staged["stats"],
                    rows,
                    sum(dead_counts.values()),
                    accounting.duplicates_in(dead_counts),
                    # against the unit's plan too, not only what the pipeline counted
                    planned=sum(1 for x in unit_of.values() if x == u),
                )
                ids, splits, captions = _unit_contents(
                    FileSystems.join(folder, DATA_DIR), staged["files"]
                )
                present |= ids
                wave_records.append(
                    {
                        "unit": u,
                        "run_id": run_id,
                        "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "seconds": round(wave_seconds / len(wave), 3),
                        "stage_seconds": per_stage,
                        "config": config.to_dict(),
                        "translators": dict.fromkeys(languages, config.to_dict()["translator"]),
                        "accounting": books,
                        "dead_letters": dead_counts,
                        "splits": splits,
                        "captions": captions,
                        "stats": staged["stats"],
                        "files": staged["files"],
                    }
                )
            _guard(config, this_run + wave_records)
            for record in wave_records:
                name = units.unit_name(record["unit"])
                folder = unit_folder(staging, record["unit"])
                if replace:
                    deferred.append((folder, name, record))
                    continue
                if not plan_written:  # first commit of this run: the plan it follows first
                    units.write_plan(output, plan)
                    plan_written = True
                publish.commit_unit(output, folder, name, record)
            this_run += wave_records
            progress.update(len(wave))
            if not replace:
                _write_outputs(output, config, root, fs, needed, extra=None)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    if replace:  # the whole new run passed: now, and only now, the old units go
        for record in old_records:
            name = units.unit_name(record["unit"])
            publish.remove_unit_files(output, name, record)
            FileSystems.delete([publish.unit_record_path(output, name)])
        for folder, name, record in deferred:
            publish.commit_unit(output, folder, name, record)
        units.write_plan(output, plan)
    if FileSystems.exists(staging):
        FileSystems.delete([publish._as_dir(staging)])
    if "://" not in output:
        with contextlib.suppress(OSError):  # only when no other run's staging is left
            os.rmdir(os.path.join(output, STAGING_DIR))
    extra = {
        "run_id": run_id,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "seconds": round(seconds, 2),
        "runner": str(runner),
        "workers": workers,
        "languages": list(languages),
        "models": models,
        "versions": _versions(),
        "metrics": metrics,
        "this_run": {
            "units": len(this_run),
            "accounting": accounting.merge_books(r["accounting"] for r in this_run),
        },
    }
    manifest = _write_outputs(output, config, root, fs, needed, extra=extra)
    if echo:
        books = manifest["accounting"]
        print(accounting.format_summary(manifest["stats"], books))
        print(
            f"{len(this_run)} units computed ({len(plan.units)} in the dataset); "
            f"{books['rows_written']} rows in {output} in {seconds:.1f}s"
        )
    return manifest


def _refuse(output: str, reasons: list[str], hint: str = "") -> None:
    raise ConfigMismatchError(
        f"{output} was made with another configuration ({'; '.join(reasons)}): its rows and "
        f"this run's would not match.{hint} Write to a new output, or pass --overwrite to "
        "replace it (swapped in only when the new run succeeds)"
    )


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys that make rows incompatible; more target languages than before is not one (the
    missing ones are added)."""
    diffs = units.config_differences(old, new)
    if "languages" in diffs and set(old.get("languages") or ()) <= set(new.get("languages") or ()):
        diffs.remove("languages")
    return diffs


def _languages_to_translate(
    records: list[dict[str, Any]], config: AugmentConfig
) -> dict[tuple[str, ...], list[int]]:
    """(languages to translate) -> committed units that need exactly those: the target
    languages they lack, and those asked for again (--retranslate) whose translations in that
    unit came from another translator (a unit already redone by an interrupted run is not
    redone)."""
    new = config.to_dict()["translator"]
    out: dict[tuple[str, ...], list[int]] = {}
    for r in records:
        have = units.translators_of(r)
        todo = tuple(
            lang
            for lang in config.languages
            if lang not in have
            or (
                bool(new)
                and lang in config.retranslate
                and units.translator_differences(have[lang], new)
            )
        )
        if todo and any(f["kind"] == "shard" for f in r["files"]):
            out.setdefault(todo, []).append(r["unit"])
    return out


def _version_name(unit: int, files: list[dict[str, Any]]) -> str:
    """The next data folder of a committed unit: unit-N-v1, unit-N-v2, ..."""
    versions = [0]
    for f in files:
        part = f["path"].split("/")[1].removesuffix(".parquet")
        if "-v" in part:
            versions.append(int(part.rsplit("-v", 1)[1]))
    return f"{units.unit_name(unit)}-v{max(versions) + 1}"


def _add_languages(
    config: AugmentConfig,
    output: str,
    staging: str,
    models: dict[str, Any],
    missing: dict[tuple[str, ...], list[int]],
    committed: dict[int, dict[str, Any]],
    options: PipelineOptions,
    echo: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Translate committed units into the languages they lack, wave by wave, committing each
    unit's new version; no captioning, no CLIP. Returns (new records, metrics)."""
    from babelcap.pipelines.add_language import build_add_languages, row_ref

    done: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    translator = config.to_dict()["translator"]
    total = sum(len(v) for v in missing.values())
    progress = tqdm(total=total, unit="unit", desc="add languages", disable=not echo)
    try:
        for languages, unit_list in sorted(missing.items()):
            for wave in units.waves(sorted(unit_list), config.units_per_translation_wave):
                wave_start = time.perf_counter()
                files, unit_of = [], {}
                for u in wave:
                    for f in committed[u]["files"]:
                        if f["kind"] == "shard":
                            path = FileSystems.join(output, f["path"])
                            files.append((u, path))
                            for image_id in _read_parquet(path, ["image_id"])[
                                "image_id"
                            ].to_pylist():
                                unit_of[row_ref(u, image_id)] = u
                pipeline = beam.Pipeline(options=options)
                build_add_languages(pipeline, config, staging, models, languages, files, unit_of)
                with worker_environment(options):
                    result = pipeline.run()
                    result.wait_until_finish()
                metrics = _merge_metrics(metrics, _metrics(result))
                seconds = time.perf_counter() - wave_start
                for u in wave:
                    old = committed[u]
                    folder = unit_folder(staging, u)
                    staged = publish.read_staged_unit(folder)
                    rows = sum(f["rows"] for f in staged["files"] if f["kind"] == "shard")
                    if rows != old["accounting"]["rows_written"]:
                        raise accounting.AccountingError(
                            f"unit {u}: {rows} rows after adding {languages}, "
                            f"{old['accounting']['rows_written']} before"
                        )
                    _, splits, captions = _unit_contents(
                        FileSystems.join(folder, DATA_DIR), staged["files"]
                    )
                    had = units.translators_of(old)
                    record = {
                        **old,
                        "run_id": staged.get("run_id", old["run_id"]),
                        "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "config": config.to_dict(),
                        "translators": {**had, **dict.fromkeys(languages, translator)},
                        "languages_added": [lang for lang in languages if lang not in had],
                        "languages_retranslated": [lang for lang in languages if lang in had],
                        "seconds_add_languages": round(seconds / len(wave), 3),
                        "splits": splits,
                        "captions": captions,
                        "stats": _sum([old["stats"], staged["stats"]]),
                        "files": [f for f in staged["files"] if f["kind"] == "shard"],
                    }
                    keep = [f for f in old["files"] if f["kind"] != "shard"]
                    name = units.unit_name(u)
                    publish.commit_unit(
                        output, folder, name, record, _version_name(u, old["files"]), keep
                    )
                    old_data = [
                        FileSystems.join(output, f["path"])
                        for f in old["files"]
                        if f["kind"] == "shard"
                    ]
                    FileSystems.delete([p for p in old_data if FileSystems.exists(p)])
                    if "://" not in output:
                        with contextlib.suppress(OSError, IndexError):
                            os.rmdir(os.path.dirname(old_data[0]))
                    committed[u] = publish.read_json_file(publish.unit_record_path(output, name))
                    done.append(committed[u])
                progress.update(len(wave))
    finally:
        progress.close()
    return done, metrics


# A model's failed batch (out of memory, a worker lost mid-batch) may pass on another run.
MODEL_FAILURE_KINDS = frozenset({"caption_failed", "clip_failed", "translate_failed"})


def retryable(kind: str) -> bool:
    """Dead letters `--retry-failed` reprocesses: the readers' transient kinds and model
    failures; every other kind is permanent (the same input fails the same way)."""
    from babelcap.pipelines.deadletter import is_transient

    return is_transient(kind) or kind in MODEL_FAILURE_KINDS


def _transient_refs(output: str, record: Mapping[str, Any]) -> set[str]:
    """Input references of a committed unit's dead letters of retryable kinds."""

    refs: set[str] = set()
    for f in record["files"]:
        if f["kind"] == "dead_letter":
            table = _read_parquet(FileSystems.join(output, f["path"]), ["input_ref", "error_kind"])
            for ref, kind in zip(
                table["input_ref"].to_pylist(), table["error_kind"].to_pylist(), strict=True
            ):
                if retryable(kind):
                    refs.add(ref)
    return refs


def _retry_failed(
    config: AugmentConfig,
    output: str,
    staging: str,
    models: dict[str, Any],
    languages: tuple[str, ...],
    committed: dict[int, dict[str, Any]],
    present: set[str],
    options: PipelineOptions,
    echo: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Reprocess only the committed inputs dead-lettered with transient kinds; each unit with
    any is committed again as a new version: its other rows and dead letters as they were,
    the retried inputs' new rows or dead letters in place of the old ones."""
    from babelcap.core.shards import write_shard
    from babelcap.pipelines.sinks import split_name, write_split

    retry = {u: refs for u, r in committed.items() if (refs := _transient_refs(output, r))}
    done: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    progress = tqdm(total=len(retry), unit="unit", desc="retry failed", disable=not echo)
    try:
        for wave in units.waves(sorted(retry), config.units_per_wave):
            unit_of = {ref: u for u in wave for ref in retry[u]}
            pipeline = beam.Pipeline(options=options)
            build(pipeline, config, staging, models, languages, unit_of, frozenset(present))
            with worker_environment(options):
                result = pipeline.run()
                result.wait_until_finish()
            metrics = _merge_metrics(metrics, _metrics(result))
            for u in wave:
                old = committed[u]
                folder = unit_folder(staging, u)
                staged = publish.read_staged_unit(folder)
                rows: dict[str, list[dict]] = {}
                for f in old["files"] + [
                    {**f, "path": None} for f in staged["files"] if f["kind"] == "shard"
                ]:
                    if f["kind"] != "shard":
                        continue
                    path = (
                        FileSystems.join(output, f["path"])
                        if f["path"]
                        else FileSystems.join(folder, DATA_DIR, f["name"])
                    )
                    for row in _read_parquet(path, None).to_pylist():
                        rows.setdefault(split_name(row["split"]), []).append(row)
                dead_rows = [
                    d
                    for f in old["files"]
                    if f["kind"] == "dead_letter"
                    for d in _read_parquet(FileSystems.join(output, f["path"]), None).to_pylist()
                    if d["input_ref"] not in retry[u]
                ]
                for f in staged["files"]:
                    if f["kind"] == "dead_letter":
                        dead_rows += _read_parquet(
                            FileSystems.join(folder, f["name"]), None
                        ).to_pylist()
                merged = FileSystems.join(staging, f"{units.unit_name(u)}-retried")
                files = []
                for split, split_rows in sorted(rows.items()):
                    files += write_split(
                        FileSystems.join(merged, DATA_DIR),
                        split,
                        split_rows,
                        schema.shard_schema(config.to_dict(), models),
                        config.num_shards,
                        config.rows_per_shard,
                    )
                if dead_rows:
                    buf = io.BytesIO()
                    dead_rows.sort(key=lambda r: (r["input_ref"], r["stage"], r["error_kind"]))
                    write_shard(
                        buf, dead_rows, kind=schema.KIND_DEAD_LETTER, config=config.to_dict()
                    )
                    path = FileSystems.join(merged, DEAD_LETTER_FILE)
                    with FileSystems.create(path) as fh:
                        fh.write(buf.getvalue())
                    files.append(
                        {
                            "name": DEAD_LETTER_FILE,
                            "kind": "dead_letter",
                            "rows": len(dead_rows),
                            "bytes": len(buf.getvalue()),
                        }
                    )
                dead_counts: dict[str, int] = {}
                for d in dead_rows:
                    key = f"{d['stage']}/{d['error_kind']}"
                    dead_counts[key] = dead_counts.get(key, 0) + 1
                n_rows = sum(len(v) for v in rows.values())
                books = accounting.balance(
                    {accounting.INPUTS: old["accounting"]["inputs"]},
                    n_rows,
                    len(dead_rows),
                    accounting.duplicates_in(dead_counts),
                )
                ids, splits, captions = _unit_contents(FileSystems.join(merged, DATA_DIR), files)
                present |= ids
                retried = {f"retry.{k}": v for k, v in staged["stats"].items()}
                record = {
                    **old,
                    "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "retried": len(retry[u]),
                    "accounting": books,
                    "dead_letters": dict(sorted(dead_counts.items())),
                    "splits": splits,
                    "captions": captions,
                    "stats": _sum([old["stats"], retried]),
                    "files": files,
                }
                name = units.unit_name(u)
                version = _version_name(u, old["files"])
                publish.commit_unit(
                    output, merged, name, record, data_name=version, dead_name=version
                )
                new = publish.read_json_file(publish.unit_record_path(output, name))
                stale = {f["path"] for f in old["files"]} - {f["path"] for f in new["files"]}
                paths = [FileSystems.join(output, p) for p in sorted(stale)]
                FileSystems.delete([p for p in paths if FileSystems.exists(p)])
                if "://" not in output:
                    for p in paths:
                        with contextlib.suppress(OSError):
                            os.rmdir(os.path.dirname(p))
                committed[u] = new
                done.append(new)
            progress.update(len(wave))
    finally:
        progress.close()
    return done, metrics


def _guard(config: AugmentConfig, records: list[dict[str, Any]]) -> None:
    """Fail before committing when the run so far is empty or mostly dead letters."""
    books = accounting.merge_books(r["accounting"] for r in records)
    if books["inputs"] == 0:
        raise publish.PublishGuardError("the run read zero inputs: nothing committed")
    share = books["dead_lettered"] / books["inputs"]
    if share > config.max_dead_letter_share:
        raise publish.PublishGuardError(
            f"{books['dead_lettered']} of {books['inputs']} inputs dead-lettered ({share:.0%} > "
            f"max_dead_letter_share {config.max_dead_letter_share:.0%}; rows "
            f"{books['rows_written']}): nothing of this wave committed, the output is left as "
            "it was. See the dead letters under _staging/, or raise --max-dead-letter-share"
        )


def _write_outputs(
    output: str,
    config: AugmentConfig,
    root: str,
    fs: Any,
    needed: list[int],
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    records = committed_units(root, fs)
    if extra is None:  # mid-run: keep the last run's facts, refresh the merged figures
        try:
            previous = publish.read_manifest(output)
        except FileNotFoundError:
            previous = {}
        keys = ("run_id", "finished_at", "seconds", "runner", "workers", "languages", "models")
        extra = {k: previous[k] for k in keys if k in previous}
    done = {r["unit"] for r in records}
    complete = all(u in done for u in needed)
    manifest = build_manifest(config, records, complete, extra)
    publish.write_manifest(output, manifest, card.render(manifest))
    return manifest

"""Summarise babelcap shards and dead-letter files without loading them into memory.

Reads footers for metadata and row counts, then streams only the columns it needs in
record batches, so a folder of any size is summarised in bounded memory. Rows are counted per
split; the run manifest of an augment output (found at or above the path) adds the run's
caption drops. Every value read from a file is printed escaped (`printable`, `cell`): control
characters never reach the terminal and a `|` or newline cannot break the Markdown tables.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from babelcap.core import schema
from babelcap.core.shards import RUN_MANIFEST, find_shards
from babelcap.pipelines.display import cell, printable
from babelcap.pipelines.translation_report import format_translation_report, translation_report

_RESERVOIR = 10_000  # caption lengths kept for percentiles
_MANIFEST_BYTES = 50_000_000  # a run manifest larger than this is not read
_CAPTIONS_SHOWN = 8  # captions printed per sample row


@dataclass
class LengthStats:
    count: int = 0
    total: int = 0
    min: int | None = None
    max: int | None = None
    _sample: list[int] = field(default_factory=list, repr=False)
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def add(self, lengths: Iterable[int]) -> None:
        for n in lengths:
            self.count += 1
            self.total += n
            self.min = n if self.min is None else min(self.min, n)
            self.max = n if self.max is None else max(self.max, n)
            # Reservoir sampling keeps percentiles cheap on any number of captions.
            if len(self._sample) < _RESERVOIR:
                self._sample.append(n)
            else:
                j = self._rng.randrange(self.count)
                if j < _RESERVOIR:
                    self._sample[j] = n

    def summary(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0}
        ordered = sorted(self._sample)

        def pct(p: float) -> int:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

        return {
            "count": self.count,
            "mean": round(self.total / self.count, 2),
            "min": self.min,
            "p50": pct(0.5),
            "p95": pct(0.95),
            "max": self.max,
        }


@dataclass
class Report:
    files: list[dict[str, Any]] = field(default_factory=list)
    shard_rows: int = 0
    dead_letter_rows: int = 0
    captions: int = 0
    by_split: Counter = field(default_factory=Counter)  # rows per split (None: no split)
    by_language: Counter = field(default_factory=Counter)
    by_origin: Counter = field(default_factory=Counter)
    by_language_origin: Counter = field(default_factory=Counter)
    with_embedding: int = 0
    caption_chars: LengthStats = field(default_factory=LengthStats)
    dead_letters: Counter = field(default_factory=Counter)  # (stage, error_kind) -> rows
    samples: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # from run manifests
    caption_drops: Counter = field(default_factory=Counter)  # the runs' dropped captions

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["by_split"] = {
            ("(none)" if k is None else k): n
            for k, n in sorted(self.by_split.items(), key=lambda kv: str(kv[0]))
        }
        out["by_language"] = dict(sorted(self.by_language.items()))
        out["by_origin"] = dict(sorted(self.by_origin.items()))
        out["by_language_origin"] = {
            f"{lang}/{origin}": n for (lang, origin), n in sorted(self.by_language_origin.items())
        }
        out["caption_chars"] = self.caption_chars.summary()
        out["dead_letters"] = [
            {"stage": stage, "error_kind": kind, "rows": n}
            for (stage, kind), n in sorted(self.dead_letters.items())
        ]
        out["caption_drops"] = dict(sorted(self.caption_drops.items()))
        return out


def _open(found: Any, path: str) -> Any:
    return found.fs.open_input_file(path) if found.filesystem is not None else path


def _scan_shard(source: Any, report: Report, n_samples: int, batch_size: int) -> None:
    pf = pq.ParquetFile(source)
    columns = ["image_id", "source_uri", "split", "captions", "embedding"]
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        report.shard_rows += batch.num_rows
        report.by_split.update(batch.column("split").to_pylist())
        report.with_embedding += batch.num_rows - batch.column("embedding").null_count
        caps = pc.list_flatten(batch.column("captions"))
        if len(caps):
            langs = caps.field("language").to_pylist()
            origins = caps.field("origin").to_pylist()
            report.captions += len(caps)
            report.by_language.update(langs)
            report.by_origin.update(origins)
            report.by_language_origin.update(zip(langs, origins, strict=True))
            report.caption_chars.add(pc.utf8_length(caps.field("text")).to_pylist())
        if len(report.samples) < n_samples:
            for row in batch.slice(0, n_samples - len(report.samples)).to_pylist():
                report.samples.append(
                    {
                        "image_id": row["image_id"],
                        "source_uri": row["source_uri"],
                        "split": row["split"],
                        "captions": [
                            {k: c[k] for k in ("language", "origin", "text", "score")}
                            for c in row["captions"]
                        ],
                    }
                )


def _scan_dead_letter(source: Any, report: Report, batch_size: int) -> None:
    pf = pq.ParquetFile(source)
    for batch in pf.iter_batches(batch_size=batch_size, columns=["stage", "error_kind"]):
        report.dead_letter_rows += batch.num_rows
        report.dead_letters.update(
            zip(
                batch.column("stage").to_pylist(),
                batch.column("error_kind").to_pylist(),
                strict=True,
            )
        )


def _manifests(path_or_glob: str, files: tuple[str, ...]) -> list[str]:
    """Run manifests of the augment outputs the files belong to: the first folder at or above
    each file (up to the path asked about, at most three levels up) that holds one."""
    if "://" in path_or_glob and not path_or_glob.startswith("file://"):
        return []
    found: list[str] = []
    for file in files:
        folder = os.path.dirname(os.path.abspath(file))
        for _ in range(4):
            candidate = os.path.join(folder, RUN_MANIFEST)
            if os.path.isfile(candidate):
                if candidate not in found:
                    found.append(candidate)
                break
            folder = os.path.dirname(folder)
    return found


def _read_manifest(path: str, report: Report) -> None:
    if os.path.getsize(path) > _MANIFEST_BYTES:
        report.runs.append({"manifest": path, "error": "too large to read"})
        return
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(_MANIFEST_BYTES))
    except ValueError as exc:
        report.runs.append({"manifest": path, "error": f"not JSON: {exc}"})
        return
    if not isinstance(data, dict):
        report.runs.append({"manifest": path, "error": "not a JSON object"})
        return
    drops = data.get("caption_drops")
    if isinstance(drops, dict):
        report.caption_drops.update(
            {str(k): int(v) for k, v in drops.items() if isinstance(v, int) and v > 0}
        )
    units = data.get("units") if isinstance(data.get("units"), list) else []
    report.runs.append(
        {
            "manifest": path,
            "run_id": data.get("run_id"),
            "finished_at": data.get("finished_at"),
            "accounting": data.get("accounting"),
            "complete": data.get("complete"),
            # Per committed work unit: inputs, rows, dead letters (issue 14's visibility).
            "units": [u for u in units if isinstance(u, dict)],
            # Target language -> translator models (more than one: a retranslation unfinished).
            "translators": data.get("translators")
            if isinstance(data.get("translators"), dict)
            else {},
        }
    )


def inspect_paths(path_or_glob: str, n_samples: int = 3, batch_size: int = 4096) -> dict[str, Any]:
    """Summarise every babelcap Parquet file under `path_or_glob` (shards and dead letters)
    and the run manifests of the outputs they belong to."""
    report = Report()
    found = find_shards(path_or_glob, kind=None)
    for path, info in zip(found.files, found.infos, strict=True):
        report.files.append(
            {
                "path": path,
                "kind": info.kind,
                "rows": info.num_rows,
                "schema_version": info.schema_version,
            }
        )
        if info.kind == schema.KIND_SHARD:
            # Metadata is per run; keep the first seen (they are identical within a run).
            report.metadata.setdefault("schema_version", info.schema_version)
            report.metadata.setdefault("config", info.config)
            report.metadata.setdefault("models", info.models)
            _scan_shard(_open(found, path), report, n_samples, batch_size)
        else:
            _scan_dead_letter(_open(found, path), report, batch_size)
    for manifest in _manifests(str(path_or_glob), found.files):
        _read_manifest(manifest, report)
    out = report.to_dict()
    out["translation_scores"] = translation_report(path_or_glob, lowest=5)
    return out


def format_report(data: dict[str, Any]) -> str:
    """Render an `inspect_paths` result as plain text with Markdown tables; every value read
    from a file goes through `cell` (tables) or `printable` (text)."""
    kinds = Counter(f["kind"] for f in data["files"])
    lines = [
        f"files: {len(data['files'])} ({kinds.get('shard', 0)} shards, "
        f"{kinds.get('dead_letter', 0)} dead-letter)",
        f"rows: {data['shard_rows']} images, {data['captions']} captions, "
        f"{data['with_embedding']} with embeddings; dead-lettered: {data['dead_letter_rows']}",
    ]
    if data["by_split"]:
        lines += ["", "| split | rows |", "|---|---:|"]
        lines += [f"| {cell(split)} | {n} |" for split, n in data["by_split"].items()]
    lines += [
        "",
        "| language | " + " | ".join(schema.ORIGINS) + " | total |",
        "|---|" + "---|" * (len(schema.ORIGINS) + 1),
    ]
    for lang, total in data["by_language"].items():
        cells = [str(data["by_language_origin"].get(f"{lang}/{o}", 0)) for o in schema.ORIGINS]
        lines.append(f"| {cell(lang)} | " + " | ".join(cells) + f" | {total} |")
    stats = data["caption_chars"]
    if stats.get("count"):
        lines += [
            "",
            "caption length (characters): "
            + ", ".join(f"{k} {stats[k]}" for k in ("mean", "min", "p50", "p95", "max")),
        ]
    if data["dead_letters"]:
        lines += ["", "| dead-letter stage | reason | rows |", "|---|---|---|"]
        lines += [
            f"| {cell(d['stage'])} | {cell(d['error_kind'])} | {d['rows']} |"
            for d in data["dead_letters"]
        ]
    if data["runs"]:
        drops = data["caption_drops"]
        lines += [
            "",
            f"captions dropped by the run{'s' if len(data['runs']) > 1 else ''}: "
            + (f"{sum(drops.values())}" if drops else "none"),
        ]
        if drops:
            lines += ["", "| dropped caption (stage.reason) | captions |", "|---|---:|"]
            lines += [f"| {cell(k)} | {n} |" for k, n in drops.items()]
        for run in data["runs"]:
            if run.get("error"):
                lines.append(
                    f"run manifest {printable(run['manifest'])}: {printable(run['error'])}"
                )
            translators = run.get("translators") or {}
            if translators:
                lines += ["", "| language | translator |", "|---|---|"]
                lines += [
                    f"| {cell(lang)} | {cell(', '.join(map(str, models)) if isinstance(models, list) else models)} |"
                    for lang, models in translators.items()
                ]
            units = run.get("units") or []
            if units:
                state = "complete" if run.get("complete") else "incomplete (re-run to finish)"
                lines += [
                    "",
                    f"work units committed: {len(units)}, {state}",
                    "",
                    "| unit | inputs | rows | dead-lettered |",
                    "|---|---:|---:|---:|",
                ]
                lines += [
                    f"| {cell(u.get('unit'))} | {cell(u.get('inputs'))} | {cell(u.get('rows'))} "
                    f"| {cell(u.get('dead_lettered'))} |"
                    for u in units[:20]
                ]
                if len(units) > 20:
                    lines.append(f"(showing 20 of {len(units)} units)")
    lines += format_translation_report(data.get("translation_scores") or {})
    if data["samples"]:
        shown = len(data["samples"])
        lines += ["", f"samples: showing {shown} of {data['shard_rows']} rows"]
        for s in data["samples"]:
            caps = s["captions"]
            lines.append(
                f"- {printable(str(s['image_id'])[:12])} {printable(s['source_uri'] or '')}"
                + (f" (split {printable(s['split'])})" if s.get("split") else "")
                + (
                    f" — showing {min(len(caps), _CAPTIONS_SHOWN)} of {len(caps)} captions"
                    if len(caps) > _CAPTIONS_SHOWN
                    else ""
                )
            )
            for c in caps[:_CAPTIONS_SHOWN]:
                score = "" if c["score"] is None else f" (score {c['score']:.3f})"
                lines.append(
                    f"    [{printable(c['language'])}/{printable(c['origin'])}] "
                    f"{printable(c['text'])}{score}"
                )
    meta = data["metadata"]
    if meta:
        lines += ["", f"schema version: {printable(meta.get('schema_version'))}"]
        if meta.get("models"):
            lines.append(
                "models: "
                + ", ".join(f"{printable(k)}={printable(v)}" for k, v in meta["models"].items())
            )
    return "\n".join(lines)

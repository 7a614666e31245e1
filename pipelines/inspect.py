"""Summarise babelcap shards and dead-letter files without loading them into memory.

Reads footers for metadata and row counts, then streams only the columns it needs in
record batches, so a folder of any size is summarised in bounded memory.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from babelcap.core import schema
from babelcap.core.shards import find_shards

_RESERVOIR = 10_000  # caption lengths kept for percentiles


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
    by_language: Counter = field(default_factory=Counter)
    by_origin: Counter = field(default_factory=Counter)
    by_language_origin: Counter = field(default_factory=Counter)
    with_embedding: int = 0
    caption_chars: LengthStats = field(default_factory=LengthStats)
    dead_letters: Counter = field(default_factory=Counter)  # (stage, error_kind) -> rows
    samples: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
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
        return out


def _scan_shard(path: str, report: Report, n_samples: int, batch_size: int) -> None:
    pf = pq.ParquetFile(path)
    columns = ["image_id", "source_uri", "captions", "embedding"]
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        report.shard_rows += batch.num_rows
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
                        "captions": [
                            {k: c[k] for k in ("language", "origin", "text", "score")}
                            for c in row["captions"]
                        ],
                    }
                )


def _scan_dead_letter(path: str, report: Report, batch_size: int) -> None:
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_size, columns=["stage", "error_kind"]):
        report.dead_letter_rows += batch.num_rows
        report.dead_letters.update(
            zip(
                batch.column("stage").to_pylist(),
                batch.column("error_kind").to_pylist(),
                strict=True,
            )
        )


def inspect_paths(path_or_glob: str, n_samples: int = 3, batch_size: int = 4096) -> dict[str, Any]:
    """Summarise every babelcap Parquet file under `path_or_glob` (shards and dead letters)."""
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
            _scan_shard(path, report, n_samples, batch_size)
        else:
            _scan_dead_letter(path, report, batch_size)
    return report.to_dict()


def format_report(data: dict[str, Any]) -> str:
    """Render an `inspect_paths` result as plain text with Markdown tables."""
    kinds = Counter(f["kind"] for f in data["files"])
    lines = [
        f"files: {len(data['files'])} ({kinds.get('shard', 0)} shards, "
        f"{kinds.get('dead_letter', 0)} dead-letter)",
        f"rows: {data['shard_rows']} images, {data['captions']} captions, "
        f"{data['with_embedding']} with embeddings; dead-lettered: {data['dead_letter_rows']}",
        "",
        "| language | " + " | ".join(schema.ORIGINS) + " | total |",
        "|---|" + "---|" * (len(schema.ORIGINS) + 1),
    ]
    for lang, total in data["by_language"].items():
        cells = [str(data["by_language_origin"].get(f"{lang}/{o}", 0)) for o in schema.ORIGINS]
        lines.append(f"| {lang} | " + " | ".join(cells) + f" | {total} |")
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
            f"| {d['stage']} | {d['error_kind']} | {d['rows']} |" for d in data["dead_letters"]
        ]
    if data["samples"]:
        lines += ["", "samples:"]
        for s in data["samples"]:
            lines.append(f"- {s['image_id'][:12]} {s['source_uri'] or ''}")
            for c in s["captions"][:8]:
                score = "" if c["score"] is None else f" (score {c['score']:.3f})"
                lines.append(f"    [{c['language']}/{c['origin']}] {c['text']}{score}")
    meta = data["metadata"]
    if meta:
        lines += ["", f"schema version: {meta.get('schema_version')}"]
        if meta.get("models"):
            lines.append("models: " + ", ".join(f"{k}={v}" for k, v in meta["models"].items()))
    return "\n".join(lines)

"""Sinks: Parquet shards, dead-letter shards and the run's stats, written into a staging folder.

Shards are deterministic: a row goes to shard `int(image_id[:8], 16) % num_shards` and rows are
sorted by `image_id` inside a shard, so the same input and seed give byte-identical files
whatever the runner's bundling. (Beam's `WriteToParquet` assigns rows to shards by bundle,
which is why the writing itself is a small DoFn over pyarrow here; the schema, metadata and
zstd compression are the contract's: `schema.shard_schema` / `schema.dead_letter_schema`.)

`num_shards` is fixed by the configuration, or derived from the row count and
`rows_per_shard` through a side input. Files go through Beam's FileSystems (gs:// works).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from babelcap.core import schema
from babelcap.core.shards import DEAD_LETTER_DIR, SHARDS_DIR, write_shard
from babelcap.pipelines.accounting import DEAD_ROWS, ROWS, MergeStats, bump

STATS_FILE = "stats.json"


def shard_name(index: int, total: int) -> str:
    return f"part-{index:05d}-of-{total:05d}.parquet"


def shard_index(key: str, num_shards: int) -> int:
    return int(key[:8], 16) % num_shards if key else 0


def to_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A pipeline record -> one shard row (the contract's columns only)."""
    return {
        "image_id": rec["image_id"],
        "source_uri": rec.get("uri"),
        "split": rec.get("split"),
        "image": rec.get("image"),
        "width": rec.get("width"),
        "height": rec.get("height"),
        "captions": list(rec.get("captions", [])),
        "embedding": rec.get("embedding"),
        "embedding_model": rec.get("embedding_model"),
    }


def write_parquet(path: str, rows: list[dict[str, Any]], arrow_schema) -> int:
    """Write rows with the exact schema (zstd) to any Beam filesystem path; returns bytes."""
    buf = io.BytesIO()
    write_shard(buf, rows, arrow_schema=arrow_schema)
    data = buf.getvalue()
    with FileSystems.create(path) as f:
        f.write(data)
    return len(data)


class _WriteGroup(beam.DoFn):
    def __init__(self, folder: str, arrow_schema, sort_key: str, fixed_total: int | None):
        self.folder = folder
        self.arrow_schema = arrow_schema
        self.sort_key = sort_key
        self.fixed_total = fixed_total

    def process(self, item: tuple[int, Iterable[dict]], total: int | None = None) -> Iterator[Any]:
        index, rows = item
        total = self.fixed_total or total
        keys = self.sort_key.split(",")
        rows = sorted(rows, key=lambda r: tuple(str(r.get(k) or "") for k in keys))
        path = FileSystems.join(self.folder, shard_name(index, total))
        size = write_parquet(path, rows, self.arrow_schema)
        yield {"path": path, "rows": len(rows), "bytes": size}


class WriteShards(beam.PTransform):
    """rows -> Parquet files under `folder`; outputs one {path, rows, bytes} per file."""

    def __init__(
        self,
        folder: str,
        arrow_schema,
        key: str,
        sort_key: str,
        num_shards: int | None,
        rows_per_shard: int,
    ):
        super().__init__()
        self.folder = folder
        self.arrow_schema = arrow_schema
        self.key = key
        self.sort_key = sort_key
        self.num_shards = num_shards
        self.rows_per_shard = max(1, rows_per_shard)

    def expand(self, rows):
        key, fixed = self.key, self.num_shards
        if fixed:
            keyed = rows | "Key" >> beam.Map(lambda r: (shard_index(r.get(key) or "", fixed), r))
            total = None
        else:
            per = self.rows_per_shard
            count = rows | "Count" >> beam.combiners.Count.Globally()
            total = beam.pvalue.AsSingleton(
                count | "NumShards" >> beam.Map(lambda n: max(1, math.ceil(n / per)))
            )
            keyed = rows | "Key" >> beam.Map(
                lambda r, n: (shard_index(r.get(key) or "", n), r), n=total
            )
        grouped = keyed | "Group" >> beam.GroupByKey()
        writer = _WriteGroup(self.folder, self.arrow_schema, self.sort_key, fixed)
        if total is None:
            return grouped | "Write" >> beam.ParDo(writer)
        return grouped | "Write" >> beam.ParDo(writer, total=total)


def _row_and_stats(rec: dict[str, Any]) -> dict[str, Any]:
    rec = dict(rec)
    bump(rec, ROWS)
    return {"row": to_row(rec), "stats": rec["stats"]}


def _dead_with_count(item: dict[str, Any]) -> dict[str, Any]:
    item = dict(item)
    bump(item, DEAD_ROWS)
    return item


class WriteOutputs(beam.PTransform):
    """(records, dead letters) -> shards, dead-letter shards and stats.json in `staging`."""

    def __init__(
        self,
        staging: str,
        config: Mapping[str, Any],
        models: Mapping[str, Any],
        num_shards: int | None,
        rows_per_shard: int,
    ):
        super().__init__()
        self.staging = staging
        self.config = dict(config)
        self.models = dict(models)
        self.num_shards = num_shards
        self.rows_per_shard = rows_per_shard

    def expand(self, inputs):
        records, dead = inputs
        rows = records | "ToRow" >> beam.Map(_row_and_stats)
        dead = dead | "CountDead" >> beam.Map(_dead_with_count)
        shard_files = (
            rows
            | "Rows" >> beam.Map(lambda x: x["row"])
            | "WriteShards"
            >> WriteShards(
                FileSystems.join(self.staging, SHARDS_DIR),
                schema.shard_schema(self.config, self.models),
                key="image_id",
                sort_key="image_id",
                num_shards=self.num_shards,
                rows_per_shard=self.rows_per_shard,
            )
        )
        dead_files = (
            dead
            | "DeadRows" >> beam.Map(lambda x: x["row"])
            | "WriteDead"
            >> WriteShards(
                FileSystems.join(self.staging, DEAD_LETTER_DIR),
                schema.dead_letter_schema(self.config),
                key="_shard",
                sort_key="input_ref,stage,error_kind",
                num_shards=1,
                rows_per_shard=100_000,
            )
        )
        stats = (
            (
                rows | "RowStats" >> beam.Map(lambda x: x["stats"]),
                dead | "DeadStats" >> beam.Map(lambda x: x["stats"]),
            )
            | "AllStats" >> beam.Flatten()
            | "MergeStats" >> beam.CombineGlobally(MergeStats())
        )
        files = (
            (shard_files, dead_files)
            | "AllFiles" >> beam.Flatten()
            | "FileList" >> beam.combiners.ToList()
        )
        return stats | "WriteStats" >> beam.Map(
            _write_stats, FileSystems.join(self.staging, STATS_FILE), beam.pvalue.AsSingleton(files)
        )


def _write_stats(stats: dict[str, int], path: str, files: list[dict]) -> str:
    # Written after every shard (it waits on the file list): its presence marks a finished run.
    payload = {"stats": stats, "files": sorted(files, key=lambda f: f["path"])}
    with FileSystems.create(path) as f:
        f.write(json.dumps(payload, indent=1, sort_keys=True).encode())
    return path

"""Sinks: each unit's data files, dead letters and stats, written into a staging folder.

For every work unit of the wave the sink writes (through Beam's FileSystems, so gs:// works)

    STAGING/unit-NNNNN/data/SPLIT-IIIII-of-NNNNN.parquet   the unit's rows of one split
    STAGING/unit-NNNNN/dead_letter.parquet                 its dead letters (when it has any)
    STAGING/unit-NNNNN/unit.json                           its files and merged stats, last

Files are deterministic: a unit's rows of one split are sorted by `image_id` and cut into
`num_shards` (or ceil(rows / rows_per_shard)) consecutive files, so the same input and seed
give byte-identical files whatever the runner's bundling. (Beam's `WriteToParquet` assigns
rows to shards by bundle, which is why the writing is a small DoFn over pyarrow here; the
schema, metadata and zstd compression are the contract's.) Rows without a split go to the
`train` files (their `split` column stays empty). `publish.commit_unit` moves a finished unit
into the output.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from babelcap.core import schema
from babelcap.core.shards import DATA_DIR, write_shard
from babelcap.pipelines.accounting import DEAD_ROWS, ROWS, bump

UNIT_RECORD = "unit.json"
DEAD_LETTER_FILE = "dead_letter.parquet"
DEFAULT_SPLIT = "train"


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.parquet"


def split_name(split: str | None) -> str:
    """The file-name split of a row: its split, made a Hugging Face split name (\\w+)."""
    return re.sub(r"\W", "_", split) if split else DEFAULT_SPLIT


def unit_name(unit: int) -> str:
    return f"unit-{unit:05d}"


def unit_folder(staging: str, unit: int) -> str:
    return FileSystems.join(staging, unit_name(unit))


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


class _WriteUnitSplit(beam.DoFn):
    """((unit, split), rows) -> that unit's data files of the split; yields (unit, file)."""

    def __init__(self, staging: str, arrow_schema, num_shards: int | None, rows_per_shard: int):
        self.staging = staging
        self.arrow_schema = arrow_schema
        self.num_shards = num_shards
        self.rows_per_shard = max(1, rows_per_shard)

    def process(self, item: tuple[tuple[int, str], Iterable[dict]]) -> Iterator[Any]:
        (unit, split), rows = item
        folder = FileSystems.join(unit_folder(self.staging, unit), DATA_DIR)
        for info in write_split(
            folder, split, rows, self.arrow_schema, self.num_shards, self.rows_per_shard
        ):
            yield unit, info


def write_split(
    folder: str,
    split: str,
    rows: Iterable[dict],
    arrow_schema,
    num_shards: int | None,
    rows_per_shard: int,
) -> list[dict[str, Any]]:
    """One unit's rows of one split -> its files (sorted by image_id, consecutive cuts)."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    total = max(1, min(len(rows), num_shards or math.ceil(len(rows) / max(1, rows_per_shard))))
    out = []
    for i in range(total):
        part = rows[i * len(rows) // total : (i + 1) * len(rows) // total]
        name = shard_name(split, i, total)
        size = write_parquet(FileSystems.join(folder, name), part, arrow_schema)
        out.append(
            {"name": name, "split": split, "kind": "shard", "rows": len(part), "bytes": size}
        )
    return out


class _WriteUnitDead(beam.DoFn):
    def __init__(self, staging: str, arrow_schema):
        self.staging = staging
        self.arrow_schema = arrow_schema

    def process(self, item: tuple[int, Iterable[dict]]) -> Iterator[Any]:
        unit, rows = item
        rows = sorted(rows, key=lambda r: (r["input_ref"], r["stage"], r["error_kind"]))
        path = FileSystems.join(unit_folder(self.staging, unit), DEAD_LETTER_FILE)
        size = write_parquet(path, rows, self.arrow_schema)
        yield (
            unit,
            {"name": DEAD_LETTER_FILE, "kind": "dead_letter", "rows": len(rows), "bytes": size},
        )


def _row_and_stats(rec: dict[str, Any], unit_of: Mapping[str, int]) -> dict[str, Any]:
    rec = dict(rec)
    bump(rec, ROWS)
    row = to_row(rec)
    return {"unit": unit_of[rec["input_ref"]], "row": row, "stats": rec["stats"]}


def _dead_with_count(item: dict[str, Any], unit_of: Mapping[str, int]) -> dict[str, Any]:
    item = dict(item)
    bump(item, DEAD_ROWS)
    item["unit"] = unit_of[item["row"]["input_ref"]]
    return item


def _write_unit_record(item: tuple[int, dict[str, list]], staging: str) -> str:
    # Written after the unit's files (it waits on them): its presence marks a finished unit.
    unit, parts = item
    total: Counter = Counter()
    for stats in parts["stats"]:
        total.update(stats)
    stats = dict(sorted(total.items()))
    payload = {
        "unit": unit,
        "stats": stats,
        "files": sorted(parts["files"], key=lambda f: f["name"]),
    }
    path = FileSystems.join(unit_folder(staging, unit), UNIT_RECORD)
    with FileSystems.create(path) as f:
        f.write(json.dumps(payload, indent=1, sort_keys=True).encode())
    return path


class WriteOutputs(beam.PTransform):
    """(records, dead letters) -> per unit: data files, dead letters and unit.json in
    `staging`. `unit_of` maps every input reference of the wave to its unit."""

    def __init__(
        self,
        staging: str,
        config: Mapping[str, Any],
        models: Mapping[str, Any],
        num_shards: int | None,
        rows_per_shard: int,
        unit_of: Mapping[str, int],
    ):
        super().__init__()
        self.staging = staging
        self.config = dict(config)
        self.models = dict(models)
        self.num_shards = num_shards
        self.rows_per_shard = rows_per_shard
        self.unit_of = dict(unit_of)

    def expand(self, inputs):
        records, dead = inputs
        unit_of = self.unit_of
        rows = records | "ToRow" >> beam.Map(_row_and_stats, unit_of)
        dead = dead | "CountDead" >> beam.Map(_dead_with_count, unit_of)
        data_files = (
            rows
            | "KeyRows"
            >> beam.Map(lambda x: ((x["unit"], split_name(x["row"]["split"])), x["row"]))
            | "GroupRows" >> beam.GroupByKey()
            | "WriteRows"
            >> beam.ParDo(
                _WriteUnitSplit(
                    self.staging,
                    schema.shard_schema(self.config, self.models),
                    self.num_shards,
                    self.rows_per_shard,
                )
            )
        )
        dead_files = (
            dead
            | "KeyDead" >> beam.Map(lambda x: (x["unit"], x["row"]))
            | "GroupDead" >> beam.GroupByKey()
            | "WriteDead"
            >> beam.ParDo(_WriteUnitDead(self.staging, schema.dead_letter_schema(self.config)))
        )
        stats = (
            rows | "RowStats" >> beam.Map(lambda x: (x["unit"], x["stats"])),
            dead | "DeadStats" >> beam.Map(lambda x: (x["unit"], x["stats"])),
        ) | "AllStats" >> beam.Flatten()
        files = (data_files, dead_files) | "AllFiles" >> beam.Flatten()
        return (
            {"stats": stats, "files": files}
            | "PerUnit" >> beam.CoGroupByKey()
            | "WriteUnit" >> beam.Map(_write_unit_record, self.staging)
        )

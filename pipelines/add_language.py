"""Add target languages to committed units: translate, filter, rewrite; nothing else runs.

`babelcap augment --languages pt,hi` on an output made with `pt` builds this pipeline for the
committed units instead of the full one: the rows are read back from the units' data files,
their English captions (those the full run selected and translated) are translated into the
new languages only, the new translations go through the translation filters, and the rows are
written as a new version of each unit (`data/unit-N-vK/`), committed like any unit. No image
is decoded, captioned or scored with CLIP; every existing caption is kept as it was (the new
ones are appended). A row whose translation batch fails keeps its old captions (counted as
`add_language.translate_failed`).

The same pipeline retranslates (`--retranslate pt` with another translator): the old
translations into those languages are replaced by the new ones; everything else is kept.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from babelcap.core import schema
from babelcap.pipelines.accounting import bump
from babelcap.pipelines.filters import FilterTranslations
from babelcap.pipelines.options import AugmentConfig
from babelcap.pipelines.sinks import WriteOutputs
from babelcap.pipelines.translation import Translate


def row_ref(unit: int, image_id: str) -> str:
    return f"unit-{unit:05d}:{image_id}"


def _translated_into(caption: Mapping[str, Any], languages: frozenset[str]) -> bool:
    return caption["origin"] == schema.ORIGIN_TRANSLATED and caption["language"] in languages


def _read_rows(item: tuple[int, str], languages: frozenset[str]) -> Iterator[dict[str, Any]]:
    """A unit's rows, without their old translations into `languages` (so the translation
    filters see only the new ones); `old_captions` keeps the row's captions as they were."""
    unit, path = item
    with FileSystems.open(path, compression_type="uncompressed") as f:
        table = pq.read_table(io.BytesIO(f.read()))
    for row in table.to_pylist():
        yield {
            **row,
            "captions": [c for c in row["captions"] if not _translated_into(c, languages)],
            "uri": row.get("source_uri"),
            "input_ref": row_ref(unit, row["image_id"]),
            "old_captions": row["captions"],
            "stats": {},
        }


class KeepOld(beam.DoFn):
    """Old captions exactly as they were, except the old translations into the languages
    translated now (a retranslation replaces them), then the new translations that passed.
    Translations only ever follow the English captions they point to (`source_index`), so
    dropping some never moves an index."""

    def __init__(self, languages: Sequence[str]):
        self.languages = frozenset(languages)

    def process(self, rec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        rec = dict(rec)
        old = rec.pop("old_captions")
        kept = [c for c in old if not _translated_into(c, self.languages)]
        new = [c for c in rec["captions"] if _translated_into(c, self.languages)]
        rec["captions"] = [*kept, *new]
        bump(rec, "add_language.translations_kept", len(new))
        bump(rec, "add_language.translations_replaced", len(old) - len(kept))
        yield rec


def _rescue(item: tuple[str, Mapping[str, list]]) -> Iterator[dict[str, Any]]:
    _, parts = item
    if parts["failed"] and parts["original"]:
        rec = dict(parts["original"][0])
        bump(rec, "add_language.translate_failed")
        yield rec


def build_add_languages(
    pipeline: beam.Pipeline,
    config: AugmentConfig,
    staging: str,
    models: Mapping[str, Any],
    languages: Sequence[str],
    files: Sequence[tuple[int, str]],
    unit_of: Mapping[str, int],
) -> None:
    """Translate the rows of the committed data `files` ((unit, path) pairs) into the new
    `languages` and write each unit anew into `staging`."""
    rows = (
        pipeline
        | "Files" >> beam.Create(list(files))
        | "Spread" >> beam.Reshuffle()
        | "ReadRows" >> beam.FlatMap(_read_rows, frozenset(languages))
    )
    translated, failed = rows | "Translate" >> Translate(
        config.translator, tuple(languages), config.model_copies
    )
    original = rows | "KeyOriginal" >> beam.Map(lambda r: (r["input_ref"], r))
    failed_keys = failed | "KeyFailed" >> beam.Map(
        lambda d: (getattr(d, "value", d)["row"]["input_ref"], 1)
    )
    rescued = (
        {"original": original, "failed": failed_keys}
        | "JoinFailed" >> beam.CoGroupByKey()
        | "Rescue" >> beam.FlatMap(_rescue)
    )
    filtered = (
        translated
        | "FilterTranslations" >> beam.ParDo(FilterTranslations(config.text, tuple(languages)))
        | "KeepOld" >> beam.ParDo(KeepOld(languages))
    )
    records = (filtered, rescued) | "AllRows" >> beam.Flatten()
    no_dead = pipeline | "NoDead" >> beam.Create([])
    _ = (records, no_dead) | "Write" >> WriteOutputs(
        staging, config.to_dict(), models, config.num_shards, config.rows_per_shard, unit_of
    )

"""Drop exact duplicate images (same bytes -> same image_id).

The record kept is the first by input order (source file, then line/position), so which one
survives does not depend on bundling; every other copy goes to the dead-letter output as
`duplicate_image` with the kept copy's reference in the message, and is counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from babelcap.pipelines.accounting import DUPLICATES, bump
from babelcap.pipelines.deadletter import DEAD, DUPLICATE_IMAGE, reject

STAGE = "dedup"


class KeepFirst(beam.DoFn):
    def process(self, item: tuple[str, Iterable[dict[str, Any]]]) -> Iterator[Any]:
        _, group = item
        records = sorted(group, key=lambda r: (_order_key(r["order"]), r["input_ref"]))
        kept = records[0]
        yield kept
        for dup in records[1:]:
            dup = dict(dup)
            bump(dup, DUPLICATES)
            yield reject(dup, STAGE, DUPLICATE_IMAGE, f"duplicate of {kept['input_ref']}")


def _order_key(order: tuple) -> tuple:
    # Numbers compare as numbers (line 9 before line 10), strings as strings.
    return tuple((0, v, "") if isinstance(v, int) else (1, 0, str(v)) for v in order)


class DropDuplicateImages(beam.PTransform):
    """records -> (unique records, duplicates as dead letters)."""

    def expand(self, records):
        out = (
            records
            | "KeyByImage" >> beam.Map(lambda r: (r["image_id"], r))
            | "GroupByImage" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(KeepFirst()).with_outputs(DEAD, main="unique")
        )
        return out.unique, out[DEAD]

"""Counting what every stage does, and the books that must balance at the end.

Each element carries a small `stats` dict; stages bump it (and a Beam Metrics counter of the
same name, for live progress on any runner). At the sink all `stats` are summed into one
dict (`MergeStats`), which is runner-independent and exact, unlike attempted metrics.

The invariant checked before any unit is committed (and over the whole dataset in the
manifest):
    inputs == rows written + dead-lettered + duplicates dropped
where "duplicates dropped" holds both copies of an image inside the input (`duplicate_image`)
and images already in a committed unit of the dataset (`already_present`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

NAMESPACE = "babelcap"

# Stats keys that the accounting uses.
INPUTS = "read.inputs"
ROWS = "sink.rows"
DEAD_ROWS = "sink.dead_letter"
DUPLICATES = "dedup.duplicate_images"
PRESENT = "dedup.already_present"
# Dead-letter kinds that are not failures: the image is in the output once already.
NOT_FAILURES = ("duplicate_image", "already_present")


class AccountingError(RuntimeError):
    """inputs != rows + dead-lettered + duplicates: some input was lost or doubled."""


def bump(element: dict[str, Any], key: str, n: int = 1) -> None:
    """Count `n` events of `key` on the element and on the live Beam counter."""
    if n == 0:
        return
    # A new dict each time: Beam may hand the same input object to several consumers.
    stats = dict(element.get("stats") or {})
    stats[key] = stats.get(key, 0) + n
    element["stats"] = stats
    Metrics.counter(NAMESPACE, key).inc(n)


def caption_drop(element: dict[str, Any], stage: str, reason: str, n: int = 1) -> None:
    """A caption (not a row) was dropped: counted per stage and reason."""
    bump(element, f"caption_drop.{stage}.{reason}", n)


class MergeStats(beam.CombineFn):
    """Sum stats dicts."""

    def create_accumulator(self) -> Counter:
        return Counter()

    def add_input(self, acc: Counter, stats: Mapping[str, int]) -> Counter:
        acc.update(stats)
        return acc

    def merge_accumulators(self, accs: Iterable[Counter]) -> Counter:
        out: Counter = Counter()
        for acc in accs:
            out.update(acc)
        return out

    def extract_output(self, acc: Counter) -> dict[str, int]:
        return dict(sorted(acc.items()))


def balance(
    stats: Mapping[str, int],
    rows: int,
    dead_letter_rows: int,
    duplicates: int,
    planned: int | None = None,
) -> dict:
    """The accounting for the run manifest; raise AccountingError when it does not hold.

    `rows`, `dead_letter_rows` and `duplicates` (dead letters of a NOT_FAILURES kind) come from
    the written files (the truth); `stats[INPUTS]` from the counting of inputs at the source.
    `planned`, when given, is how many inputs the unit's plan holds: fewer counted means some
    planned input was neither read nor dead-lettered (the reader turns those into `not_read`
    dead letters, so this is the last check), and the unit must not commit as balanced.
    """
    inputs = int(stats.get(INPUTS, 0))
    if planned is not None and inputs < planned:
        raise AccountingError(
            f"accounting mismatch: {planned} inputs planned for the unit but {inputs} counted: "
            f"{planned - inputs} planned inputs were neither read nor dead-lettered"
        )
    dead = dead_letter_rows - duplicates
    books = {
        "inputs": inputs,
        "rows_written": rows,
        "dead_lettered": dead,
        "duplicates_dropped": duplicates,
        "balanced": inputs == rows + dead + duplicates,
    }
    if not books["balanced"]:
        raise AccountingError(
            f"accounting mismatch: inputs={inputs} but rows={rows} + dead-lettered={dead} + "
            f"duplicates={duplicates} = {rows + dead + duplicates}"
        )
    return books


def duplicates_in(dead_counts: Mapping[str, int]) -> int:
    """How many of the dead letters counted by "stage/kind" are not failures."""
    return sum(v for k, v in dead_counts.items() if k.rsplit("/", 1)[-1] in NOT_FAILURES)


def merge_books(books: Iterable[Mapping[str, Any]]) -> dict:
    """The books of several units, summed (balanced when every one is)."""
    keys = ("inputs", "rows_written", "dead_lettered", "duplicates_dropped")
    books = list(books)
    out: dict[str, Any] = {k: sum(int(b.get(k, 0)) for b in books) for k in keys}
    out["balanced"] = all(b.get("balanced") for b in books)
    return out


def caption_drops(stats: Mapping[str, int]) -> dict[str, int]:
    return {k[len("caption_drop.") :]: v for k, v in stats.items() if k.startswith("caption_drop.")}


def format_summary(stats: Mapping[str, int], books: Mapping[str, Any]) -> str:
    """A short human summary: the books, then every counter."""
    lines = [
        f"inputs {books['inputs']} = rows written {books['rows_written']} + dead-lettered "
        f"{books['dead_lettered']} + duplicates dropped {books['duplicates_dropped']}"
        + ("  (balanced)" if books.get("balanced") else "  (MISMATCH)")
    ]
    width = max((len(k) for k in stats), default=10)
    lines += [f"  {k:<{width}}  {v}" for k, v in sorted(stats.items())]
    return "\n".join(lines)

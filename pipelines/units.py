"""Work units: the input split into pieces that are computed and committed one at a time.

The rule (deterministic, recorded):

- the inputs are listed in input order (the sources' order: manifest line, folder path, tar
  member), exactly as the pipeline's reader lists them (`sources.ExpandInput`, run here in the
  driver without reading any image);
- unit N holds the inputs at positions N * unit_size ... (N + 1) * unit_size - 1 of that list;
- the plan is written to `OUTPUT/_units/plan.json` at the first run and reused by every later
  run into the output, so a unit's inputs never change once planned; inputs not in the plan
  (images added to the input later) form new units after the last one, in input order.

A unit's inputs all end in that unit's rows or dead letters (each row and dead letter carries
its input reference, which maps it to its unit). The runner computes the uncommitted units in
waves (one Beam pipeline per wave) and commits each unit of a finished wave on its own
(`publish.commit_unit`), so a crash loses at most the wave in flight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems

from babelcap.core.shards import UNITS_DIR, read_json
from babelcap.pipelines.options import AugmentConfig
from babelcap.pipelines.sinks import unit_name

__all__ = ["DropPresent", "KeepUnits", "Plan", "extend_plan", "list_inputs", "unit_name", "waves"]

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
ALREADY_PRESENT = "already_present"  # dead-letter kind: the image is in a committed unit


@dataclass(frozen=True)
class Plan:
    """Which inputs (by reference) each unit holds."""

    unit_size: int
    units: tuple[tuple[str, ...], ...]

    def unit_of(self, units: Iterable[int] | None = None) -> dict[str, int]:
        """input_ref -> unit, for the given units (all when None)."""
        wanted = range(len(self.units)) if units is None else units
        return {ref: u for u in wanted for ref in self.units[u]}

    @property
    def num_inputs(self) -> int:
        return sum(len(u) for u in self.units)

    def to_dict(self) -> dict[str, Any]:
        return {"unit_size": self.unit_size, "units": [list(u) for u in self.units]}


def list_inputs(config: AugmentConfig) -> list[str]:
    """Every input reference of `config.input`, in input order (listing only: the reader's own
    expansion, in the order it emits; images are not read). Rejected rows count: they are
    inputs too."""
    from babelcap.pipelines.sources import ExpandInput

    found: dict[str, None] = {}
    for out in ExpandInput(config).process(config.input) or ():
        rec = out.value["row"] if isinstance(out, pvalue.TaggedOutput) else out
        ref = rec.get("input_ref")
        if ref is not None:
            found.setdefault(ref)
    return list(found)


def plan_path(output: str) -> str:
    return FileSystems.join(output, UNITS_DIR, PLAN_FILE)


def read_plan(output: str) -> Plan | None:
    path = plan_path(output)
    if not FileSystems.exists(path):
        return None
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    data = read_json(fs, root)
    return Plan(int(data["unit_size"]), tuple(tuple(u) for u in data["units"]))


def write_plan(output: str, plan: Plan) -> None:
    from babelcap.pipelines.publish import write_json

    write_json(plan_path(output), plan.to_dict())


def extend_plan(old: Plan | None, inputs: list[str], unit_size: int) -> Plan:
    """The old plan, with inputs it does not hold appended as new units (input order)."""
    if old is None:
        size = unit_size
        units: list[tuple[str, ...]] = []
        planned: set[str] = set()
    else:
        size, units = old.unit_size, list(old.units)
        planned = {r for u in units for r in u}
    new = [r for r in inputs if r not in planned]
    units += [tuple(new[i : i + size]) for i in range(0, len(new), size)]
    return Plan(size, tuple(units))


def waves(pending: list[int], per_wave: int) -> Iterator[list[int]]:
    for i in range(0, len(pending), max(1, per_wave)):
        yield pending[i : i + per_wave]


# --- pipeline pieces -------------------------------------------------------------------------
def _ref(element: Mapping[str, Any]) -> str | None:
    return element.get("input_ref") or (element.get("row") or {}).get("input_ref")


class KeepUnits(beam.PTransform):
    """Keep only the records (or dead letters) of this wave's inputs. `refs` (the planned
    references) also tells `sources.ReadInputs` which inputs must come out of the reader: each
    one that does not becomes a `not_read` dead letter, so a unit balances against its plan."""

    def __init__(self, unit_of: Mapping[str, int]):
        super().__init__()
        self.refs = frozenset(unit_of)

    def expand(self, pcoll):
        refs = self.refs
        return pcoll | "InWave" >> beam.Filter(lambda e: _ref(e) in refs)


class DropPresent(beam.DoFn):
    """Images already in a committed unit (by image_id) are not computed again: they go to the
    dead letters as `already_present` (counted like dropped duplicates, not as failures)."""

    def __init__(self, present: frozenset[str]):
        self.present = present

    def process(self, rec: dict[str, Any]) -> Iterator[Any]:
        from babelcap.pipelines.accounting import PRESENT, bump
        from babelcap.pipelines.deadletter import reject

        if rec.get("image_id") in self.present:
            rec = dict(rec)
            bump(rec, PRESENT)
            yield reject(rec, "dedup", ALREADY_PRESENT, "image already in the dataset")
        else:
            yield rec


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ in a way that would mix incompatible rows."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
            return
        key = prefix.rstrip(".")
        if a != b and not _execution_only(key):
            out.append(key)

    walk(json.loads(json.dumps(dict(old))), json.loads(json.dumps(dict(new))), "")
    return out


# Settings of the resources a run uses, nothing else: a finished run that differs only in them
# is the same run (`runner.config_fingerprint` leaves them out).
RESOURCE_KEYS = frozenset({"model_copies"})
# Settings that change how a run executes or where its files go, not what its rows hold.
EXECUTION_KEYS = frozenset(
    {
        "input",  # a larger input adds images
        "output",
        "num_shards",
        "rows_per_shard",
        "unit_size",
        "units_per_wave",
        "units_per_translation_wave",
        "max_dead_letter_share",
        "overwrite",
        "retry_failed",
        "retranslate",
        *RESOURCE_KEYS,
    }
)
EXECUTION_SUFFIXES = (".device", ".batch_size")


def _execution_only(key: str) -> bool:
    return key in EXECUTION_KEYS or key.endswith(EXECUTION_SUFFIXES)


def translators_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """Target language -> the translator configuration its committed translations came from
    (records written before per-language translators: the unit's one translator)."""
    if "translators" in record:
        return dict(record["translators"])
    config = record["config"]
    return {lang: config.get("translator") for lang in config.get("languages") or ()}


def translator_differences(old: Any, new: Any) -> list[str]:
    """The translator keys in which two translator configurations differ (execution-only keys
    aside), named as the config names them (`translator.model`, ...)."""
    return config_differences({"translator": old}, {"translator": new})


def stale_translations(
    records: Sequence[Mapping[str, Any]], new: Mapping[str, Any]
) -> dict[str, list[str]]:
    """Target language -> the translator keys in which its committed translations (in any unit)
    differ from the `new` configuration's translator (execution-only keys aside). A unit with
    no rows has no translations to differ."""
    out: dict[str, set[str]] = {}
    for record in records:
        if not any(f["kind"] == "shard" for f in record["files"]):
            continue
        for lang, old in translators_of(record).items():
            if lang in (new.get("languages") or ()):
                keys = translator_differences(old, new["translator"])
                if keys:
                    out.setdefault(lang, set()).update(keys)
    return {lang: sorted(keys) for lang, keys in sorted(out.items())}

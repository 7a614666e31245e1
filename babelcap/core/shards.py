"""Finding and writing shard files: one rule for every reader, one writer for every producer.

An augment output (`babelcap augment --output OUTPUT`) is laid out so that the tools users
already have read it as it is:

    OUTPUT/README.md                    dataset card (Hugging Face YAML header + the run's figures)
    OUTPUT/run_manifest.json            config, committed units, merged accounting and stats
    OUTPUT/data/unit-NNNNN/SPLIT-IIIII-of-NNNNN.parquet   the rows; nothing else under data/
    OUTPUT/dead_letter/unit-NNNNN.parquet                 the dead letters, outside data/
    (unit-NNNNN-vK: a unit committed again after a language was added or failures retried)
    OUTPUT/_units/unit-NNNNN.json       a unit's commit record (its files, counts, stats)
    OUTPUT/_staging/RUN_ID/             work in progress; OUTPUT/_lock: the run holding OUTPUT

A unit is committed when its record in `_units/` exists (written last, after its data folder
was renamed into place in one step). Data globs (`OUTPUT/data/**/*.parquet`, or
`OUTPUT/data/*/train-*.parquet` for one split) never reach dead letters or bookkeeping; names
starting with `_` or `.` are not data for pyarrow.dataset, Spark or Hive.

The rule for what a path means (trainer, evaluator, `inspect`, `export-wds`, the demo and the
benchmarks all go through `find_shards`):

- a file is itself; a glob is its matches; a folder is every `*.parquet` below it;
- inside folders and globs, names starting with `_` or `.` are not data (the Hive / Spark /
  pyarrow.dataset convention): an output's `_staging/` of a crashed run is never read;
- inside an augment output only the files of committed units count (a unit being committed
  right now, or left half-renamed by a killed run, is not read); an output with no committed
  unit and no `run_manifest.json` is `IncompleteOutputError`. (An output of the earlier layout,
  `shards/` without `_units/`, counts when its `run_manifest.json` is there.)
- dead-letter files are skipped when looking for shards in folders and globs (asking for
  `kind="dead_letter"` gives them instead); naming one file of the wrong kind is an error;
- every file found is checked against the contract (`schema.validate`).

`write_shard` writes rows or a table through the contract (exact schema, metadata, zstd).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from babelcap.core import schema

DATA_DIR = "data"
DEAD_LETTER_DIR = "dead_letter"
RUN_MANIFEST = "run_manifest.json"
DATASET_CARD = "README.md"
UNITS_DIR = "_units"
STAGING_DIR = "_staging"
LOCK_FILE = "_lock"
LEGACY_SHARDS_DIR = "shards"  # the layout before units (read, never written)
ROW_GROUP_SIZE = 256
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a unit record or manifest larger than this is refused


class IncompleteOutputError(FileNotFoundError):
    """An augment output without its run manifest: the run that wrote it did not finish."""


@dataclass(frozen=True)
class ShardSet:
    """Validated babelcap files on one filesystem."""

    files: tuple[str, ...]
    filesystem: Any  # pyarrow FileSystem, None for local paths
    num_rows: int
    infos: tuple[schema.FileInfo, ...]

    @property
    def fs(self) -> Any:
        return self.filesystem or pafs.LocalFileSystem()


def _hidden(path: str, root: str) -> bool:
    rel = os.path.relpath(path, root) if root else path
    return any(part.startswith(("_", ".")) for part in rel.replace("\\", "/").split("/"))


def _exists(fs: Any, path: str, kind: Any = None) -> bool:
    info = fs.get_file_info(path)
    return info.type != pafs.FileType.NotFound and (kind is None or info.type == kind)


def read_json(fs: Any, path: str, limit: int = MAX_RECORD_BYTES) -> Any:
    """A JSON file of an output (unit record, manifest), bounded in size."""
    with fs.open_input_stream(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes, refused")
    return json.loads(data)


def is_output(root: str, fs: Any = None) -> bool:
    """Is `root` an augment output (or one being written)?"""
    fs = fs or pafs.LocalFileSystem()
    if _exists(fs, f"{root}/{RUN_MANIFEST}", pafs.FileType.File):
        return True
    return any(_exists(fs, f"{root}/{name}") for name in (UNITS_DIR, STAGING_DIR, LOCK_FILE))


def committed_units(root: str, fs: Any = None) -> list[dict[str, Any]]:
    """The commit records (`_units/unit-*.json`) of an output, by unit number."""
    fs = fs or pafs.LocalFileSystem()
    folder = f"{root}/{UNITS_DIR}"
    if not _exists(fs, folder, pafs.FileType.Directory):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder))
    paths = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and os.path.basename(i.path).startswith("unit-")
        and i.path.endswith(".json")
    )
    return [read_json(fs, p) for p in paths]


def committed_files(root: str, fs: Any = None) -> set[str]:
    """Paths (under `root`) of every data and dead-letter file of the committed units."""
    return {
        f"{root}/{f['path']}" for unit in committed_units(root, fs) for f in unit.get("files", [])
    }


def _output_root(path: str, fs: Any, cache: dict[str, str | None]) -> str | None:
    """The augment output a path lies in (up to three folders up), or None."""
    folder = os.path.dirname(path.rstrip("/"))
    for _ in range(4):
        if folder in cache:
            return cache[folder]
        if folder and is_output(folder, fs):
            cache[folder] = folder
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return None


def _committed_set(root: str, fs: Any) -> set[str] | None:
    """The committed files of an output; None for the earlier layout (all its files)."""
    units = committed_units(root, fs)
    if units:
        return {f"{root}/{f['path']}" for u in units for f in u.get("files", [])}
    if _exists(fs, f"{root}/{UNITS_DIR}", pafs.FileType.Directory) or not _exists(
        fs, f"{root}/{RUN_MANIFEST}", pafs.FileType.File
    ):
        raise IncompleteOutputError(
            f"{root} has no committed unit and no {RUN_MANIFEST}: the augment run that "
            "writes it did not finish (run it again to complete the output)"
        )
    return None


def _only_committed(files: list[str], fs: Any) -> list[str]:
    """Keep files outside outputs, and inside outputs only those of committed units."""
    roots: dict[str, str | None] = {}
    committed: dict[str, set[str] | None] = {}
    kept = []
    for path in files:
        root = _output_root(path, fs, roots)
        if root is not None and root not in committed:
            committed[root] = _committed_set(root, fs)
        allowed = committed.get(root) if root is not None else None
        if allowed is None or path in allowed:
            kept.append(path)
    return kept


def _check_complete(folder: str) -> None:
    """Refuse an augment output (or a folder inside one) that nothing was committed to."""
    fs = pafs.LocalFileSystem()
    folder = folder.rstrip("/") or "/"
    root = folder if is_output(folder, fs) else _output_root(os.path.join(folder, "x"), fs, {})
    if root is not None:
        _committed_set(root, fs)


def expand(spec: str) -> tuple[list[str], Any, bool]:
    """(Parquet files, pyarrow filesystem or None, named explicitly) for one path spec."""
    if "://" in spec and not spec.startswith("file://"):
        fs, root = pafs.FileSystem.from_uri(spec)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            sel = pafs.FileSelector(root, recursive=True)
            files = [
                f.path
                for f in fs.get_file_info(sel)
                if f.path.endswith(".parquet") and not _hidden(f.path, root)
            ]
            if is_output(root.rstrip("/"), fs):
                allowed = _committed_set(root.rstrip("/"), fs)
                files = [f for f in files if allowed is None or f in allowed]
            return sorted(files), fs, False
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file, folder or glob match: {spec!r}")
        return [root], fs, True
    spec = spec.removeprefix("file://")
    if os.path.isdir(spec):
        _check_complete(spec)
        found = glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True)
        files = [f for f in found if os.path.isfile(f) and not _hidden(f, spec)]
        return sorted(_only_committed(files, pafs.LocalFileSystem())), None, False
    if any(c in spec for c in "*?["):
        found = glob.glob(spec, recursive=True)
        files = [f for f in found if os.path.isfile(f) and not _hidden(f, "")]
        return sorted(_only_committed(files, pafs.LocalFileSystem())), None, False
    if not os.path.exists(spec):
        raise FileNotFoundError(f"no such file, folder or glob match: {spec!r}")
    return [spec], None, True


def find_shards(
    specs: str | os.PathLike | Sequence[str | os.PathLike], kind: str | None = schema.KIND_SHARD
) -> ShardSet:
    """Expand files / folders / globs / URIs (the rule above) into validated files of `kind`
    (None: shards and dead letters both, e.g. for `inspect`)."""
    specs = [specs] if isinstance(specs, str | os.PathLike) else list(specs)
    if not specs:
        raise FileNotFoundError("no shard paths given")
    files: list[str] = []
    infos: list[schema.FileInfo] = []
    filesystem = None
    for spec in specs:
        paths, fs, explicit = expand(str(spec))
        if not paths:
            raise FileNotFoundError(f"no Parquet files found at {spec!r}")
        if fs is not None:
            filesystem = fs
        for path in paths:
            info = schema.read_file_info(path, filesystem=fs)
            if kind is not None and info.kind != kind and not explicit:
                continue
            infos.append(schema.validate(path, kind=kind or info.kind, filesystem=fs))
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no {kind or 'babelcap'} files in {specs}")
    return ShardSet(tuple(files), filesystem, sum(i.num_rows for i in infos), tuple(infos))


def write_shard(
    where: str | os.PathLike | BinaryIO,
    rows: Iterable[Mapping[str, Any]] | pa.Table,
    *,
    kind: str = schema.KIND_SHARD,
    config: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
    arrow_schema: pa.Schema | None = None,
    row_group_size: int = ROW_GROUP_SIZE,
) -> None:
    """Write rows (dicts) or a table as one babelcap Parquet file: the contract's exact schema
    (or `arrow_schema`, a metadata-carrying variant of it), its metadata, zstd."""
    expected = arrow_schema or (
        schema.shard_schema(config, models)
        if kind == schema.KIND_SHARD
        else schema.dead_letter_schema(config)
    )
    table = rows if isinstance(rows, pa.Table) else schema.rows_to_table(rows, expected)
    schema.check_schema(table.schema, expected, str(where))
    table = table.cast(expected).replace_schema_metadata(expected.metadata)
    sink = os.fspath(where) if isinstance(where, os.PathLike) else where
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, row_group_size))

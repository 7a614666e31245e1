"""Finding and writing shard files: one rule for every reader, one writer for every producer.

The rule for what a path means (trainer, evaluator, `inspect`, `export-wds`, the demo and the
benchmarks all go through `find_shards`):

- a file is itself; a glob is its matches; a folder is every `*.parquet` below it;
- inside folders and globs, names starting with `_` or `.` are not data (the Hive / Spark /
  pyarrow.dataset convention): an output's `_staging/` of a crashed run is never read;
- an augment output (a folder with `shards/`) counts only when its `run_manifest.json`, the
  commit marker written last, is there; otherwise `IncompleteOutputError`;
- dead-letter files are skipped when looking for shards in folders and globs (asking for
  `kind="dead_letter"` gives them instead); naming one file of the wrong kind is an error;
- every file found is checked against the contract (`schema.validate`).

`write_shard` writes rows or a table through the contract (exact schema, metadata, zstd).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from babelcap.core import schema

SHARDS_DIR = "shards"
DEAD_LETTER_DIR = "dead_letter"
RUN_MANIFEST = "run_manifest.json"
ROW_GROUP_SIZE = 256


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


def _check_complete(folder: str) -> None:
    """Refuse an augment output (or its shards/ folder) that has no run manifest."""
    candidates = [folder]
    if os.path.basename(os.path.normpath(folder)) in (SHARDS_DIR, DEAD_LETTER_DIR):
        candidates.append(os.path.dirname(os.path.normpath(folder)))
    for root in candidates:
        is_output = os.path.isdir(os.path.join(root, SHARDS_DIR)) or os.path.isdir(
            os.path.join(root, "_staging")
        )
        if is_output and not os.path.exists(os.path.join(root, RUN_MANIFEST)):
            raise IncompleteOutputError(
                f"{root} has no {RUN_MANIFEST}: the augment run that writes it did not finish "
                "(run it again to complete the output)"
            )


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
            return sorted(files), fs, False
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file, folder or glob match: {spec!r}")
        return [root], fs, True
    spec = spec.removeprefix("file://")
    if os.path.isdir(spec):
        _check_complete(spec)
        found = glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True)
        return sorted(f for f in found if os.path.isfile(f) and not _hidden(f, spec)), None, False
    if any(c in spec for c in "*?["):
        found = glob.glob(spec, recursive=True)
        files = [f for f in found if os.path.isfile(f) and not _hidden(f, "")]
        for folder in sorted({os.path.dirname(f) for f in files}):
            _check_complete(folder)
        return sorted(files), None, False
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

"""Staging and publishing: how a run's output appears all at once, or not at all.

A run writes everything into `OUTPUT/_staging/<run_id>/`. Only after the pipeline succeeded
and the accounting balanced does `publish` move the files into place:

    1. delete OUTPUT/run_manifest.json   (the output is now "not complete")
    2. delete the old OUTPUT/shards/* and OUTPUT/dead_letter/*
    3. rename the staged files into OUTPUT/shards/ and OUTPUT/dead_letter/
    4. write OUTPUT/run_manifest.json    (the commit marker, written last)
    5. delete the staging folder

A crash anywhere leaves either the previous complete output, or an output without
`run_manifest.json` (incomplete: readers must not trust it). Re-running the same command
rewrites the same deterministic shards: same rows, no duplicates, nothing missing. Staging
folders of crashed runs are deleted when the next run starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Mapping
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from babelcap.core import schema
from babelcap.core.shards import DEAD_LETTER_DIR, RUN_MANIFEST, SHARDS_DIR
from babelcap.pipelines.sinks import STATS_FILE, shard_name, write_parquet

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
MANIFEST = RUN_MANIFEST


def _ls(folder: str, suffix: str = "") -> list[str]:
    try:
        metas = FileSystems.match([FileSystems.join(folder, "*")])[0].metadata_list
    except Exception:  # a folder that does not exist matches nothing
        return []
    return sorted(m.path for m in metas if m.path.endswith(suffix))


def _delete(paths: list[str]) -> None:
    if paths:
        FileSystems.delete(paths)


def _mkdirs(path: str) -> None:
    with contextlib.suppress(Exception):  # exists already, or object stores with no folders
        FileSystems.mkdirs(path)


def _as_dir(path: str) -> str:
    # Object stores delete a "folder" by prefix, which needs the trailing slash.
    return path.rstrip("/") + "/" if "://" in path else path


def clean_stale_staging(output: str) -> None:
    root = FileSystems.join(output, STAGING_DIR)
    if FileSystems.exists(root):
        log.info("removing staging left by an earlier run: %s", root)
        FileSystems.delete([_as_dir(root)])


def read_staged(staging: str) -> dict[str, Any]:
    """stats.json of a finished staged run (absent: the pipeline did not finish)."""
    path = FileSystems.join(staging, STATS_FILE)
    if not FileSystems.exists(path):
        raise RuntimeError(f"{path} missing: the pipeline did not finish")
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read())


def count_dead_letters(paths: list[str]) -> dict[str, int]:
    """(stage/error_kind) -> count over dead-letter files."""
    counts: dict[str, int] = {}
    for path in paths:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            table = pq.read_table(io.BytesIO(f.read()), columns=["stage", "error_kind"])
        for stage, kind in zip(
            table["stage"].to_pylist(), table["error_kind"].to_pylist(), strict=True
        ):
            key = f"{stage}/{kind}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def ensure_dead_letter_file(staging: str, config: Mapping[str, Any]) -> None:
    """An empty dead-letter shard when nothing failed, so the output layout is always the same."""
    folder = FileSystems.join(staging, DEAD_LETTER_DIR)
    if not _ls(folder, ".parquet"):
        _mkdirs(folder)
        write_parquet(
            FileSystems.join(folder, shard_name(0, 1)), [], schema.dead_letter_schema(config)
        )


def publish(staging: str, output: str, manifest: Mapping[str, Any]) -> None:
    final_manifest = FileSystems.join(output, MANIFEST)
    if FileSystems.exists(final_manifest):
        FileSystems.delete([final_manifest])
    for sub in (SHARDS_DIR, DEAD_LETTER_DIR):
        target = FileSystems.join(output, sub)
        _delete(_ls(target))
        _mkdirs(target)
        staged = _ls(FileSystems.join(staging, sub), ".parquet")
        if staged:
            FileSystems.rename(
                staged, [FileSystems.join(target, FileSystems.split(p)[1]) for p in staged]
            )
    with FileSystems.create(final_manifest) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    FileSystems.delete([_as_dir(FileSystems.join(output, STAGING_DIR))])


def read_manifest(output: str) -> dict[str, Any]:
    """The run manifest of a complete output (FileNotFoundError: incomplete or no run)."""
    path = FileSystems.join(output, MANIFEST)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{path}: no run manifest (the output is incomplete)")
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read())

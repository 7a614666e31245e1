"""Owning an output: checks, the lock, staging, and committing units one at a time.

A run owns its output folder in these ways (README, "Output, dead letters and accounting"):

- `check_output` refuses a filesystem root, the home folder, a bucket root, an output that
  contains the input, and a folder whose `data/` or `dead_letter/` babelcap did not write;
- `OutputLock` takes `OUTPUT/_lock` (run id, pid, host) before anything is written; a second
  run into the same output fails naming the holder; a lock left by a dead process of this host
  is taken over with a message;
- everything is computed under `OUTPUT/_staging/RUN_ID/`; staging folders of other (crashed)
  runs are removed only while holding the lock, so never those of a live run;
- `commit_unit` moves one finished unit in: its dead letters to `dead_letter/unit-N.parquet`,
  its data folder to `data/unit-N/` in one rename, then its record `_units/unit-N.json`,
  written last, commits it. A run deletes only files of its own names that no committed record
  lists (a unit's half-moved files from a killed run) or that an earlier record lists (replaced
  with --overwrite); it never deletes anything else in OUTPUT.
- `write_manifest` writes `run_manifest.json` (merged over the committed units) and the
  dataset card `README.md` (only when absent or written by babelcap).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from babelcap.core.shards import (
    DATA_DIR,
    DATASET_CARD,
    DEAD_LETTER_DIR,
    LOCK_FILE,
    RUN_MANIFEST,
    STAGING_DIR,
    UNITS_DIR,
    is_output,
)
from babelcap.pipelines.sinks import DEAD_LETTER_FILE, UNIT_RECORD

log = logging.getLogger(__name__)

MANIFEST = RUN_MANIFEST
CARD_MARKER = "<!-- babelcap:dataset-card -->"
_DATA_NAME = re.compile(r"^\w+-\d{5}-of-\d{5}\.parquet$")
_RUN_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")


class OutputError(ValueError):
    """The output folder is not one a run may write into."""


class OutputLockedError(RuntimeError):
    """Another run holds the output."""


class PublishGuardError(RuntimeError):
    """The run is empty or mostly failed: nothing of it is committed."""


# --- small FileSystems helpers ---------------------------------------------------------------
def _ls(folder: str, suffix: str = "") -> list[str]:
    try:
        metas = FileSystems.match([FileSystems.join(folder, "*")])[0].metadata_list
    except Exception:  # a folder that does not exist matches nothing
        return []
    return sorted(m.path for m in metas if m.path.endswith(suffix))


def _mkdirs(path: str) -> None:
    with contextlib.suppress(Exception):  # exists already, or object stores with no folders
        FileSystems.mkdirs(path)


def _as_dir(path: str) -> str:
    # Object stores delete a "folder" by prefix, which needs the trailing slash.
    return path.rstrip("/") + "/" if "://" in path else path


def read_json_file(path: str) -> Any:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read(64 * 1024 * 1024))


def write_json(path: str, payload: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    data = json.dumps(payload, indent=1, sort_keys=True, default=str).encode()
    if "://" in path:  # object stores: one object write is atomic
        with FileSystems.create(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    Path(tmp).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- checks ------------------------------------------------------------------------------------
def _glob_base(path: str) -> str:
    cut = min((path.find(c) for c in "*?[{" if c in path), default=-1)
    return os.path.dirname(path[:cut]) if cut >= 0 else path


def check_output(output: str, input_spec: str) -> str:
    """The output as an absolute path or URI, or OutputError saying why it is refused."""
    if not output or not output.strip():
        raise OutputError("--output is empty")
    if "://" in output:
        rest = output.split("://", 1)[1]
        if not rest.strip("/") or "/" not in rest.strip("/"):
            raise OutputError(f"--output {output}: a bucket root is refused; name a folder in it")
        return output.rstrip("/")
    path = Path(output).expanduser().resolve()
    if path == Path(path.anchor):
        raise OutputError(f"--output {output}: a filesystem root is refused")
    if path == Path.home().resolve():
        raise OutputError(f"--output {output}: the home folder is refused; name a folder in it")
    if "://" not in input_spec:
        source = Path(_glob_base(input_spec.removeprefix("file://"))).expanduser().resolve()
        if source == path or path in source.parents:
            raise OutputError(
                f"--output {output} contains the input {input_spec}: choose a folder outside it"
            )
    if path.exists() and not path.is_dir():
        raise OutputError(f"--output {output} exists and is not a folder")
    if path.is_dir() and not is_output(str(path)):
        for sub in (DATA_DIR, DEAD_LETTER_DIR):
            if (path / sub).is_dir() and any((path / sub).iterdir()):
                raise OutputError(
                    f"--output {output}: {sub}/ holds files babelcap did not write (no "
                    f"{RUN_MANIFEST} or {UNITS_DIR}/); choose another folder"
                )
    return str(path)


# --- the lock ----------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a killed child not yet reaped is a zombie: dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


class OutputLock:
    """`OUTPUT/_lock`: one run at a time per output. Local files are created exclusively
    (O_EXCL); on object stores the check-then-create is best effort."""

    def __init__(self, output: str, run_id: str):
        self.output = output
        self.run_id = run_id
        self.path = FileSystems.join(output, LOCK_FILE)
        self.held = False

    def _payload(self) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }
        ).encode()

    def _create(self) -> bool:
        if "://" in self.path:
            if FileSystems.exists(self.path):
                return False
            with FileSystems.create(self.path) as f:
                f.write(self._payload())
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload())
        return True

    def holder(self) -> dict[str, Any]:
        try:
            return read_json_file(self.path)
        except Exception:  # unreadable or vanished: say what we can
            return {}

    def acquire(self) -> None:
        _mkdirs(self.output)
        if self._create():
            self.held = True
            return
        holder = self.holder()
        local = holder.get("host") == socket.gethostname() and "://" not in self.path
        if local and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            log.warning(
                "taking over the lock of run %s (pid %s on %s is gone)",
                holder.get("run_id"),
                holder.get("pid"),
                holder.get("host"),
            )
            print(
                f"note: {self.path} was left by run {holder.get('run_id')} (pid "
                f"{holder.get('pid')}, no longer running); taking it over"
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            if self._create():
                self.held = True
                return
            holder = self.holder()
        raise OutputLockedError(
            f"{self.output} is being written by run {holder.get('run_id', '?')} (pid "
            f"{holder.get('pid', '?')} on {holder.get('host', '?')} since "
            f"{holder.get('since', '?')}); wait for it to finish, or delete {self.path} if "
            "that run is gone"
        )

    def release(self) -> None:
        if self.held and self.holder().get("run_id") == self.run_id:
            FileSystems.delete([self.path])
        self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_stale_staging(output: str, keep: str | None = None) -> None:
    """Remove staging folders of earlier (crashed) runs. Call only while holding the lock:
    then no live run owns any of them. Only folders named like a run id are touched."""
    root = FileSystems.join(output, STAGING_DIR)
    if "://" in root:  # object stores list objects: a run's folder is their first part
        names = {p[len(root) :].lstrip("/").split("/", 1)[0] for p in _ls_recursive(root)}
    else:
        names = {e.name for e in os.scandir(root) if e.is_dir()} if os.path.isdir(root) else set()
    for name in sorted(names):
        if name != keep and _RUN_ID.match(name):
            path = FileSystems.join(root, name)
            log.info("removing staging left by an earlier run: %s", path)
            FileSystems.delete([_as_dir(path)])


def _ls_recursive(folder: str) -> list[str]:
    try:
        metas = FileSystems.match([FileSystems.join(folder, "**")])[0].metadata_list
    except Exception:
        return []
    return [m.path for m in metas]


# --- units -------------------------------------------------------------------------------------
def read_staged_unit(staging_unit: str) -> dict[str, Any]:
    """unit.json of a finished staged unit (absent: the pipeline did not finish it)."""
    path = FileSystems.join(staging_unit, UNIT_RECORD)
    if not FileSystems.exists(path):
        raise RuntimeError(f"{path} missing: the pipeline did not finish this unit")
    return read_json_file(path)


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


def unit_record_path(output: str, name: str) -> str:
    return FileSystems.join(output, UNITS_DIR, f"{name}.json")


def remove_unit_files(output: str, name: str, record: Mapping[str, Any] | None = None) -> None:
    """Delete a unit's files: those its record lists, and files of its own names in its data
    folder and dead-letter file (left by a killed commit). Nothing else."""
    paths = [FileSystems.join(output, f["path"]) for f in (record or {}).get("files", [])]
    folder = FileSystems.join(output, DATA_DIR, name)
    paths += [p for p in _ls(folder) if _DATA_NAME.match(FileSystems.split(p)[1])]
    paths.append(FileSystems.join(output, DEAD_LETTER_DIR, f"{name}.parquet"))
    existing = sorted({p for p in paths if FileSystems.exists(p)})
    if existing:
        FileSystems.delete(existing)
    if "://" not in folder:
        with contextlib.suppress(OSError):  # only when empty: never a user's file in it
            os.rmdir(folder)


_UNIT_DATA = re.compile(r"^unit-\d{5}(-v\d+)?$")
_UNIT_DEAD = re.compile(r"^unit-\d{5}(-v\d+)?\.parquet$")


def remove_unreferenced(output: str, records: list[Mapping[str, Any]]) -> None:
    """Delete unit data folders and dead-letter files of babelcap's names that no committed
    record lists (left by a killed commit). Call only while holding the lock."""
    if "://" in output:
        return  # object stores: a killed commit's files are replaced when the unit is redone
    listed = {f["path"] for r in records for f in r.get("files", [])}
    data = Path(output, DATA_DIR)
    for folder in sorted(data.iterdir()) if data.is_dir() else []:
        if not (folder.is_dir() and _UNIT_DATA.match(folder.name)):
            continue
        for f in folder.iterdir():
            rel = f"{DATA_DIR}/{folder.name}/{f.name}"
            if _DATA_NAME.match(f.name) and rel not in listed:
                f.unlink()
        with contextlib.suppress(OSError):  # only when empty: never a user's file in it
            folder.rmdir()
    dead = Path(output, DEAD_LETTER_DIR)
    for f in sorted(dead.iterdir()) if dead.is_dir() else []:
        if _UNIT_DEAD.match(f.name) and f"{DEAD_LETTER_DIR}/{f.name}" not in listed:
            f.unlink()


def commit_unit(
    output: str,
    staging_unit: str,
    name: str,
    record: dict[str, Any],
    data_name: str | None = None,
    keep_files: list[dict[str, Any]] = (),
    dead_name: str | None = None,
) -> None:
    """Move a finished staged unit into OUTPUT and write its record (the commit, last).
    `data_name`: the data folder (a new version of a committed unit: `unit-N-vK`);
    `keep_files`: entries of the unit's earlier record that stay (its dead letters)."""
    data_name = data_name or name
    dead_name = dead_name or name
    if data_name == name:
        remove_unit_files(output, name)  # leftovers of a killed commit of this unit
    staged_data = FileSystems.join(staging_unit, DATA_DIR)
    target = FileSystems.join(output, DATA_DIR, data_name)
    files = []
    staged_files = _ls(staged_data, ".parquet")
    if staged_files:
        _mkdirs(FileSystems.join(output, DATA_DIR))
        if "://" in output:
            _mkdirs(target)
            FileSystems.rename(
                staged_files,
                [FileSystems.join(target, FileSystems.split(p)[1]) for p in staged_files],
            )
        else:
            os.rename(staged_data, target)  # one step: a glob sees all of the unit or none
    dead = FileSystems.join(staging_unit, DEAD_LETTER_FILE)
    dead_target = FileSystems.join(output, DEAD_LETTER_DIR, f"{dead_name}.parquet")
    for f in record["files"]:
        if f["kind"] == "shard":
            files.append({**f, "path": f"{DATA_DIR}/{data_name}/{f['name']}"})
        else:
            files.append({**f, "path": f"{DEAD_LETTER_DIR}/{dead_name}.parquet"})
    files += list(keep_files)
    if FileSystems.exists(dead):
        _mkdirs(FileSystems.join(output, DEAD_LETTER_DIR))
        FileSystems.rename([dead], [dead_target])
    record = {**record, "files": [{k: v for k, v in f.items() if k != "name"} for f in files]}
    _mkdirs(FileSystems.join(output, UNITS_DIR))
    write_json(unit_record_path(output, name), record)


def read_manifest(output: str) -> dict[str, Any]:
    """The run manifest of an output (FileNotFoundError: no run finished there)."""
    path = FileSystems.join(output, MANIFEST)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{path}: no run manifest (the output is incomplete)")
    return read_json_file(path)


def write_manifest(output: str, manifest: Mapping[str, Any], card: str | None) -> None:
    """run_manifest.json, and the dataset card unless a README.md of the user's is there."""
    write_json(FileSystems.join(output, MANIFEST), dict(manifest))
    if card is None:
        return
    path = FileSystems.join(output, DATASET_CARD)
    if FileSystems.exists(path):
        with FileSystems.open(path, compression_type="uncompressed") as f:
            ours = CARD_MARKER.encode() in f.read(1 << 20)
        if not ours:
            log.warning("%s exists and was not written by babelcap: dataset card not written", path)
            return
    with FileSystems.create(path) as f:
        f.write(card.encode())

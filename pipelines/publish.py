"""Owning an output: checks, the lock, staging, and committing units one at a time.

A run owns its output folder in these ways (README, "Output, dead letters and accounting"):

- `check_output` refuses a filesystem root, the home folder, a bucket root, an output that
  contains the input, and a folder whose `data/` or `dead_letter/` babelcap did not write. A
  `file://` output is a local path and gets every local check; an object-store output
  (`gs://b/data`) is refused at a bucket root or when it contains an input in the same bucket;
- `OutputLock` takes `OUTPUT/_lock` (run id, pid, host) before anything is written; a second
  run into the same output fails naming the holder; a lock left by a dead process of this host
  is taken over with a message, under `flock` and an inode check, so two runs finding the same
  dead holder never both take the output;
- everything is computed under `OUTPUT/_staging/RUN_ID/`; staging folders of other (crashed)
  runs are removed only while holding the lock, so never those of a live run;
- `commit_unit` moves one finished unit in: its dead letters to `dead_letter/unit-N.parquet`,
  its data folder to `data/unit-N/` in one rename, then its record `_units/unit-N.json`,
  written last, commits it. A run deletes only files of its own names that no committed record
  lists (a unit's half-moved files from a killed run) or that an earlier record lists (replaced
  with --overwrite); it never deletes anything else in OUTPUT. A record is believed only for
  its own unit's names (`own_file`): one listing anything else (`../x`, `/abs`, a user file)
  stops the run before anything is changed.
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
import time
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
from babelcap.pipelines.sinks import DEAD_LETTER_FILE, UNIT_RECORD, unit_name

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


def local_path(path: str) -> str | None:
    """The local path of a plain path or a `file://` URI (`file:///x`, `file://localhost/x`);
    None for any other URI, a `file://` URI of another host included."""
    if path.startswith("file://"):
        rest = path[len("file://") :]
        if rest.startswith("/"):
            return rest
        host, _, tail = rest.partition("/")
        return "/" + tail if host in ("", "localhost") else None
    return None if "://" in path else path


def _uri_parts(uri: str) -> tuple[str, list[str]]:
    """(scheme, [bucket, key parts...]) of an object-store URI, `//` and `.` dropped."""
    scheme, rest = uri.split("://", 1)
    return scheme.lower(), [p for p in rest.split("/") if p not in ("", ".")]


def check_output(output: str, input_spec: str) -> str:
    """The output as an absolute local path or a URI, or OutputError saying why it is refused.

    A `file://` output is a local path and gets the same checks (its local path is returned).
    Refused: a filesystem root, the home folder, a bucket root (`gs://bucket`), a folder that
    contains the input (local or in the same bucket), a path with `..` in an object-store URI,
    and a local folder whose `data/` or `dead_letter/` holds files babelcap did not write.
    """
    if not output or not output.strip():
        raise OutputError("--output is empty")
    local = local_path(output)
    if local is None:
        if output.startswith("file://"):
            raise OutputError(f"--output {output}: a file:// URI of another host is refused")
        return _check_object_output(output, input_spec)
    if not local.strip():
        raise OutputError(f"--output {output}: a filesystem root is refused")
    path = Path(local).expanduser().resolve()
    if path == Path(path.anchor):
        raise OutputError(f"--output {output}: a filesystem root is refused")
    if path == Path.home().resolve():
        raise OutputError(f"--output {output}: the home folder is refused; name a folder in it")
    source_local = local_path(input_spec)
    if source_local is not None:
        source = Path(_glob_base(source_local)).expanduser().resolve()
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


def _check_object_output(output: str, input_spec: str) -> str:
    scheme, parts = _uri_parts(output)
    if ".." in parts:
        raise OutputError(f"--output {output}: '..' in an object-store path is refused")
    if len(parts) < 2:
        raise OutputError(f"--output {output}: a bucket root is refused; name a folder in it")
    if "://" in input_spec and local_path(input_spec) is None:
        in_scheme, in_parts = _uri_parts(_glob_base(input_spec))
        if in_scheme == scheme and in_parts[: len(parts)] == parts:
            raise OutputError(
                f"--output {output} contains the input {input_spec}: choose a folder outside it"
            )
    return output.rstrip("/")


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
    """`OUTPUT/_lock`: one run at a time per output.

    Local outputs: the lock file appears whole and exclusively (written beside it, then
    hard-linked in, which fails when a lock is there; O_EXCL where links are not supported). A
    lock left by a dead process of this host is taken over under `flock` on that very file:
    the taker locks the open file, checks that `_lock` is still the file it judged (same inode)
    and only then unlinks it and links its own in, so two runs finding the same dead holder
    cannot both take the output (the second finds the first's live lock). Object stores: the
    check-then-create is best effort and a lock is never taken over.
    """

    _TAKEOVER_WAIT_S = 30.0  # how long to wait for another run's takeover of a stale lock

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
        """Create the lock with this run's payload, only if there is none; True if created."""
        if "://" in self.path:
            if FileSystems.exists(self.path):
                return False
            with FileSystems.create(self.path) as f:
                f.write(self._payload())
            return True
        tmp = f"{self.path}.{self.run_id}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._payload())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # atomic, whole, and only if no lock is there
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create exclusively, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return True

    def holder(self) -> dict[str, Any]:
        try:
            data = read_json_file(self.path)
        except Exception:  # unreadable or vanished: say what we can
            return {}
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: Mapping[str, Any]) -> bool:
        """Left by a process of this host that is gone."""
        return (
            "://" not in self.path
            and holder.get("host") == socket.gethostname()
            and isinstance(holder.get("pid"), int)
            and not isinstance(holder.get("pid"), bool)
            and holder["pid"] > 0
            and not _pid_alive(holder["pid"])
        )

    def _take_over(self) -> tuple[bool | None, dict[str, Any]]:
        """Try to replace a stale local lock: (True, {}) taken; (False, holder) a live run
        holds it; (None, {}) the lock changed under us (look again)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None, {}
        try:
            deadline = time.monotonic() + self._TAKEOVER_WAIT_S
            while True:  # another run may be taking this same stale lock over right now
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return False, self.holder()
                    time.sleep(0.05)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                return None, {}
            mine = os.fstat(fd)
            if (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
                return None, {}  # replaced since we opened it: judge the new one
            with os.fdopen(os.dup(fd), "rb") as f:
                try:
                    holder = json.loads(f.read(1 << 20))
                except ValueError:
                    holder = {}
            holder = holder if isinstance(holder, dict) else {}
            if not self._stale(holder):
                return False, holder
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
            os.unlink(self.path)  # still the stale file: we hold its flock and checked its inode
            if self._create():
                return True, {}
            return None, {}  # a fresh run created one in between: judge it
        finally:
            os.close(fd)

    def acquire(self) -> None:
        _mkdirs(self.output)
        holder: dict[str, Any] = {}
        for _ in range(20):
            if self._create():
                self.held = True
                return
            if "://" in self.path:
                holder = self.holder()
                break
            taken, holder = self._take_over()
            if taken:
                self.held = True
                return
            if taken is False:
                break
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
        if name != keep and _RUN_ID.fullmatch(name):
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


_UNIT_DATA = re.compile(r"^unit-\d{5,}(-v\d+)?$")
_UNIT_DEAD = re.compile(r"^unit-\d{5,}(-v\d+)?\.parquet$")
# The only paths a unit record may list (relative to OUTPUT): its data files and its dead letters.
_OWN_FILE = re.compile(
    r"^(?:data/(?P<data>unit-\d{5,})(?:-v\d+)?/\w+-\d{5}-of-\d{5}\.parquet"
    r"|dead_letter/(?P<dead>unit-\d{5,})(?:-v\d+)?\.parquet)$"
)


def own_file(output: str, rel: Any, unit: str | None = None) -> str:
    """OUTPUT/rel when `rel` is one of a run's own file names (`data/unit-N[-vK]/SPLIT-I-of-N
    .parquet` or `dead_letter/unit-N[-vK].parquet`, of unit `unit` when given), else
    OutputError: a record listing anything else was not written by babelcap and nothing it
    lists is deleted."""
    match = _OWN_FILE.fullmatch(rel) if isinstance(rel, str) else None
    if match is None or (unit is not None and (match["data"] or match["dead"]) != unit):
        of = f" of {unit}" if unit else ""
        raise OutputError(
            f"{FileSystems.join(output, UNITS_DIR)}: a unit record lists {str(rel)[:200]!r}, "
            f"which is not one of babelcap's own file names{of} in {output}; refusing to delete "
            f"it (the record was not written by babelcap: remove it, or choose another output)"
        )
    return FileSystems.join(output, rel)


def record_files(output: str, record: Mapping[str, Any], name: str | None = None) -> list[str]:
    """The full paths of the files a unit record lists, each checked by `own_file` (all of
    them before any is returned). `name`: the record's unit (default: from record["unit"])."""
    if name is None and isinstance(record.get("unit"), int):
        name = unit_name(record["unit"])
    files = record.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, Mapping) for f in files):
        raise OutputError(f"{output}: a unit record of {name} has a malformed file list")
    return [own_file(output, f.get("path"), name) for f in files]


def check_records(output: str, records: list[Mapping[str, Any]]) -> None:
    """OutputError unless every committed record lists only its own unit's files."""
    for record in records:
        record_files(output, record)


def remove_unit_files(output: str, name: str, record: Mapping[str, Any] | None = None) -> None:
    """Delete a unit's files: those its record lists (each checked to be one of the unit's own
    file names inside OUTPUT, all before anything is deleted), and files of its own names in
    its data folder and dead-letter file (left by a killed commit). Nothing else."""
    paths = record_files(output, record, name) if record else []
    folder = FileSystems.join(output, DATA_DIR, name)
    paths += [p for p in _ls(folder) if _DATA_NAME.fullmatch(FileSystems.split(p)[1])]
    paths.append(FileSystems.join(output, DEAD_LETTER_DIR, f"{name}.parquet"))
    existing = sorted({p for p in paths if FileSystems.exists(p)})
    if existing:
        FileSystems.delete(existing)
    if "://" not in folder:
        with contextlib.suppress(OSError):  # only when empty: never a user's file in it
            os.rmdir(folder)


def remove_unreferenced(output: str, records: list[Mapping[str, Any]]) -> None:
    """Delete unit data folders and dead-letter files of babelcap's names that no committed
    record lists (left by a killed commit). Call only while holding the lock, at the start of
    a run: it first checks every record (`check_records`), so a run over an output with a
    record that lists anything but its own files stops before it changes anything."""
    check_records(output, records)
    if "://" in output:
        return  # object stores: a killed commit's files are replaced when the unit is redone
    listed = {f["path"] for r in records for f in r.get("files", [])}
    data = Path(output, DATA_DIR)
    for folder in sorted(data.iterdir()) if data.is_dir() else []:
        if not (folder.is_dir() and _UNIT_DATA.fullmatch(folder.name)):
            continue
        for f in folder.iterdir():
            rel = f"{DATA_DIR}/{folder.name}/{f.name}"
            if _DATA_NAME.fullmatch(f.name) and rel not in listed:
                f.unlink()
        with contextlib.suppress(OSError):  # only when empty: never a user's file in it
            folder.rmdir()
    dead = Path(output, DEAD_LETTER_DIR)
    for f in sorted(dead.iterdir()) if dead.is_dir() else []:
        if _UNIT_DEAD.fullmatch(f.name) and f"{DEAD_LETTER_DIR}/{f.name}" not in listed:
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

"""Translation memory: a sentence already translated (same model, language pair, decoding
options and normalised text) is not translated again.

Two levels: an in-process LRU (`collections.OrderedDict`) and an optional on-disk SQLite
cache that survives runs and is shared by processes on one machine (stdlib `sqlite3`, WAL).
The object pickles without its connections and lock, so it can travel to Beam workers.

Safe with Beam's threads and processes: Beam runs bundles on a thread pool, so each thread
gets its own SQLite connection (`threading.local`; a connection may not cross threads) and
the LRU and counters are guarded by one lock. Several processes writing one file wait for
each other (WAL, `busy_timeout`) and a write that still finds the database locked is retried
with backoff; a lookup that fails that way is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


def normalize(text: str) -> str:
    """The form sentences are compared in: NFC, trimmed, runs of whitespace as one space.
    Case and punctuation are kept: they change translations."""
    return " ".join(unicodedata.normalize("NFC", text).split())


@dataclass(frozen=True)
class MemoryKey:
    model_id: str
    src: str
    tgt: str
    options: str  # decoding options that change the output (beam size, hypotheses)
    text: str  # normalised

    def digest(self) -> str:
        raw = "\x1f".join((self.model_id, self.src, self.tgt, self.options, self.text))
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()


class TranslationMemory:
    """LRU of `capacity` entries in front of an optional SQLite file at `path`."""

    # How long one statement waits for another process's write lock, and how often a write
    # that still failed with "database is locked" is retried.
    BUSY_TIMEOUT_S = 30.0
    LOCKED_RETRIES = 5

    def __init__(self, capacity: int = 100_000, path: str | Path | None = None) -> None:
        self.capacity = capacity
        self.path = Path(path) if path else None
        self._lru: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []  # every thread's, for close()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_lock", "_local", "_connections"):
            del state[name]
        state["_lru"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections = []

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    def _conn(self) -> sqlite3.Connection | None:
        """This thread's connection (opened on first use)."""
        if self.path is None:
            return None
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Used by its own thread only; check_same_thread=False just lets close() (from any
            # thread) release it.
            db = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_S, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout={int(self.BUSY_TIMEOUT_S * 1000)}")
            self._retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            self._retry_locked(
                lambda: db.execute(
                    "CREATE TABLE IF NOT EXISTS memory (key TEXT PRIMARY KEY, model TEXT, "
                    "src TEXT, tgt TEXT, text TEXT, output TEXT)"
                )
            )
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def _retry_locked(self, op):
        """Run `op`, retrying while another process holds the database lock."""
        for attempt in range(self.LOCKED_RETRIES + 1):
            try:
                return op()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if attempt == self.LOCKED_RETRIES:
                    raise
                time.sleep(0.05 * 2**attempt)
        return None

    def _remember(self, digest: str, value: list[str]) -> None:
        """Put one entry in the LRU; the caller holds the lock."""
        if self.capacity <= 0:
            return
        self._lru[digest] = value
        self._lru.move_to_end(digest)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def get_many(self, keys: list[MemoryKey]) -> list[list[str] | None]:
        """Look keys up (LRU first, then disk); counts hits and misses."""
        digests = [k.digest() for k in keys]
        out: list[list[str] | None] = []
        missing: dict[str, int] = {}
        with self._lock:
            for i, d in enumerate(digests):
                value = self._lru.get(d)
                if value is not None:
                    self._lru.move_to_end(d)
                else:
                    missing[d] = i
                out.append(value)
        found: dict[str, list[str]] = {}
        db = self._conn()
        if db is not None and missing:
            todo = list(missing)
            for start in range(0, len(todo), 500):  # SQLite's host-parameter limit
                chunk = todo[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, output FROM memory WHERE key IN ({marks})"
                try:
                    rows = self._retry_locked(lambda q=query, c=chunk: db.execute(q, c).fetchall())
                except sqlite3.OperationalError:
                    rows = []  # still locked: a miss (translated again), never an error
                found.update((k, json.loads(v)) for k, v in rows)
            for d, value in found.items():
                out[missing[d]] = value
        hits = sum(v is not None for v in out)
        with self._lock:
            for d, value in found.items():
                self._remember(d, value)
            self.disk_hits += len(found)
            self.hits += hits
            self.misses += len(out) - hits
        return out

    def put_many(self, items: list[tuple[MemoryKey, list[str]]]) -> None:
        rows = []
        with self._lock:
            for key, value in items:
                d = key.digest()
                self._remember(d, value)
                rows.append((d, key.model_id, key.src, key.tgt, key.text, json.dumps(value)))
        db = self._conn()
        if db is not None and rows:

            def write() -> None:
                with db:
                    db.executemany("INSERT OR REPLACE INTO memory VALUES (?, ?, ?, ?, ?, ?)", rows)

            self._retry_locked(write)

    def close(self) -> None:
        """Close every thread's connection (call when no thread uses the memory any more)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()

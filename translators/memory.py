"""Translation memory: a sentence already translated (same model, language pair, decoding
options and normalised text) is not translated again.

Two levels: an in-process LRU (`collections.OrderedDict`) and an optional on-disk SQLite
cache that survives runs and is shared by processes on one machine (stdlib `sqlite3`, WAL).
The object pickles without its connection, so it can travel to Beam workers.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
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

    def __init__(self, capacity: int = 100_000, path: str | Path | None = None) -> None:
        self.capacity = capacity
        self.path = Path(path) if path else None
        self._lru: OrderedDict[str, list[str]] = OrderedDict()
        self._db: sqlite3.Connection | None = None
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_db"] = None
        state["_lru"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self._lru)

    def _conn(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS memory (key TEXT PRIMARY KEY, model TEXT, src TEXT, "
                "tgt TEXT, text TEXT, output TEXT)"
            )
        return self._db

    def _remember(self, digest: str, value: list[str]) -> None:
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
        for i, d in enumerate(digests):
            value = self._lru.get(d)
            if value is not None:
                self._lru.move_to_end(d)
            else:
                missing[d] = i
            out.append(value)
        db = self._conn()
        if db is not None and missing:
            found: dict[str, list[str]] = {}
            todo = list(missing)
            for start in range(0, len(todo), 500):  # SQLite's host-parameter limit
                chunk = todo[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, output FROM memory WHERE key IN ({marks})", chunk)
                found.update((k, json.loads(v)) for k, v in rows)
            for d, value in found.items():
                out[missing[d]] = value
                self._remember(d, value)
            self.disk_hits += len(found)
        hits = sum(v is not None for v in out)
        self.hits += hits
        self.misses += len(out) - hits
        return out

    def put_many(self, items: list[tuple[MemoryKey, list[str]]]) -> None:
        rows = []
        for key, value in items:
            d = key.digest()
            self._remember(d, value)
            rows.append((d, key.model_id, key.src, key.tgt, key.text, json.dumps(value)))
        db = self._conn()
        if db is not None and rows:
            with db:
                db.executemany("INSERT OR REPLACE INTO memory VALUES (?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

"""The translation memory under Beam's concurrency: bundles on a thread pool share one
TranslationMemory (SQLite connection per thread, LRU under a lock), and several worker
processes write one SQLite file at once (WAL, busy_timeout, retry on "database is locked").
Real threads, real processes, a real SQLite file."""

from __future__ import annotations

import multiprocessing
import pickle
import sqlite3
import threading

from babelcap.translators.memory import MemoryKey, TranslationMemory


def _key(i: int, tgt: str = "pt") -> MemoryKey:
    return MemoryKey("model", "en", tgt, "beam=1", f"sentence {i}")


def test_threads_share_one_memory(tmp_path):
    """The old memory opened its connection in the first thread and every other thread's
    lookups failed (sqlite3.ProgrammingError); the LRU raced."""
    memory = TranslationMemory(capacity=50, path=tmp_path / "m.sqlite")
    memory.put_many([(_key(0), ["frase 0"])])  # the connection of the main thread exists first
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(t * 40, t * 40 + 40):
                memory.put_many([(_key(i), [f"frase {i}"])])
                got = memory.get_many([_key(i), _key(0), _key(10_000 + i)])
                assert got[0] == [f"frase {i}"] and got[1] == ["frase 0"] and got[2] is None
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(memory) <= 50  # the LRU bound holds under concurrency
    assert memory.hits + memory.misses == 8 * 40 * 3
    assert memory.misses == 8 * 40  # exactly the never-written keys
    memory.close()
    # everything reached the file, from every thread's connection
    db = sqlite3.connect(tmp_path / "m.sqlite")
    assert db.execute("SELECT count(*) FROM memory").fetchone()[0] == 8 * 40
    db.close()


def _writer(path: str, proc: int, n: int, queue) -> None:
    try:
        memory = TranslationMemory(capacity=0, path=path)  # no LRU: every call hits SQLite
        for i in range(n):
            memory.put_many([(_key(proc * n + i), [f"p{proc} {i}"])])
            shared = memory.get_many([_key(-1)])[0]
            assert shared is None or shared == ["shared"]
            memory.put_many([(_key(-1), ["shared"])])  # every process writes one hot row too
        memory.close()
        queue.put(None)
    except BaseException as exc:
        queue.put(repr(exc))


def test_processes_write_one_file_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    TranslationMemory(path=path).close()  # created once; the writers race from here
    ctx = multiprocessing.get_context("spawn")  # as Beam's multi-process workers do
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, p, 60, queue)) for p in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [None] * 4, results
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM memory").fetchone()[0] == 4 * 60 + 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = TranslationMemory(path=path)
    assert again.get_many([_key(3 * 60 + 7)]) == [["p3 7"]]
    again.close()


def test_memory_pickles_without_connections_or_lock(tmp_path):
    memory = TranslationMemory(path=tmp_path / "m.sqlite")
    memory.put_many([(_key(1), ["um"])])
    clone = pickle.loads(pickle.dumps(memory))  # what Beam does to ship a DoFn
    assert len(clone) == 0  # the LRU does not travel
    assert clone.get_many([_key(1)]) == [["um"]]  # the file does
    assert clone.disk_hits == 1
    memory.close()
    clone.close()


def test_real_engine_translates_from_many_threads_with_a_disk_memory(tmp_path):
    """What Beam does: one shared engine (RunInference's shared handle), bundles on a thread
    pool, the SQLite memory on. Every thread gets the single-threaded answers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    import pipeline_testkit as kit

    from babelcap.translators import Translator

    ct2 = kit.tiny_translator(tmp_path / "tr", languages=("pt",))
    sentences = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "star")]
    reference = Translator(ct2, max_decoding_length=6, memory_size=0).translate(
        sentences, "en", "pt"
    )
    engine = Translator(ct2, max_decoding_length=6, cache_path=str(tmp_path / "m.sqlite"))
    errors: list[BaseException] = []
    answers: list[list[str]] = []
    start = threading.Barrier(6)

    def work(t: int) -> None:
        try:
            start.wait()
            for _ in range(5):
                order = sentences[t % 6 :] + sentences[: t % 6]
                out = engine.translate(order, "en", "pt")
                answers.append([out[order.index(s)] for s in sentences])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.unload()
    assert not errors, errors[:3]
    assert len(answers) == 30 and all(a == reference for a in answers)
    assert engine.memory.hits > 0

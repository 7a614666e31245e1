"""Bad input never stops a run (issue 13, the input half): manifests, tars and paths that real
users have, built here, read by the real readers and run through the real pipeline.

- Readers one by one (fast): each defect of the issue, with the dead-letter kind it gets.
- `test_pipeline_*`: the real Beam pipeline (multi-process local runner, 2 workers) over a
  manifest with every bad row plus good ones, and (in process) over a folder of bad tars:
  the job succeeds, every good input is one row, every input is accounted for, nothing
  outside the output folder changes.
- `test_memory_bound_*`: a real subprocess reads a sparse 1 GiB tar member, a gzip bomb named
  `.tar` and an oversized member of a `.tar.gz`; gzip bombs named `.jsonl.gz` and `.csv.gz`;
  a Hugging Face Parquet manifest with oversized embedded images and an oversized row group:
  its peak RSS (VmHWM) stays under a stated bound.
- Transient errors while a manifest or tar is streamed (a Beam filesystem that cuts the
  connection half way) are retried where the stream broke; a planned input the reader never
  came to is a `not_read` dead letter that `--retry-failed` reads again (real pipeline).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import posixpath
import stat
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path
from typing import ClassVar

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import FileSystem
from PIL import Image

from babelcap.core.shards import find_shards
from babelcap.pipelines import accounting, sources
from babelcap.pipelines.deadletter import PERMANENT_READ_KINDS, TRANSIENT_KINDS, is_transient
from babelcap.pipelines.options import AugmentConfig
from babelcap.pipelines.sources import ReadBytes, detect_format

REPO = Path(__file__).resolve().parents[1]


def _png(i: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i + 7) % 256)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _expand(cfg: AugmentConfig) -> tuple[list[dict], list[dict]]:
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    import pipeline_testkit as kit

    return kit.expand_input(cfg)


def _read(rec: dict, **kw) -> tuple[dict | None, dict | None]:
    """(record, dead-letter row) from ReadBytes on one record."""
    (out,) = list(ReadBytes(kw.pop("max_file_bytes", 1 << 20), **kw).process(rec))
    if isinstance(out, beam.pvalue.TaggedOutput):
        return None, out.value["row"]
    return out, None


def _rec(uri: str) -> dict:
    return {"input_ref": uri, "uri": uri, "data": None, "stats": {}}


# --- manifests ------------------------------------------------------------------------------
def test_jsonl_splits_on_newline_only_and_keeps_line_numbers(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    rows = [
        {"image_path": "a.png", "caption": "a red\u2028square"},  # U+2028 LINE SEPARATOR
        {"image_path": "a.png", "caption": "next\u0085line"},  # U+0085 NEXT LINE
        {"image_path": "a.png", "caption": "vertical\x0btab"},
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "m.jsonl").write_text(text, encoding="utf-8")
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "m.jsonl"), output="o"))
    assert dead == []
    assert [r["input_ref"].rsplit("#", 1)[1] for r in recs] == ["L1", "L2", "L3"]
    assert recs[0]["source_caption"] == "a red\u2028square"


def test_jsonl_bad_rows_are_dead_letters_and_the_rest_goes_on(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    good = json.dumps({"image_path": "a.png", "caption": "fine"})
    lines = [
        "[" * 100_000 + "]" * 100_000,  # deeper than the recursion limit
        json.dumps({"image_path": "a.png", "caption": "x" * (sources.MAX_ROW_BYTES + 10)}),
        json.dumps({"image_path": 42}),  # a path that is not a string
        json.dumps({"image_path": "a.png", "language": ["en", "pt"]}),  # language a list
        json.dumps({"image_path": "a.png", "language": 7}),  # language a number
        json.dumps({"image_path": "a.png", "split": 3}),
        json.dumps({"image_path": "a.png", "caption": 12}),  # caption not text: image kept
        "[1, 2]",
        "{not json",
        good,
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "m.jsonl"), output="o"))
    by_line = {int(d["input_ref"].rsplit("#L", 1)[1]): d for d in dead}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 8, 9]
    assert all(d["error_kind"] == "bad_manifest_row" for d in dead)
    assert "nested too deeply" in by_line[1]["message"]
    assert "longer than" in by_line[2]["message"]
    assert "string" in by_line[3]["message"] and "int" in by_line[3]["message"]
    assert "language must be a string code, not list" in by_line[4]["message"]
    assert [r["input_ref"].rsplit("#", 1)[1] for r in recs] == ["L7", "L10"]
    assert recs[0]["source_caption_error"] == "not_text"
    assert recs[1]["source_caption"] == "fine"
    # every line is one input
    assert sum(r["stats"][accounting.INPUTS] for r in recs) + len(dead) == len(lines)


def test_csv_with_bom_huge_fields_and_compression(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image_path", "caption", "lang"])
    w.writerow(["a.png", "over the csv module's default limit " + "y" * 200_000, "en"])
    w.writerow(["a.png", "multi\nline " + "z\n" * (sources.MAX_ROW_BYTES // 2 + 10), "en"])
    w.writerow(["a.png", "um quadrado", "pt-BR"])
    data = buf.getvalue().encode("utf-8-sig")  # a spreadsheet's byte-order mark
    (tmp_path / "m.csv").write_bytes(data)
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(data))
    for name in ("m.csv", "m.csv.gz"):
        assert detect_format(str(tmp_path / name)) == "manifest"
        recs, dead = _expand(AugmentConfig(input=str(tmp_path / name), output="o"))
        # the 200k-character field is read (its caption is dropped later as too long)
        assert recs[0]["input_ref"].endswith("#L2") and len(recs[0]["source_caption"]) > 200_000
        # the field over the bounded limit: that row alone is a dead letter
        assert [d["error_kind"] for d in dead] == ["bad_manifest_row"]
        assert dead[0]["input_ref"].endswith("#L3")
        assert recs[-1]["source_caption"] == "um quadrado"
        assert recs[-1]["source_language"] == "pt" and recs[-1]["source_language_given"] == "pt-BR"


def test_compressed_jsonl_manifest_is_a_manifest_not_a_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(1))
    line = json.dumps({"image_path": "img/a.png", "caption": "a square"}) + "\n"
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(line.encode() * 3))
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "m.jsonl.gz"), output="o"))
    assert len(recs) == 3 and not dead
    assert recs[0]["uri"] == str(tmp_path / "img" / "a.png")
    # a file of a kind nobody knows is a dead letter that says so, not an empty folder
    (tmp_path / "m.txt").write_text("img/a.png\n")
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "m.txt"), output="o"))
    assert not recs and [d["error_kind"] for d in dead] == ["unknown_input"]


def test_cut_or_missing_manifest_keeps_what_was_read(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    line = json.dumps({"image_path": "a.png", "caption": "a square"}) + "\n"
    blob = gzip.compress((line * 2000).encode())
    (tmp_path / "m.jsonl.gz").write_bytes(blob[: len(blob) // 2])  # a download cut short
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "m.jsonl.gz"), output="o"))
    # the rows before the cut are kept; the rest is one dead letter saying the file is cut
    assert recs and [d["error_kind"] for d in dead] == ["bad_manifest"]
    assert dead[0]["input_ref"].endswith(f"#after:L{len(recs)}")
    assert "ends before its end marker" in dead[0]["message"]
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "gone.jsonl"), output="o"))
    assert not recs and [d["error_kind"] for d in dead] == ["missing_file"]


COMPRESSORS = {
    "gz": lambda b: gzip.compress(b[: len(b) // 2]) + gzip.compress(b[len(b) // 2 :]),
    "bz2": lambda b: __import__("bz2").compress(b),
    "xz": lambda b: __import__("lzma").compress(b),
    "lzma": lambda b: __import__("lzma").compress(b, format=__import__("lzma").FORMAT_ALONE),
    "deflate": lambda b: __import__("zlib").compress(b),
    "zst": lambda b: __import__("zstandard").ZstdCompressor().compress(b),
    "zstd": lambda b: __import__("zstandard").ZstdCompressor().compress(b),
}


@pytest.mark.parametrize("ext", sorted(COMPRESSORS))
def test_compressed_manifests_are_inflated_a_bounded_step_at_a_time(tmp_path, ext):
    """Every compression Beam names by extension is a manifest (`.zstd` and `.lzma` were
    `unknown_input`), read through `_Inflate` / zstd's stream reader: no read inflates more
    than asked, whatever the ratio (Beam's CompressedFile inflated 16 MiB of input at once)."""
    if ext.startswith("zst"):
        pytest.importorskip("zstandard")
    (tmp_path / "a.png").write_bytes(_png(1))
    lines = [json.dumps({"image_path": "a.png", "caption": f"c{i}"}) for i in range(3)]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / f"m.jsonl.{ext}"
    path.write_bytes(COMPRESSORS[ext](data))  # gzip: two members, read as one file
    assert detect_format(str(path)) == "manifest"
    recs, dead = _expand(AugmentConfig(input=str(path), output="o"))
    assert [r["source_caption"] for r in recs] == ["c0", "c1", "c2"] and not dead
    # a bomb: 16 MiB of zeros in a few KB; every read returns at most what was asked
    bomb = tmp_path / f"bomb.{ext}"
    bomb.write_bytes(COMPRESSORS[ext](bytes(16 << 20)))
    assert bomb.stat().st_size < 1 << 20
    with sources.open_stream(str(bomb), sources.compression_of(str(bomb))) as f:
        total, largest = 0, 0
        while chunk := f.read(1 << 16):
            total, largest = total + len(chunk), max(largest, len(chunk))
    assert total == 16 << 20 and largest <= 1 << 16


def test_a_corrupt_or_oversized_compressed_stream_is_a_dead_letter(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(_png(1))
    line = json.dumps({"image_path": "a.png"}) + "\n"
    (tmp_path / "junk.jsonl.gz").write_bytes(gzip.compress(line.encode()) + b"not gzip at all")
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "junk.jsonl.gz"), output="o"))
    assert len(recs) == 1 and [d["error_kind"] for d in dead] == ["bad_manifest"]
    # an xz header asking for a dictionary over the decoder's memory limit: refused, not
    # allocated
    import lzma

    monkeypatch.setattr(sources, "MAX_DECODER_BYTES", 1 << 20)  # xz's default asks for 8 MiB
    (tmp_path / "big.jsonl.xz").write_bytes(lzma.compress(line.encode() * 3))
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "big.jsonl.xz"), output="o"))
    assert not recs and [d["error_kind"] for d in dead] == ["bad_manifest"]
    assert "limit" in dead[0]["message"].lower()


def test_hugging_face_parquet_image_struct(tmp_path):
    table = pa.table(
        {
            "image": [
                {"bytes": _png(1), "path": "cat.png"},
                {"bytes": None, "path": "img/dog.png"},
                {"bytes": None, "path": None},
            ],
            "text": ["a cat", "a dog", "nothing"],
            "lang": ["en-US", "en", "en"],
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=1)
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "hf.parquet"), output="o"))
    assert recs[0]["data"] == _png(1) and recs[0]["uri"] == "cat.png"
    assert recs[0]["source_language"] == "en"
    assert recs[1]["data"] is None and recs[1]["uri"] == str(tmp_path / "img" / "dog.png")
    assert [d["error_kind"] for d in dead] == ["bad_manifest_row"]


def test_parquet_embedded_bytes_are_bounded_before_they_are_copied(tmp_path, monkeypatch):
    """An embedded image over max_file_bytes is refused from its Arrow length, before the row
    is turned into Python objects; a row group whose columns are over the group limit (from
    the footer) is refused without being read; the other rows are read. (The memory this
    saves is measured in `test_memory_bound_on_parquet_and_compressed_manifests`.)"""
    table = pa.table(
        {
            "image": [
                {"bytes": _png(1), "path": "a.png"},
                {"bytes": b"\0" * 5000, "path": "big.png"},
                {"bytes": _png(2), "path": "b.png"},
                {"bytes": _png(3), "path": "c.png"},
            ],
            "text": ["a", "big", "b", "c"],
        }
    )
    path = tmp_path / "hf.parquet"
    pq.write_table(table, path, row_group_size=2)
    image, other = sources._parquet_sizes(table.to_batches()[0], "image")
    assert image == [len(_png(1)), 5000, len(_png(2)), len(_png(3))]
    assert other == [len("a.png") + 1, len("big.png") + 3, len("b.png") + 1, len("c.png") + 1]
    recs, dead = _expand(AugmentConfig(input=str(path), output="o", max_file_bytes=4000))
    assert [r["uri"] for r in recs] == ["a.png", "b.png", "c.png"]
    assert [(d["input_ref"].rsplit("#", 1)[1], d["error_kind"]) for d in dead] == [
        ("L2", "file_too_large")
    ]
    assert "embedded image of 5000 bytes" in dead[0]["message"]
    # a row group over the limit (lowered here) is refused from the footer, each row counted
    monkeypatch.setattr(sources, "PARQUET_GROUP_BYTES", 5000)
    assert sources.parquet_group_limit(1000) == 5000
    recs, dead = _expand(AugmentConfig(input=str(path), output="o", max_file_bytes=1000))
    kinds = [(d["input_ref"].rsplit("#", 1)[1], d["error_kind"]) for d in dead]
    assert kinds == [("L1", "file_too_large"), ("L2", "file_too_large")]
    assert "row group 0" in dead[0]["message"]
    assert [r["uri"] for r in recs] == ["b.png", "c.png"]


def test_language_codes_are_normalised_once_at_the_source(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    langs = ["en-US", "pt-BR", "pt_BR", "por", "EN", "xx-YY", ""]
    rows = [{"image_path": "a.png", "caption": "c", "language": x} for x in langs]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = AugmentConfig(input=str(tmp_path / "m.jsonl"), output="o", source_language="en-GB")
    recs, _ = _expand(cfg)
    assert [r["source_language"] for r in recs] == ["en", "pt", "pt", "pt", "en", "xx-YY", "en"]
    assert recs[5]["stats"].get("read.language_unknown") == 1  # kept as given, and counted
    assert recs[0]["stats"].get("read.language_normalised") == 1
    assert recs[0]["source_language_given"] == "en-US"


def test_relative_paths_stay_inside_the_manifest_folder(tmp_path):
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "a.png").write_bytes(_png(1))
    (tmp_path / "secret.png").write_bytes(_png(2))
    rows = [
        {"image_path": "a.png"},
        {"image_path": "sub/../a.png"},  # climbs, but stays inside
        {"image_path": "../secret.png"},
        {"image_path": "sub/../../secret.png"},
        {"image_path": str(tmp_path / "secret.png")},  # absolute: the user's explicit choice
        {"image_path": "file://" + str(tmp_path / "secret.png")},  # a URI likewise
    ]
    (inside / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, dead = _expand(AugmentConfig(input=str(inside / "m.jsonl"), output="o"))
    assert [d["error_kind"] for d in dead] == ["path_outside_manifest"] * 2
    assert [r["uri"] for r in recs][:2] == [str(inside / "a.png")] * 2
    assert len(recs) == 4
    cfg = AugmentConfig(input=str(inside / "m.jsonl"), output="o", allow_outside_paths=True)
    recs, dead = _expand(cfg)
    assert not dead and recs[2]["uri"] == str(tmp_path / "secret.png")


def test_symlinks_do_not_let_manifest_paths_escape(tmp_path):
    """A symlink inside the manifest's folder (a folder `imgs -> /`-like, or one file) does
    not make a file outside readable; a link that stays inside, and a manifest reached through
    a linked folder, are fine; `allow_outside_paths` lets the links through."""
    inside, outside = tmp_path / "data", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.png").write_bytes(_png(1))
    (outside / "secret.png").write_bytes(_png(2))
    (inside / "imgs").symlink_to(outside)  # a folder link pointing out
    (inside / "leak.png").symlink_to(outside / "secret.png")  # a file link pointing out
    (inside / "alias.png").symlink_to(inside / "a.png")  # a link that stays inside
    (inside / "sub").mkdir()
    (inside / "sub" / "up").symlink_to(tmp_path)  # `sub/up/..` is not `sub` for the OS
    rows = [
        {"image_path": "imgs/secret.png"},
        {"image_path": "leak.png"},
        {"image_path": "alias.png"},
        {"image_path": "sub/up/elsewhere/secret.png"},
        {"image_path": "a.png"},
    ]
    (inside / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, dead = _expand(AugmentConfig(input=str(inside / "m.jsonl"), output="o"))
    kinds = {int(d["input_ref"].rsplit("#L", 1)[1]): d["error_kind"] for d in dead}
    assert kinds == {
        1: "path_outside_manifest",
        2: "path_outside_manifest",
        4: "path_outside_manifest",
    }
    assert "symlink" in dead[0]["message"]
    assert [r["uri"] for r in recs] == [str(inside / "alias.png"), str(inside / "a.png")]
    # the manifest's folder reached through a link: its files are inside it
    (tmp_path / "linked").symlink_to(inside)
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "linked" / "m.jsonl"), output="o"))
    assert len(recs) == 2 and len(dead) == 3
    cfg = AugmentConfig(input=str(inside / "m.jsonl"), output="o", allow_outside_paths=True)
    recs, dead = _expand(cfg)
    assert not dead and len(recs) == 5


def test_allow_outside_paths_is_a_cli_flag():
    import argparse

    from babelcap.commands.augment import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--input", "m.jsonl", "--output", "o"]
    assert not config_from_args(parser.parse_args(base)).allow_outside_paths
    args = parser.parse_args([*base, "--allow-outside-paths"])
    assert config_from_args(args).allow_outside_paths


# --- reading bytes --------------------------------------------------------------------------
def test_non_regular_files_are_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    results: dict[str, dict | None] = {}

    def read_all() -> None:
        for name in ("pipe.png", "folder.png", "missing.png"):
            results[name] = _read(_rec(str(tmp_path / name)))[1]

    t = threading.Thread(target=read_all, daemon=True)
    t.start()
    t.join(timeout=60)  # opening the FIFO for reading would block here forever
    assert not t.is_alive(), "the reader blocked on a FIFO"
    assert results["pipe.png"]["error_kind"] == "not_a_regular_file"
    assert "FIFO" in results["pipe.png"]["message"]
    assert results["folder.png"]["error_kind"] == "not_a_regular_file"
    assert results["missing.png"]["error_kind"] == "missing_file"
    if os.path.exists("/dev/zero"):  # a device: endless bytes, never read
        assert _read(_rec("/dev/zero"))[1]["error_kind"] == "not_a_regular_file"


def test_reads_are_bounded_always(tmp_path):
    (tmp_path / "big.png").write_bytes(b"\0" * 5000)
    assert _read(_rec(str(tmp_path / "big.png")), max_file_bytes=4000)[1]["error_kind"] == (
        "file_too_large"
    )
    carried = {**_rec("m#L1"), "data": b"\0" * 5000}  # bytes that came in with the record
    assert _read(carried, max_file_bytes=4000)[1]["error_kind"] == "file_too_large"


class FlakyFileSystem(FileSystem):
    """A Beam filesystem (`flaky://N/name`) whose first N opens of each path fail with a
    connection reset, the way an object store does under load. Registered with Beam's
    FileSystems like any filesystem plugin (by subclassing)."""

    calls: ClassVar[dict[str, int]] = {}

    @classmethod
    def scheme(cls) -> str:
        return "flaky"

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        FlakyFileSystem.calls[path] = FlakyFileSystem.calls.get(path, 0) + 1
        fails = int(path.split("://", 1)[1].split("/", 1)[0])
        if FlakyFileSystem.calls[path] <= fails:
            raise ConnectionResetError(104, "Connection reset by peer")
        return io.BytesIO(_png(3))


# Only `open` is used by ReadBytes; the other methods keep FileSystem's NotImplementedError.
FlakyFileSystem.__abstractmethods__ = frozenset()


def test_cloud_client_errors_are_classified_transient_or_permanent():
    """The errors object-store clients raise (google.api_core, botocore, requests, http.client)
    are classified by their class, HTTP status or error code, without importing the clients."""
    import http.client

    from apache_beam.io.filesystem import BeamIOError

    def api_error(name: str, code: int) -> Exception:  # google.api_core.exceptions.*
        return type(name, (Exception,), {"code": code})("boom")

    class ClientError(Exception):  # botocore.exceptions.ClientError
        def __init__(self, code: str, status: int):
            super().__init__(code)
            self.response = {
                "Error": {"Code": code},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }

    class HTTPError(OSError):  # requests.exceptions.HTTPError
        def __init__(self, status: int):
            super().__init__(f"{status}")
            self.response = type("Response", (), {"status_code": status})()

    classify = sources.classify_read_error
    transient = [
        http.client.IncompleteRead(b"partial"),
        http.client.RemoteDisconnected("closed"),
        api_error("DeadlineExceeded", 504),
        api_error("ServiceUnavailable", 503),
        api_error("TooManyRequests", 429),
        ClientError("SlowDown", 503),
        ClientError("ThrottlingException", 400),
        ClientError("InternalError", 500),
        HTTPError(503),
        ConnectionError("reset"),
        TimeoutError("timed out"),
        type("TransportError", (Exception,), {})("google.auth"),
        BeamIOError("open failed", {"gs://b/x": ConnectionResetError(104, "reset")}),
    ]
    for exc in transient:
        assert classify(exc) == ("read_error", True), exc
    permanent = {
        "missing_file": [api_error("NotFound", 404), ClientError("NoSuchKey", 404), HTTPError(404)],
        "permission_denied": [api_error("Forbidden", 403), ClientError("AccessDenied", 403)],
        "unreadable": [api_error("BadRequest", 400), ValueError("no"), HTTPError(416)],
    }
    for kind, excs in permanent.items():
        for exc in excs:
            assert classify(exc) == (kind, False), exc


def test_transient_read_errors_are_retried_then_dead_lettered_as_transient():
    FlakyFileSystem.calls.clear()
    rec, dead = _read(_rec("flaky://2/a.png"), retries=3, backoff_s=0)
    assert dead is None and rec["data"] == _png(3)
    assert rec["stats"]["read.retried"] == 1 and FlakyFileSystem.calls["flaky://2/a.png"] == 3
    rec, dead = _read(_rec("flaky://99/b.png"), retries=3, backoff_s=0)
    assert dead["error_kind"] == "read_error" and "after 4 attempts" in dead["message"]
    assert is_transient(dead["error_kind"])
    # permanent kinds are not retried and are not transient
    FlakyFileSystem.calls.clear()
    _, dead = _read(_rec("/nonexistent/c.png"), retries=3, backoff_s=0)
    assert dead["error_kind"] == "missing_file" and not is_transient("missing_file")
    assert TRANSIENT_KINDS.isdisjoint(PERMANENT_READ_KINDS)


class CutFileSystem(FileSystem):
    """A Beam filesystem (`cut://N/<local path>`) serving a local file whose first N opens
    break half way through (a connection reset), the way a download from an object store
    does; `SEEKABLE` False makes its streams unseekable (the reader then reads up to where it
    was). Registered with Beam's FileSystems by subclassing."""

    opens: ClassVar[dict[str, int]] = {}
    SEEKABLE: ClassVar[bool] = True

    @classmethod
    def scheme(cls) -> str:
        return "cut"

    @staticmethod
    def _parts(path: str) -> tuple[int, str]:
        fails, local = path.split("://", 1)[1].split("/", 1)
        return int(fails), "/" + local

    def join(self, base, *paths):
        return posixpath.join(base, *paths)

    def split(self, path):
        head, tail = posixpath.split(path)
        return head, tail

    def match(self, patterns, limits=None):
        from apache_beam.io.filesystem import FileMetadata, MatchResult

        out = []
        for pattern in patterns:
            local = self._parts(pattern)[1]
            found = [FileMetadata(pattern, os.path.getsize(local))] if os.path.exists(local) else []
            out.append(MatchResult(pattern, found))
        return out

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        fails, local = self._parts(path)
        CutFileSystem.opens[path] = CutFileSystem.opens.get(path, 0) + 1
        data = Path(local).read_bytes()  # FileNotFoundError for a missing one
        cut = len(data) // 2 if CutFileSystem.opens[path] <= fails else None
        return _CutStream(data, cut, CutFileSystem.SEEKABLE)


CutFileSystem.__abstractmethods__ = frozenset()


class _CutStream(io.RawIOBase):
    """A download that fails on the read that would cross byte `cut` (and on every later
    one), the way a buffered network stream does: a read returns all it asked for, or fails."""

    def __init__(self, data: bytes, cut: int | None, seekable: bool):
        self.buf, self.cut, self._seekable = io.BytesIO(data), cut, seekable

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset, whence=0):
        if not self._seekable:
            raise io.UnsupportedOperation("seek")
        return self.buf.seek(offset, whence)

    def tell(self):
        return self.buf.tell()

    def readinto(self, b) -> int:
        if self.cut is not None and self.buf.tell() + len(b) > self.cut:
            raise ConnectionResetError(104, "Connection reset by peer")
        data = self.buf.read(len(b))
        b[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("seekable", [True, False], ids=["seek", "stream"])
def test_transient_errors_while_streaming_are_retried_where_they_broke(
    tmp_path, monkeypatch, seekable
):
    """A manifest (gzip JSONL, CSV, Parquet) or a tar whose connection breaks half way is
    reopened at the byte where it broke and read on: every row, nothing twice. One that keeps
    breaking keeps the rows before, and the rest is one `read_error` (transient) dead letter."""
    monkeypatch.setattr(sources, "READ_BACKOFF_S", 0)
    monkeypatch.setattr(CutFileSystem, "SEEKABLE", seekable)
    CutFileSystem.opens.clear()
    # files of a few hundred KB: the break comes after some 64 KiB reads went through
    n_rows = 6000
    rows = [{"image_path": f"i{i}.png", "caption": f"a caption of row {i}"} for i in range(n_rows)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(text.encode(), compresslevel=0))
    csv_text = "image_path,caption\n" + "".join(f"{r['image_path']},{r['caption']}\n" for r in rows)
    (tmp_path / "m.csv").write_text(csv_text)
    pq.write_table(
        pa.table({"image_path": [r["image_path"] for r in rows]}), tmp_path / "m.parquet"
    )
    members = [_member(f"k{i}.png", os.urandom(4000)) for i in range(100)]  # not decoded here
    _tar(tmp_path / "t.tar.gz", members, "w:gz")
    expected = {"m.jsonl.gz": n_rows, "m.csv": n_rows, "t.tar.gz": 100}
    if seekable:  # Parquet needs a seekable file (Beam's filesystems all are)
        expected["m.parquet"] = n_rows
    for name, n in expected.items():
        uri = f"cut://1{tmp_path}/{name}"  # the first open breaks half way
        recs, dead = _expand(AugmentConfig(input=uri, output="o"))
        assert not dead, (name, dead)
        assert len(recs) == n and len({r["input_ref"] for r in recs}) == n, name
        assert CutFileSystem.opens[uri] == 2, name
    for name in ("m.jsonl.gz", "t.tar.gz"):
        uri = f"cut://99{tmp_path}/{name}"  # breaks every time
        recs, dead = _expand(AugmentConfig(input=uri, output="o"))
        assert 0 < len(recs) < expected[name], name
        assert [d["error_kind"] for d in dead] == ["read_error"] and is_transient("read_error")
        assert "#after:" in dead[0]["input_ref"]
        assert "ConnectionResetError" in dead[0]["message"] and "attempts" in dead[0]["message"]
        assert CutFileSystem.opens[uri] == 1 + sources.READ_RETRIES
    # a file that is not there is missing (permanent), not retried
    recs, dead = _expand(AugmentConfig(input=f"cut://0{tmp_path}/gone.jsonl", output="o"))
    assert [d["error_kind"] for d in dead] == ["missing_file"]
    assert CutFileSystem.opens[f"cut://0{tmp_path}/gone.jsonl"] == 1


# --- tars -----------------------------------------------------------------------------------
def _member(name: str, data: bytes = b"", type_: bytes = tarfile.REGTYPE, **kw) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(info, k, v)
    return info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None


def _tar(path: Path, members: list[tuple], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return path


def sparse_tar(path: Path, real_size: int, name: str = "big.png") -> Path:
    """A tar whose one GNU sparse member claims `real_size` bytes while storing one block:
    the kind of 10 KB file that the old reader turned into a 1 GiB record."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512  # stored bytes
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % (real_size - 512)  # one sparse region: offset ...
    header[398:410] = b"%011o\0" % 512  # ... and length
    header[482] = 0  # no extended sparse headers
    header[483:495] = b"%011o\0" % real_size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    path.write_bytes(bytes(header[:512]) + b"\x89" * 512 + b"\0" * 1024)
    return path


def test_tar_compression_is_chosen_by_name(tmp_path):
    members = [_member("k1.png", _png(1)), _member("k1.txt", b"a square")]
    _tar(tmp_path / "plain.tar", members)
    _tar(
        tmp_path / "zipped.tar.gz", [_member("k1.png", _png(1)), _member("k1.txt", b"x y")], "w:gz"
    )
    # a gzip stream named .tar: never inflated (the 300 KB file that became a 300 MB record)
    (tmp_path / "bomb.tar").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "plain.tar"), output="o"))
    assert len(recs) == 1 and not dead
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "zipped.tar.gz"), output="o"))
    assert len(recs) == 1 and not dead and recs[0]["source_caption"] == "x y"
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "bomb.tar"), output="o"))
    assert not recs and [d["error_kind"] for d in dead] == ["bad_tar"]
    assert "gzip data in a file named .tar" in dead[0]["message"]
    # a folder of tars takes every tar name
    recs, dead = _expand(AugmentConfig(input=str(tmp_path), output="o", input_format="webdataset"))
    assert len(recs) == 2 and [d["error_kind"] for d in dead] == ["bad_tar"]


def test_unsafe_members_are_refused(tmp_path):
    sparse_tar(tmp_path / "sparse.tar", 1 << 30)
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "sparse.tar"), output="o"))
    assert not recs and [d["error_kind"] for d in dead] == ["unsafe_member"]
    assert "sparse" in dead[0]["message"]
    members = [
        _member("sym.png", type_=tarfile.SYMTYPE, linkname="/etc/passwd"),
        _member("hard.png", type_=tarfile.LNKTYPE, linkname="ok.png"),
        _member("dev.png", type_=tarfile.CHRTYPE, devmajor=1, devminor=5),
        _member("fifo.png", type_=tarfile.FIFOTYPE),
        _member("ok.png", _png(1)),
        _member("ok.txt", b"fine"),
        _member("huge.png", b"\0" * 3000),
        _member("huge.txt", b"tiny caption"),
    ]
    _tar(tmp_path / "links.tar", members)
    cfg = AugmentConfig(input=str(tmp_path / "links.tar"), output="o", max_file_bytes=2000)
    recs, dead = _expand(cfg)
    assert [r["input_ref"].split("#")[1] for r in recs] == ["ok"]
    kinds = {d["input_ref"].split("#")[1]: d["error_kind"] for d in dead}
    assert kinds == {
        "sym": "unsafe_member",
        "hard": "unsafe_member",
        "dev": "unsafe_member",
        "fifo": "unsafe_member",
        "huge": "file_too_large",
    }


def test_interleaved_members_are_grouped_and_json_fields_type_checked(tmp_path):
    meta = {
        "c": {"caption": "a circle", "language": "pt-BR"},
        "d": {"caption": "bad", "language": ["en"]},
        "e": {"caption": "bad", "language": 3},
    }
    members = [
        _member("a.png", _png(1)),
        _member("b.png", _png(2)),
        _member("a.txt", b"caption of a"),  # after b's image: interleaved
        _member("b.txt", b"caption of b"),
    ]
    for key, m in meta.items():
        members += [
            _member(f"{key}.png", _png(ord(key))),
            _member(f"{key}.json", json.dumps(m).encode()),
        ]
    members += [_member(f"f{i}.png", _png(100 + i)) for i in range(sources.WDS_GROUP_WINDOW + 1)]
    members.append(_member("a.json", b"{}"))  # far too late: its sample is gone
    _tar(tmp_path / "mixed.tar", members)
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "mixed.tar"), output="o"))
    by_key = {r["input_ref"].split("#")[1]: r for r in recs}
    assert by_key["a"]["source_caption"] == "caption of a"
    assert by_key["b"]["source_caption"] == "caption of b"
    assert by_key["c"]["source_language"] == "pt" and by_key["c"]["source_caption"] == "a circle"
    kinds = {d["input_ref"].split("#")[1]: d["error_kind"] for d in dead}
    assert kinds == {"d": "bad_sample", "e": "bad_sample", "a.json": "split_sample"}
    assert len(recs) + len(dead) == 2 + 3 + sources.WDS_GROUP_WINDOW + 1 + 1


# --- the real pipeline ----------------------------------------------------------------------
def _tree_digest(root: Path, skip: Path) -> dict[str, str]:
    """Every entry under `root` except `skip`: path -> content hash (or file type)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = f"mode {stat.S_IFMT(st.st_mode):o}"
    return out


# These corpora are mostly bad on purpose: let the publish guard (dead-letter share) pass them.
GUARD = (
    {"max_dead_letter_share": 1.0} if "max_dead_letter_share" in AugmentConfig.model_fields else {}
)


def _read_output(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [r for f in find_shards(out).files for r in pq.read_table(f).to_pylist()]
    dead = [
        r for f in find_shards(out, kind="dead_letter").files for r in pq.read_table(f).to_pylist()
    ]
    return rows, dead


@pytest.fixture(scope="module")
def tiny_translator(tmp_path_factory) -> Path:
    """A small random Marian model (en -> pt) converted to CTranslate2: real translation, made
    here (its output is gibberish; what counts is which captions it is asked to translate)."""
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    import pipeline_testkit as kit

    return kit.tiny_translator(tmp_path_factory.mktemp("tr") / "ct2", languages=("pt",))


@pytest.mark.slow
def test_pipeline_over_a_bad_manifest_with_two_worker_processes(tmp_path, tiny_translator):
    """Every good row becomes a row (with its language normalised, so `en-US` captions are
    translated), every bad one a dead letter with its reason, the books balance, and nothing
    outside OUTPUT changes."""
    from babelcap.pipelines.options import TextFilterConfig, TranslationStageConfig
    from babelcap.pipelines.runner import run

    root = tmp_path / "user"
    data = root / "data"
    (data / "img").mkdir(parents=True)
    for i in range(7):
        (data / "img" / f"g{i}.png").write_bytes(_png(i + 1))
    (root / "outside.png").write_bytes(_png(50))
    os.mkfifo(data / "img" / "pipe.png")
    (data / "img" / "folder.png").mkdir()
    good = [
        {"image_path": "img/g0.png", "caption": "a red\u2028square on the left", "lang": "en-US"},
        {"image_path": "img/g1.png", "caption": "um quadrado azul", "lang": "pt-BR"},
        {"image_path": "img/g2.png", "caption": "a blue circle", "lang": "en_GB"},
        {"image_path": str(root / "outside.png"), "caption": "an absolute path is allowed"},
        {"image_path": "./img/g3.png", "caption": "a small\u0085triangle"},
        {"image_path": "img/g6.png", "caption": "a tiny square", "lang": "xx-YY"},
    ]
    bad = [
        ({"image_path": "../outside.png", "caption": "climbs out"}, "path_outside_manifest"),
        ({"image_path": "img/pipe.png", "caption": "a fifo"}, "not_a_regular_file"),
        ({"image_path": "img/folder.png", "caption": "a folder"}, "not_a_regular_file"),
        ({"image_path": "img/none.png", "caption": "missing"}, "missing_file"),
        ({"image_path": "img/g4.png", "lang": ["en"]}, "bad_manifest_row"),
        ({"image_path": 5, "caption": "number"}, "bad_manifest_row"),
    ]
    # a file whose name is not UTF-8 (Latin-1 "café"), named by the manifest in those bytes
    (data / "img").joinpath(os.fsdecode(b"caf\xe9.png")).write_bytes(_png(6))
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines.append(b'{"image_path": "img/caf\xe9.png", "caption": "a latin-1 file name"}')
    good.append({})
    lines += [json.dumps(r).encode() for r, _ in bad]
    lines.append(b"[" * 50_000)
    lines.append(b'{"image_path": "img/g5.png", "caption": "x", "split": "tr\xffin"}')
    bad.append(({}, "bad_manifest_row"))
    manifest = data / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    before = _tree_digest(tmp_path, tmp_path / "out")

    config = AugmentConfig(
        input=str(manifest),
        output=str(tmp_path / "out"),
        rows_per_shard=4,
        languages=("pt",),
        translator=TranslationStageConfig(
            model=str(tiny_translator), batch_size=4, options={"max_decoding_length": 8}
        ),
        text=TextFilterConfig(language_check=False),
        **GUARD,
    )
    result = run(config, workers=2, echo=False)
    # every English caption was translated: en-US, en_GB and the three without a language
    # (the old reader left `en-US` / `en_GB` untranslated); pt-BR and xx-YY are not English
    assert result["stats"]["translate.translations"] == 5

    assert result["accounting"]["balanced"] and result["accounting"]["inputs"] == len(lines)
    rows, dead = _read_output(tmp_path / "out")
    assert len(rows) == len(good)
    caps = {
        c["text"]: c["language"] for r in rows for c in r["captions"] if c["origin"] == "source"
    }
    uris = {c["text"]: r["source_uri"] for r in rows for c in r["captions"]}
    assert uris["a latin-1 file name"].endswith("img/caf\\xe9.png")  # stored printable
    assert caps["a red square on the left"] == "en"  # U+2028 was whitespace in the caption
    assert caps["um quadrado azul"] == "pt" and caps["a blue circle"] == "en"
    assert caps["a tiny square"] == "xx-YY"  # unknown: kept as given, and counted
    assert result["stats"]["read.language_unknown"] == 1
    assert result["stats"]["read.language_normalised"] == 3
    kinds = sorted(d["error_kind"] for d in dead)
    assert kinds == sorted([k for _, k in bad] + ["bad_manifest_row"])
    refs = sorted(int(d["input_ref"].rsplit("#L", 1)[1]) for d in dead)
    assert refs == list(range(len(good) + 1, len(lines) + 1))  # line numbers unshifted
    assert _tree_digest(tmp_path, tmp_path / "out") == before


@pytest.mark.slow
def test_pipeline_over_a_folder_of_bad_tars(tmp_path):
    from babelcap.pipelines.runner import run

    shards = tmp_path / "user" / "shards"
    shards.mkdir(parents=True)
    _tar(
        shards / "a.tar",
        [
            _member("s1.png", _png(1)),
            _member("s2.png", _png(2)),
            _member("s1.txt", b"a red square"),
            _member("s2.json", json.dumps({"caption": "um circulo", "language": "pt-BR"}).encode()),
            _member("s3.png", type_=tarfile.SYMTYPE, linkname="/etc/passwd"),
            _member("s4.png", _png(4)),
            _member("s4.json", json.dumps({"caption": "x y", "language": [1]}).encode()),
            _member(os.fsdecode(b"\xffname.png"), _png(6)),  # a member name that is not UTF-8
            _member(os.fsdecode(b"\xffname.txt"), b"an odd name"),
        ],
    )
    _tar(
        shards / "b.tar.gz", [_member("t1.png", _png(5)), _member("t1.txt", b"a big star")], "w:gz"
    )
    (shards / "c.tar").write_bytes(gzip.compress((shards / "a.tar").read_bytes()))
    sparse_tar(shards / "d.tar", 1 << 30)
    before = _tree_digest(tmp_path, tmp_path / "out")
    config = AugmentConfig(
        input=str(shards), output=str(tmp_path / "out"), input_format="webdataset", **GUARD
    )
    result = run(config, workers=1, echo=False)
    assert result["accounting"]["balanced"]
    rows, dead = _read_output(tmp_path / "out")
    texts = sorted((c["text"], c["language"]) for r in rows for c in r["captions"])
    assert texts == [
        ("a big star", "en"),
        ("a red square", "en"),
        ("an odd name", "en"),
        ("um circulo", "pt"),
    ]
    assert any(r["source_uri"].endswith("a.tar#\\xffname") for r in rows)
    assert sorted(d["error_kind"] for d in dead) == [
        "bad_sample",
        "bad_tar",
        "unsafe_member",
        "unsafe_member",
    ]
    assert _tree_digest(tmp_path, tmp_path / "out") == before


def _bom_csv_gz(folder: Path) -> tuple[Path, list[str], list[str]]:
    """A spreadsheet's CSV (byte-order mark), gzipped, with a field over csv's default limit
    (the caption is read, then dropped as too long: with no captioner that image has no caption
    left) and one over the bounded limit (that row a dead letter, the next row read)."""
    for i in range(3):
        (folder / f"c{i}.png").write_bytes(_png(20 + i))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image_path", "caption", "lang"])
    w.writerow(["c0.png", "a green star", "en-US"])
    w.writerow(["c1.png", "y" * 200_000, "en"])
    w.writerow(["c2.png", "z\n" * (sources.MAX_ROW_BYTES // 2 + 10), "en"])
    w.writerow(["c2.png", "um triangulo amarelo", "pt_BR"])
    path = folder / "m.csv.gz"
    path.write_bytes(gzip.compress(buf.getvalue().encode("utf-8-sig")))
    return path, ["en", "pt"], ["bad_manifest_row", "no_captions"]


def _hf_parquet(folder: Path) -> tuple[Path, list[str], list[str]]:
    """A Hugging Face-style manifest: the `image` column is a struct of bytes and path."""
    (folder / "img").mkdir()
    (folder / "img" / "on_disk.png").write_bytes(_png(31))
    table = pa.table(
        {
            "image": [
                {"bytes": _png(30), "path": "embedded.png"},
                {"bytes": None, "path": "img/on_disk.png"},
                {"bytes": b"not an image", "path": "junk.png"},
            ],
            "text": ["a yellow drop", "a big circle", "junk"],
            "lang": ["en-US", "en", "en"],
        }
    )
    path = folder / "hf.parquet"
    pq.write_table(table, path)
    return path, ["en", "en"], ["not_an_image"]


def _write_gzip_bomb(path: Path, head: bytes, size: int, tail: bytes) -> None:
    """`head`, then `size` bytes of "a" (one line: no newline), then `tail`, gzipped as it is
    written (a few hundred KB per 256 MiB)."""
    with gzip.open(path, "wb") as f:
        f.write(head)
        chunk = b"a" * (1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
        f.write(tail)


def _jsonl_gz_bomb(folder: Path) -> tuple[Path, list[str], list[str]]:
    """A `.jsonl.gz` whose second line is a 64 MiB caption (64 KB compressed): that line is a
    dead letter, the lines around it are rows."""
    for i in range(2):
        (folder / f"b{i}.png").write_bytes(_png(40 + i))
    head = json.dumps({"image_path": "b0.png", "caption": "a purple dot", "lang": "en"}) + "\n"
    tail = '"}\n' + json.dumps({"image_path": "b1.png", "caption": "um ponto", "lang": "pt"})
    path = folder / "bomb.jsonl.gz"
    _write_gzip_bomb(
        path,
        (head + '{"image_path": "b0.png", "caption": "').encode(),
        64 << 20,
        (tail + "\n").encode(),
    )
    return path, ["en", "pt"], ["bad_manifest_row"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [_bom_csv_gz, _hf_parquet, _jsonl_gz_bomb],
    ids=["bom-csv-gz", "hf-parquet", "jsonl-gz-bomb"],
)
def test_pipeline_over_csv_and_parquet_manifests(tmp_path, make):
    from babelcap.pipelines.runner import run

    folder = tmp_path / "user"
    folder.mkdir()
    manifest, languages, dead_kinds = make(folder)
    before = _tree_digest(tmp_path, tmp_path / "out")
    config = AugmentConfig(input=str(manifest), output=str(tmp_path / "out"), **GUARD)
    result = run(config, workers=1, echo=False)
    rows, dead = _read_output(tmp_path / "out")
    assert result["accounting"]["balanced"]
    assert result["accounting"]["inputs"] == len(rows) + len(dead)
    assert sorted(d["error_kind"] for d in dead) == dead_kinds
    assert sorted(c["language"] for r in rows for c in r["captions"]) == languages
    if make is _hf_parquet:
        uris = sorted(r["source_uri"] for r in rows)
        # named from the manifest's folder: the output carries no folder of this machine
        assert uris == sorted(["embedded.png", "img/on_disk.png"])
    assert _tree_digest(tmp_path, tmp_path / "out") == before


def test_books_must_balance_against_the_plan():
    """A unit whose pipeline counted fewer inputs than its plan holds does not commit as
    balanced, even when what was counted balances (the reader's `not_read` dead letters make
    this the last check)."""
    with pytest.raises(accounting.AccountingError, match=r"4 inputs planned .* 3 counted"):
        accounting.balance({accounting.INPUTS: 3}, 3, 0, 0, planned=4)
    assert accounting.balance({accounting.INPUTS: 4}, 3, 1, 0, planned=4)["balanced"]


@pytest.mark.slow
def test_planned_inputs_the_reader_never_came_to_are_not_read_dead_letters(tmp_path, monkeypatch):
    """A manifest cut between planning (the driver lists the inputs) and running (the pipeline
    reads them): the planned rows the reader no longer finds are `not_read` dead letters, so
    every unit balances against its plan (a unit whose every input is gone included) and no
    input disappears. With the manifest whole again, `--retry-failed` reads them as rows."""
    from babelcap.pipelines import units
    from babelcap.pipelines.runner import run

    data = tmp_path / "user"
    data.mkdir()
    for i in range(6):
        (data / f"g{i}.png").write_bytes(_png(60 + i))
    lines = [
        json.dumps({"image_path": f"g{i}.png", "caption": f"shape number {i}"}) + "\n"
        for i in range(6)
    ]
    manifest = data / "m.jsonl"
    manifest.write_text("".join(lines))
    list_inputs = units.list_inputs

    def list_then_cut(config: AugmentConfig) -> list[str]:
        refs = list_inputs(config)
        manifest.write_text("".join(lines[:3]))  # the manifest changes after planning
        return refs

    monkeypatch.setattr(units, "list_inputs", list_then_cut)
    out = tmp_path / "out"
    settings = {"input": str(manifest), "output": str(out), "unit_size": 4, **GUARD}
    before = _tree_digest(tmp_path, out)
    result = run(AugmentConfig(**settings), workers=1, echo=False)
    books = result["accounting"]
    assert books["balanced"] and books["inputs"] == 6 and books["rows_written"] == 3
    assert [u["inputs"] for u in result["units"]] == [4, 2]  # unit 1: nothing left to read
    rows, dead = _read_output(out)
    assert len(rows) == 3
    assert sorted((d["input_ref"].rsplit("#", 1)[1], d["error_kind"]) for d in dead) == [
        ("L4", "not_read"),
        ("L5", "not_read"),
        ("L6", "not_read"),
    ]
    assert is_transient("not_read") and result["stats"]["read.not_read"] == 3
    # the manifest whole again: --retry-failed reads the three, which become rows
    monkeypatch.setattr(units, "list_inputs", list_inputs)
    manifest.write_text("".join(lines))
    result = run(AugmentConfig(**settings, retry_failed=True), workers=1, echo=False)
    books = result["accounting"]
    assert books["balanced"] and books["inputs"] == 6 and books["rows_written"] == 6
    assert len([r for f in find_shards(out).files for r in pq.read_table(f).to_pylist()]) == 6
    assert not result["dead_letters"]  # the not_read ones were replaced by rows
    assert _tree_digest(tmp_path, out) == before


# --- memory ---------------------------------------------------------------------------------
# Peak RSS bound for reading the hostile tars below (a 1 GiB sparse member, a gzip bomb named
# .tar inflating to 256 MiB, a 128 MiB member in a .tar.gz): the naive reader held each whole.
RSS_BOUND_MB = 300

_CHILD = textwrap.dedent(
    """
    import resource, sys
    from babelcap.pipelines.options import AugmentConfig
    from babelcap.pipelines.sources import ExpandInput, ReadBytes

    def peak_mb():
        # A forked child starts with its parent's peak RSS (kept across exec): reset it where
        # Linux allows (clear_refs 5 resets VmHWM) and read VmHWM, else fall back to getrusage.
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = peak_mb()
    cfg = AugmentConfig(input=sys.argv[1], output="o", input_format="webdataset")
    reader = ReadBytes(cfg.max_file_bytes)
    n = 0
    for item in ExpandInput(cfg).process(cfg.input):
        n += 1
        if not hasattr(item, "tag"):
            list(reader.process(item))
    print(n, base, peak_mb())
    """
)


@pytest.mark.slow
def test_memory_bound_on_hostile_tars(tmp_path):
    sparse_tar(tmp_path / "sparse.tar", 1 << 30)
    # a gzip stream named .tar (inflates to 256 MiB), and a .tar.gz with a 128 MiB member
    for name, size in (("bomb.tar", 256 << 20), ("big.tar.gz", 128 << 20)):
        with tarfile.open(tmp_path / name, "w:gz", compresslevel=1) as tar:
            info = tarfile.TarInfo("zeros.png")
            info.size = size
            tar.addfile(info, _Zeros(size))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, base, peak = map(int, proc.stdout.split())
    assert n == 3  # three dead letters, one per tar
    assert peak < RSS_BOUND_MB, (base, peak)


_MANIFEST_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from apache_beam.pvalue import TaggedOutput
    from babelcap.pipelines import sources
    from babelcap.pipelines.options import AugmentConfig

    def peak_mb():  # as in _CHILD: VmHWM after resetting it, else getrusage
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    args = json.loads(sys.argv[1])
    for name, value in args.get("constants", {}).items():
        setattr(sources, name, value)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = peak_mb()
    kinds = {}
    for path in args["inputs"]:
        cfg = AugmentConfig(input=path, output="o", **args.get("config", {}))
        kinds[path] = [
            item.value["row"]["error_kind"] if isinstance(item, TaggedOutput) else "row"
            for item in sources.ExpandInput(cfg).process(cfg.input)
        ]
    print(json.dumps({"base": base, "peak": peak_mb(), "kinds": kinds}))
    """
)


def _run_child(args: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _MANIFEST_CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_bound_on_compressed_manifest_bombs(tmp_path):
    """A `.jsonl.gz` and a `.csv.gz` of about 250 KB whose second line inflates to 256 MiB are
    read under the same bound as the hostile tars (RSS_BOUND_MB): the line is inflated 64 KiB
    at a time and dropped, a dead letter; the rows around it are read. (Beam's CompressedFile
    inflated up to 16 MiB of compressed input in one call: this bomb whole, 256 MiB at once.)"""
    (tmp_path / "a.png").write_bytes(_png(1))
    good = json.dumps({"image_path": "a.png", "caption": "fine"}) + "\n"
    jsonl = tmp_path / "bomb.jsonl.gz"
    _write_gzip_bomb(jsonl, (good + '{"caption": "').encode(), 256 << 20, ('"}\n' + good).encode())
    csv_gz = tmp_path / "bomb.csv.gz"
    head = "image_path,caption\na.png,fine\na.png,"
    _write_gzip_bomb(csv_gz, head.encode(), 256 << 20, b"\na.png,fine too\n")
    assert jsonl.stat().st_size < 1 << 20 and csv_gz.stat().st_size < 1 << 20
    out = _run_child({"inputs": [str(jsonl), str(csv_gz)]})
    for path in (jsonl, csv_gz):
        assert out["kinds"][str(path)] == ["row", "bad_manifest_row", "row"], out
    assert out["peak"] < RSS_BOUND_MB, out


@pytest.mark.slow
def test_memory_bound_on_hugging_face_parquet(tmp_path):
    """Hugging Face Parquet with embedded images over the limit: a 48 MiB image in a row group
    that is read (refused from its Arrow length, never copied out), and a row group holding an
    80 MiB image, over the row group limit (64 MiB here: 4 x max_file_bytes), refused from the
    footer without being read. Peak RSS: the imports plus about one row group's page (the
    bound: RSS_BOUND_MB + 2 x the row group limit; the old reader held both images, their
    batches and their Python copies)."""
    path = tmp_path / "hf.parquet"
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("text", pa.string()),
        ]
    )
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        groups = [
            [(_png(1), "a.png"), (bytes(48 << 20), "big.png"), (_png(2), "b.png")],
            [(bytes(80 << 20), "huge.png")],
        ]
        for group in groups:
            images = [{"bytes": b, "path": name} for b, name in group]
            texts = [f"caption of {name}" for _, name in group]
            writer.write_table(pa.table({"image": images, "text": texts}, schema=schema))
    assert path.stat().st_size < 1 << 20
    group_limit = 64 << 20
    out = _run_child(
        {
            "inputs": [str(path)],
            "config": {"max_file_bytes": 16 << 20},
            "constants": {"PARQUET_GROUP_BYTES": group_limit},
        }
    )
    assert out["kinds"][str(path)] == ["row", "file_too_large", "row", "file_too_large"], out
    assert out["peak"] < RSS_BOUND_MB + 2 * (group_limit >> 20), out


class _Zeros(io.RawIOBase):
    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_tar_headers_are_bounded_and_shard_braces_expand(tmp_path):
    """A pax header tarfile would read whole (1 GiB of zeros, gzipped to a few MB is the
    attack; 2 MiB here) makes the tar a dead letter; `{000..001}` names shards."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    big = b"0 x=" + b"y" * (sources.MAX_ROW_BYTES * 2)
    header.size = len(big)
    _tar(tmp_path / "shard-000.tar", [(header, io.BytesIO(big)), _member("k.png", _png(1))])
    _tar(tmp_path / "shard-001.tar", [_member("k.png", _png(2)), _member("k.txt", b"a cat")])
    cfg = AugmentConfig(input=str(tmp_path / "shard-{000..001}.tar"), output="o")
    recs, dead = _expand(cfg)
    assert [r["input_ref"] for r in recs] == [f"{tmp_path}/shard-001.tar#k"]
    assert [d["error_kind"] for d in dead] == ["bad_tar"] and "extended header" in dead[0][
        "message"
    ]
    assert sources.expand_braces("a{1..3}b{x,y}") == [
        "a1bx",
        "a1by",
        "a2bx",
        "a2by",
        "a3bx",
        "a3by",
    ]


def test_missing_inputs_say_so(tmp_path):
    for spec, fmt in ((tmp_path / "nope", "folder"), (tmp_path / "s-{0..2}.tar", "webdataset")):
        recs, dead = _expand(AugmentConfig(input=str(spec), output="o", input_format=fmt))
        assert not recs and [d["error_kind"] for d in dead] == ["missing_file"]


def test_a_fifo_input_is_not_a_missing_folder(tmp_path):
    os.mkfifo(tmp_path / "in")
    results: dict[str, list] = {}
    t = threading.Thread(
        target=lambda: results.setdefault(
            "dead", _expand(AugmentConfig(input=str(tmp_path / "in"), output="o"))[1]
        ),
        daemon=True,
    )
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the reader blocked on a FIFO"
    assert [d["error_kind"] for d in results["dead"]] == ["not_a_regular_file"]
    assert "FIFO" in results["dead"][0]["message"]


def test_csv_quote_that_never_closes(tmp_path):
    """A quote opened in one row that never closes: that row is a dead letter and the rows it
    swallowed up to the end of the file are read again; one that swallows more than the field
    limit is one dead letter that says how many lines it took."""
    for i in range(4):
        (tmp_path / f"c{i}.png").write_bytes(_png(i))
    text = (
        'image_path,caption,lang\nc0.png,"a quoted, fine field",en\nc1.png,"5 inch screen,en\n'
        "c2.png,also fine,en\nc3.png,last,en\n"
    )
    (tmp_path / "m.csv").write_text(text)
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "m.csv"), output="o"))
    assert [r["input_ref"].rsplit("#", 1)[1] for r in recs] == ["L2", "L4", "L5"]
    assert [r["source_caption"] for r in recs] == ["a quoted, fine field", "also fine", "last"]
    assert [(d["input_ref"].rsplit("#", 1)[1], d["error_kind"]) for d in dead] == [
        ("L3", "bad_manifest_row")
    ]
    assert "never closes" in dead[0]["message"] and "L3-L5, 3 lines" in dead[0]["message"]
    # a stray quote followed by more than the field limit before one closes it
    filler = "".join(f"c0.png,row {i},en\n" for i in range(sources.MAX_ROW_BYTES // 14))
    text = 'image_path,caption\nc1.png,"open\n' + filler + 'x"\nc2.png,after\n'
    (tmp_path / "n.csv").write_text(text)
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "n.csv"), output="o"))
    assert [r["source_caption"] for r in recs] == ["after"]
    assert [d["error_kind"] for d in dead] == ["bad_manifest_row"]
    assert "field larger than field limit" in dead[0]["message"]
    assert f"lines L2-L{3 + len(filler.splitlines())}" in dead[0]["message"]


def test_dead_letter_messages_are_clipped(tmp_path):
    """A message quoting input (a 1 MiB row's value) is cut to MAX_MESSAGE_CHARS, saying how
    long it was; the reference is never cut (it is how an input is accounted for)."""
    from babelcap.pipelines.deadletter import MAX_MESSAGE_CHARS, reject

    (tmp_path / "a.png").write_bytes(_png(1))
    line = b'{"image_path": "a.png", "language": "' + b"\xff" * 600_000 + b'"}'
    (tmp_path / "m.jsonl").write_bytes(line + b"\n")
    _, dead = _expand(AugmentConfig(input=str(tmp_path / "m.jsonl"), output="o"))
    assert [d["error_kind"] for d in dead] == ["bad_manifest_row"]
    assert len(dead[0]["message"]) < MAX_MESSAGE_CHARS + 40
    long_ref = "m.jsonl#" + "k" * 5000
    row = reject({"input_ref": long_ref, "stats": {}}, "read", "bad_sample", "y" * 10_000)
    msg = row.value["row"]["message"]
    assert msg.endswith("… (10000 characters)") and len(msg) < MAX_MESSAGE_CHARS + 40
    assert row.value["row"]["input_ref"] == long_ref


def test_interleaving_window_is_bounded_in_bytes(tmp_path, monkeypatch):
    """Pending samples are emitted once they hold WDS_GROUP_BYTES, even within the key window:
    a member arriving after that is a split_sample dead letter, never unbounded memory."""
    big = _png(1, size=64)
    monkeypatch.setattr(sources, "WDS_GROUP_BYTES", len(big) + 10)
    members = [_member("a.png", big), _member("b.png", _png(2, size=64)), _member("a.txt", b"x")]
    _tar(tmp_path / "t.tar", members)
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "t.tar"), output="o"))
    assert [r["input_ref"].split("#")[1] for r in recs] == ["a", "b"]
    assert [(d["input_ref"].split("#")[1], d["error_kind"]) for d in dead] == [
        ("a.txt", "split_sample")
    ]


def test_a_fifo_as_manifest_or_tar_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "m.jsonl")
    (tmp_path / "shards").mkdir()
    os.mkfifo(tmp_path / "shards" / "s.tar")
    results: dict[str, list] = {}

    def expand_all() -> None:
        results["m"] = _expand(AugmentConfig(input=str(tmp_path / "m.jsonl"), output="o"))[1]
        cfg = AugmentConfig(input=str(tmp_path / "shards"), output="o", input_format="webdataset")
        results["t"] = _expand(cfg)[1]

    t = threading.Thread(target=expand_all, daemon=True)
    t.start()
    t.join(timeout=60)  # opening a FIFO for reading would block here forever
    assert not t.is_alive(), "the reader blocked on a FIFO"
    assert [d["error_kind"] for d in results["m"] + results["t"]] == ["not_a_regular_file"] * 2


def test_permanent_local_errors_are_not_retried(tmp_path):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")  # ELOOP
    long_name = str(tmp_path / ("x" * 300 + ".png"))  # ENAMETOOLONG
    for uri in (str(tmp_path / "loop.png"), long_name):
        _, dead = _read(_rec(uri), retries=3, backoff_s=0)
        assert dead["error_kind"] == "unreadable" and "attempts" not in dead["message"]
    (tmp_path / "locked.png").write_bytes(_png(1))
    (tmp_path / "locked.png").chmod(0)
    if not os.access(tmp_path / "locked.png", os.R_OK):  # (root reads it anyway)
        _, dead = _read(_rec(str(tmp_path / "locked.png")), retries=3, backoff_s=0)
        assert dead["error_kind"] == "permission_denied"


def test_parquet_manifest_reads_only_its_columns_and_names_a_missing_one(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    table = pa.table({"path": ["a.png"], "caption": ["a cat"], "embedding": [[0.5] * 4096]})
    pq.write_table(table, tmp_path / "m.parquet")
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "m.parquet"), output="o"))
    assert [r["source_caption"] for r in recs] == ["a cat"] and not dead
    pq.write_table(pa.table({"picture": ["a.png"]}), tmp_path / "n.parquet")
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "n.parquet"), output="o"))
    assert not recs and [d["error_kind"] for d in dead] == ["bad_manifest"]
    assert "no image column" in dead[0]["message"] and "picture" in dead[0]["message"]


def test_every_read_kind_is_classified_transient_or_permanent():
    """`--retry-failed` (issue 14) decides from these sets: every kind the readers emit is in
    exactly one of them."""
    import re

    text = Path(sources.__file__).read_text()
    kinds = set(re.findall(r'"read",\s*"([a-z_]+)"', text))
    kinds |= set(re.findall(r'(?:RowError|_Refused)\(\s*"([a-z_]+)"', text))
    kinds |= set(re.findall(r'return "([a-z_]+)", (?:True|False)', text))
    kinds |= set(re.findall(r'return "(unsafe_member|file_too_large|bad_sample)"', text))
    assert {"missing_file", "read_error", "bad_tar", "path_outside_manifest"} <= kinds
    unclassified = kinds - TRANSIENT_KINDS - PERMANENT_READ_KINDS
    assert not unclassified, unclassified

"""Bad input never stops a run (issue 13, the input half): manifests, tars and paths that real
users have, built here, read by the real readers and run through the real pipeline.

- Readers one by one (fast): each defect of the issue, with the dead-letter kind it gets.
- `test_pipeline_*`: the real Beam pipeline (multi-process local runner, 2 workers) over a
  manifest with every bad row plus good ones, and (in process) over a folder of bad tars:
  the job succeeds, every good input is one row, every input is accounted for, nothing
  outside the output folder changes.
- `test_memory_bound_*`: a real subprocess reads a sparse 1 GiB tar member, a gzip bomb named
  `.tar` and an oversized member of a `.tar.gz`; its peak RSS (getrusage) stays under a bound.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
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
    assert recs and [d["error_kind"] for d in dead] == ["bad_manifest_row"]  # the cut line
    assert dead[0]["input_ref"].endswith(f"#L{len(recs) + 1}")
    recs, dead = _expand(AugmentConfig(input=str(tmp_path / "gone.jsonl"), output="o"))
    assert not recs and [d["error_kind"] for d in dead] == ["missing_file"]


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


@pytest.mark.slow
@pytest.mark.parametrize("make", [_bom_csv_gz, _hf_parquet], ids=["bom-csv-gz", "hf-parquet"])
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
        assert uris == sorted(["embedded.png", str(folder / "img" / "on_disk.png")])
    assert _tree_digest(tmp_path, tmp_path / "out") == before


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

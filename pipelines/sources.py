"""Sources: turn the user's `--input` into input records, one per image.

Three kinds, chosen by `AugmentConfig.input_format` (or guessed from the path):
- folder: every file under a directory (recursive) whose extension looks like an image;
- manifest: JSONL, CSV or Parquet with an image path/URI column and optional caption, language
  and split columns (relative paths resolve against the manifest's folder);
- webdataset: tar shards (a file, a glob or a folder of `.tar`), members grouped by key
  (`key.jpg`, `key.txt`, `key.json`); members are read in memory, never extracted.

All file access goes through `apache_beam.io.filesystems.FileSystems`, so `gs://` works on
Dataflow. An input record is a dict:
    input_ref, uri, data (bytes or None), split, source_caption, source_caption_error,
    source_language, order (a sort key that fixes which duplicate is kept), stats
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from babelcap.pipelines.accounting import INPUTS, bump
from babelcap.pipelines.deadletter import DEAD, reject
from babelcap.pipelines.options import AugmentConfig

MANIFEST_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".csv", ".parquet")
IMAGE_COLUMNS = ("image_path", "image", "path", "file", "filename", "file_name", "url", "uri")
CAPTION_COLUMNS = ("caption", "text", "alt_text", "alt", "txt")
LANGUAGE_COLUMNS = ("language", "lang")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(MANIFEST_EXTENSIONS):
        return "manifest"
    if lower.endswith(".tar") or (".tar" in lower and any(c in lower for c in "*?{[")):
        return "webdataset"
    return "folder"


def _join(base_dir: str, path: str) -> str:
    """Resolve a manifest path against the manifest's folder (URIs and absolutes untouched)."""
    if "://" in path or path.startswith("/"):
        return path
    return FileSystems.join(base_dir, path) if base_dir else path


def _dirname(path: str) -> str:
    return FileSystems.split(path)[0]


def _record(input_ref: str, order: tuple, **fields: Any) -> dict[str, Any]:
    rec = {
        "input_ref": input_ref,
        "uri": None,
        "data": None,
        "split": None,
        "source_caption": None,
        "source_caption_error": None,
        "source_language": None,
        "order": order,
        "stats": {},
    }
    rec.update(fields)
    bump(rec, INPUTS)
    return rec


def _text(value: Any) -> tuple[str | None, str | None]:
    """A caption value -> (text, error). Invalid UTF-8 is reported, not guessed at."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    text = str(value)
    try:
        text.encode("utf-8")  # lone surrogates from surrogateescape decoding
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    return text, None


def _pick(row: dict[str, Any], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    if wanted:
        return wanted if wanted in row else None
    return next((c for c in candidates if c in row), None)


class ExpandInput(beam.DoFn):
    """One `--input` string -> input records (listing / manifest parsing / tar reading)."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def process(self, path: str) -> Iterator[Any]:
        fmt = self.config.input_format
        if fmt == "auto":
            fmt = detect_format(path)
        if fmt == "folder":
            yield from self._folder(path)
        elif fmt == "manifest":
            yield from self._manifest(path)
        else:
            yield from self._webdataset(path)

    # --- folder -------------------------------------------------------------------------
    def _folder(self, folder: str) -> Iterator[dict[str, Any]]:
        exts = tuple(e.lower() for e in self.config.image_extensions)
        pattern = folder.rstrip("/") + "/**"
        metas = FileSystems.match([pattern])[0].metadata_list
        paths = sorted(m.path for m in metas if m.path.lower().endswith(exts))
        for i, path in enumerate(paths):
            if any(part.startswith(".") for part in path[len(folder) :].split("/") if part):
                continue  # hidden files and folders (.git, .ipynb_checkpoints, ...)
            yield _record(path, (folder, i), uri=path)

    # --- manifest -----------------------------------------------------------------------
    def _manifest(self, path: str) -> Iterator[Any]:
        base = _dirname(path)
        lower = path.lower()
        if lower.endswith(".parquet"):
            rows = self._parquet_rows(path)
        elif lower.endswith(".csv"):
            rows = self._csv_rows(path)
        else:
            rows = self._jsonl_rows(path)
        cfg = self.config
        for lineno, row, error in rows:
            ref = f"{path}#L{lineno}"
            if error is not None:
                rec = _record(ref, (path, lineno))
                yield reject(rec, "read", "bad_manifest_row", error)
                continue
            img_col = _pick(row, cfg.image_column, IMAGE_COLUMNS)
            if img_col is None or not row.get(img_col):
                rec = _record(ref, (path, lineno))
                yield reject(rec, "read", "bad_manifest_row", f"no image column in {sorted(row)}")
                continue
            image_ref, _ = _text(row[img_col])
            cap_col = _pick(row, cfg.caption_column, CAPTION_COLUMNS)
            lang_col = _pick(row, cfg.language_column, LANGUAGE_COLUMNS)
            caption, cap_err = _text(row.get(cap_col)) if cap_col else (None, None)
            language, _ = _text(row.get(lang_col)) if lang_col else (None, None)
            split, _ = _text(row.get("split"))
            yield _record(
                ref,
                (path, lineno),
                uri=_join(base, image_ref or ""),
                split=split,
                source_caption=caption,
                source_caption_error=cap_err,
                source_language=language or cfg.source_language,
            )

    @staticmethod
    def _read_text(path: str) -> str:
        with FileSystems.open(path) as f:
            raw = f.read()
        # surrogateescape keeps invalid UTF-8 bytes visible (as lone surrogates) so the one
        # bad caption is rejected with a reason instead of the whole manifest failing.
        return raw.decode("utf-8", errors="surrogateescape")

    def _jsonl_rows(self, path: str) -> Iterator[tuple[int, dict, str | None]]:
        text = self._read_text(path)
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                yield lineno, {}, f"invalid JSON: {exc}"
                continue
            yield lineno, row, None

    def _csv_rows(self, path: str) -> Iterator[tuple[int, dict, str | None]]:
        reader = csv.DictReader(io.StringIO(self._read_text(path), newline=""))
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            yield i, {k: v for k, v in row.items() if k is not None}, None

    def _parquet_rows(self, path: str) -> Iterator[tuple[int, dict, str | None]]:
        import pyarrow.parquet as pq

        with FileSystems.open(path) as f:
            pf = pq.ParquetFile(io.BytesIO(f.read()))
        i = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                i += 1
                yield i, row, None

    # --- webdataset ---------------------------------------------------------------------
    def _webdataset(self, pattern: str) -> Iterator[Any]:
        if any(c in pattern for c in "*?[") or pattern.lower().endswith(".tar"):
            tars = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        else:
            metas = FileSystems.match([pattern.rstrip("/") + "/**"])[0].metadata_list
            tars = sorted(m.path for m in metas if m.path.lower().endswith(".tar"))
        for tar_path in tars:
            yield from self._tar_samples(tar_path)

    def _tar_samples(self, tar_path: str) -> Iterator[Any]:
        cfg = self.config

        def emit(key: str, members: dict[str, bytes], index: int) -> Any:
            ref = f"{tar_path}#{key}"
            image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
            caption, cap_err, language = None, None, None
            if "txt" in members:
                caption, cap_err = _text(members["txt"])
            if "json" in members:
                try:
                    meta = json.loads(members["json"])
                except ValueError:
                    meta = {}
                if isinstance(meta, dict):
                    if caption is None and cap_err is None:
                        value = next((meta[c] for c in CAPTION_COLUMNS if c in meta), None)
                        caption, cap_err = _text(value)
                    language = meta.get("language") or meta.get("lang")
            rec = _record(
                ref,
                (tar_path, index),
                uri=ref,
                data=members.get(image_ext) if image_ext else None,
                source_caption=caption,
                source_caption_error=cap_err,
                source_language=language or cfg.source_language,
            )
            if image_ext is None:
                return reject(rec, "read", "no_image_in_sample", f"members: {sorted(members)}")
            return rec

        with FileSystems.open(tar_path) as f:
            key, members, index = None, {}, 0
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue  # links, devices, folders: never followed
                    base = posixpath.basename(info.name)
                    if "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    member_key = posixpath.join(posixpath.dirname(info.name), stem)
                    if key is not None and member_key != key:
                        yield emit(key, members, index)
                        index += 1
                        members = {}
                    key = member_key
                    data = tar.extractfile(info)
                    members[ext.lower()] = data.read() if data else b""
            if key is not None:
                yield emit(key, members, index)


class ReadBytes(beam.DoFn):
    """Fetch the image bytes of records that only carry a URI (missing file -> dead letter)."""

    def __init__(self, max_file_bytes: int):
        self.max_file_bytes = max_file_bytes

    def process(self, rec: dict[str, Any]) -> Iterator[Any]:
        if rec["data"] is not None:
            yield rec
            return
        uri = rec["uri"]
        try:
            with FileSystems.open(uri, compression_type="uncompressed") as f:
                data = f.read(self.max_file_bytes + 1)
        except Exception as exc:  # FileSystems raises BeamIOError / OSError / FileNotFoundError
            try:
                kind = "read_error" if FileSystems.exists(uri) else "missing_file"
            except Exception:
                kind = "read_error"
            yield reject(rec, "read", kind, f"{uri}: {exc}")
            return
        if len(data) > self.max_file_bytes:
            yield reject(rec, "read", "file_too_large", f"{uri}: > {self.max_file_bytes} bytes")
            return
        rec = {**rec, "data": data}
        bump(rec, "read.ok")
        yield rec


class ReadInputs(beam.PTransform):
    """`--input` -> input records (main output) and rejects (tagged `DEAD`)."""

    def __init__(self, config: AugmentConfig):
        super().__init__()
        self.config = config

    def expand(self, pbegin):
        expanded = (
            pbegin
            | "Input" >> beam.Create([self.config.input])
            | "Expand" >> beam.ParDo(ExpandInput(self.config)).with_outputs(DEAD, main="records")
        )
        read = (
            expanded.records
            # Listing/parsing happens in one worker; spread the records before reading bytes.
            | "Spread" >> beam.Reshuffle()
            | "ReadBytes"
            >> beam.ParDo(ReadBytes(self.config.max_file_bytes)).with_outputs(DEAD, main="ok")
        )
        dead = (expanded[DEAD], read[DEAD]) | "FlattenReadDead" >> beam.Flatten()
        return read.ok, dead

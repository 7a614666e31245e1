"""Sources: turn the user's `--input` into input records, one per image.

Three kinds, chosen by `AugmentConfig.input_format` (or guessed from the path):
- folder: every file under a directory (recursive) whose extension looks like an image;
- manifest: JSONL, CSV or Parquet (JSONL/CSV may be compressed: `.jsonl.gz`, `.csv.bz2`, ...)
  with an image path/URI column (or a Hugging Face-style `image` struct of bytes and path) and
  optional caption, language and split columns;
- webdataset: tar shards (a file, a glob or a folder of `.tar` / `.tar.gz` / `.tgz` ...),
  members grouped by key (`key.jpg`, `key.txt`, `key.json`); read in memory, never extracted.

Bad input never stops a run: everything is streamed and bounded, and whatever cannot be read
becomes a dead letter with its reference and reason (kinds: `deadletter.PERMANENT_READ_KINDS`).
- Manifests are read line by line (split on `\\n` only: U+2028 inside a JSON string is data);
  a line or CSV row over `MAX_ROW_BYTES`, JSON nested too deep, a CSV field over the limit, a
  path or language that is not a string: that row is a dead letter, the rest go on.
- Relative manifest paths resolve inside the manifest's folder and may not climb out of it
  (`path_outside_manifest`) unless `allow_outside_paths`; absolute paths and URIs are the
  user's explicit choice and stay allowed.
- Tars are opened with the compression their name says (`.tar` is uncompressed: a gzip stream
  named `.tar` is a `bad_tar` dead letter, never inflated); member sizes are checked from the
  header before any byte is read (`max_file_bytes`; `.txt`/`.json` members `MAX_ROW_BYTES`);
  sparse, link and device members are refused (`unsafe_member`); members of one key are
  grouped even when interleaved, within a window of `WDS_GROUP_WINDOW` later keys (and
  `WDS_GROUP_BYTES` held); a member later than that is a `split_sample` dead letter.
- Language codes are normalised once, here, through the translators' language table
  (`en-US`, `pt_BR` -> `en`, `pt`); an unknown code is kept as given and counted.
- `ReadBytes` refuses non-regular local files from `os.stat` before opening them, bounds every
  read, and retries transient errors (object stores, network) before dead-lettering them as
  `read_error` (the one transient kind).

All file access goes through `apache_beam.io.filesystems.FileSystems`, so `gs://` works on
Dataflow. An input record is a dict:
    input_ref, uri, data (bytes or None), split, source_caption, source_caption_error,
    source_language, source_language_given, order (a sort key that fixes which duplicate is
    kept), stats, and read_uri (bytes) for a local file whose name is not UTF-8: it is read by
    those bytes while `uri` and `input_ref` carry it printable (`\\xNN`), since Beam's coders
    and Parquet strings need valid UTF-8.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import posixpath
import re
import stat
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import IO, Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from babelcap.pipelines.accounting import INPUTS, bump
from babelcap.pipelines.deadletter import DEAD, printable, reject
from babelcap.pipelines.options import AugmentConfig
from babelcap.translators.languages import resolve

TEXT_MANIFEST_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".csv")
MANIFEST_EXTENSIONS = (*TEXT_MANIFEST_EXTENSIONS, ".parquet")
# Compressions a text manifest may carry, by extension (Beam's FileSystems decompress them).
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".xz", ".deflate")
# Tar name endings -> tarfile stream mode. Chosen from the name, never sniffed (`r|*` would
# inflate a gzip bomb named `.tar`).
TAR_MODES = {
    ".tar": "r|",
    ".tar.gz": "r|gz",
    ".tgz": "r|gz",
    ".tar.bz2": "r|bz2",
    ".tbz2": "r|bz2",
    ".tar.xz": "r|xz",
    ".txz": "r|xz",
}
IMAGE_COLUMNS = ("image_path", "image", "path", "file", "filename", "file_name", "url", "uri")
CAPTION_COLUMNS = ("caption", "text", "alt_text", "alt", "txt")
LANGUAGE_COLUMNS = ("language", "lang")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
WDS_TEXT_EXTS = ("txt", "json")

# Longest manifest line / CSV row, and largest `.txt`/`.json` tar member, in bytes. A caption
# is at most a few KB; this only stops a runaway row from taking the worker's memory.
MAX_ROW_BYTES = 1024 * 1024
# An interleaved tar (a.png, b.png, a.txt) still groups `a` when its members are at most this
# many keys apart; a sample is emitted once this many newer keys have started (bounded memory).
WDS_GROUP_WINDOW = 16
# ... and while the pending samples hold at most this many bytes (the oldest go out first).
WDS_GROUP_BYTES = 256 * 1024 * 1024
# Keys of emitted samples remembered per tar to recognise a late member (`split_sample`); an
# even later one becomes a sample of its own (accounted for either way).
MAX_REMEMBERED_KEYS = 100_000
# Longest language code (BCP-47 tags in practice stay well under this) and split name.
MAX_LANGUAGE_CHARS = 64
MAX_SPLIT_CHARS = 256
# Transient read errors are retried this many times, waiting READ_BACKOFF_S * 2**attempt.
READ_RETRIES = 3
READ_BACKOFF_S = 0.5

# csv's default field limit is 131,072 characters; a field up to a whole row is allowed (and
# bounded by the row limit), a larger one is a csv.Error for that row only.
csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))


def _strip_compression(lower: str) -> str:
    for suffix in COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            return lower[: -len(suffix)]
    return lower


def tar_mode(path: str) -> str | None:
    """The tarfile stream mode for a tar name (`.tar` -> uncompressed), None if not a tar."""
    lower = path.lower()
    return next((m for ext, m in TAR_MODES.items() if lower.endswith(ext)), None)


def detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".parquet") or _strip_compression(lower).endswith(TEXT_MANIFEST_EXTENSIONS):
        return "manifest"
    if tar_mode(lower) or (".tar" in lower and any(c in lower for c in "*?{[")):
        return "webdataset"
    return "folder"


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _not_regular(path: str) -> str | None:
    """Why a local path may not be opened for reading (a FIFO would block forever), or None
    (remote paths, regular files, and missing ones: opening those fails by itself)."""
    if not _is_local(path):
        return None
    try:
        mode = os.stat(_local(path)).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _file_type(mode)


def _resolve_path(base_dir: str, path: str, allow_outside: bool) -> str | None:
    """A manifest path -> the path to read, or None when a relative path climbs out of the
    manifest's folder (and that is not allowed). URIs and absolute paths are untouched."""
    if "://" in path or path.startswith("/"):
        return path
    rel = posixpath.normpath(path)
    if not allow_outside and (rel == ".." or rel.startswith("../")):
        return None
    if not base_dir:
        return rel
    scheme, sep, rest = base_dir.partition("://")
    joined = posixpath.normpath(posixpath.join(rest if sep else scheme, rel))
    return f"{scheme}://{joined}" if sep else joined


def _dirname(path: str) -> str:
    return FileSystems.split(path)[0]


@lru_cache(maxsize=4096)
def normalize_language(code: str) -> tuple[str, bool]:
    """(canonical code, known): `en-US` / `pt_BR` / `por` -> `en` / `pt`; an unknown code is
    kept as given (trimmed) with known=False."""
    try:
        return resolve(code).code, True
    except ValueError:
        return code.strip(), False


def _record(input_ref: str, order: tuple, **fields: Any) -> dict[str, Any]:
    uri = fields.get("uri")
    if uri is not None and printable(uri) != uri:
        # A local name that is not UTF-8 (kept by surrogateescape) is read by its bytes but
        # carried and stored printable: Beam's coders and Parquet strings need valid UTF-8.
        if _is_local(uri):
            fields["read_uri"] = os.fsencode(_local(uri))
        fields["uri"] = printable(uri)
    order = tuple(printable(x) if isinstance(x, str) else x for x in order)
    rec = {
        "input_ref": printable(input_ref),
        "uri": None,
        "data": None,
        "split": None,
        "source_caption": None,
        "source_caption_error": None,
        "source_language": None,
        "source_language_given": None,
        "order": order,
        "stats": {},
    }
    rec.update(fields)
    bump(rec, INPUTS)
    return rec


def _with_language(rec: dict[str, Any], given: str) -> dict[str, Any]:
    """Set the record's source language from a given code, normalised once here."""
    code, known = normalize_language(given)
    rec["source_language"] = code
    rec["source_language_given"] = given
    if not known:
        bump(rec, "read.language_unknown")
    elif code != given:
        bump(rec, "read.language_normalised")
    return rec


def _text(value: Any) -> tuple[str | None, str | None]:
    """A caption value -> (text, error). Invalid UTF-8 is reported, not guessed at; a value
    that is not text (a number, a list) is reported too, not stringified."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(value, str):
        return None, "not_text"
    try:
        value.encode("utf-8")  # lone surrogates from surrogateescape decoding
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    return value, None


def _pick(row: dict[str, Any], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    if wanted:
        return wanted if wanted in row else None
    return next((c for c in candidates if c in row), None)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _label(value: Any, field: str, max_chars: int) -> str | None:
    """A language code or split name from the input: a short valid-UTF-8 string, or None."""
    if value is None:
        return None
    what = "a string code" if field == "language" else "a string"
    if not isinstance(value, str):
        raise RowError("bad_manifest_row", f"{field} must be {what}, not {_type_name(value)}")
    if printable(value) != value:
        raise RowError("bad_manifest_row", f"{field} is not valid UTF-8: {printable(value)!r}")
    if len(value) > max_chars:
        raise RowError("bad_manifest_row", f"{field} longer than {max_chars} characters")
    return value


class RowError(ValueError):
    """One manifest row or tar sample is unusable: (kind, message) for its dead letter."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _LineReader:
    """`readline(limit)` over any file object with `read(n)` (Beam's decompressing files have
    a readline without a size limit)."""

    CHUNK = 1 << 16

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.buf = b""
        self.pos = 0  # start of the unread part of buf (no copy per line)
        self.eof = False

    def readline(self, limit: int) -> bytes:
        while True:
            end = self.buf.find(b"\n", self.pos, self.pos + limit)
            avail = len(self.buf) - self.pos
            if end >= 0 or avail >= limit or self.eof:
                stop = end + 1 if end >= 0 else self.pos + min(limit, avail)
                line, self.pos = self.buf[self.pos : stop], stop
                return line
            chunk = self.f.read(self.CHUNK)
            if not chunk:
                self.eof = True
            self.buf, self.pos = self.buf[self.pos :] + chunk, 0


def _bounded_lines(f: _LineReader, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line without its `\\n`, count of `"` in it) from a binary stream, split on
    `\\n` only; a line longer than `limit` bytes is skipped without being held (None in its
    place; its quotes still counted, so a CSV reader can keep track of quoted fields)."""
    lineno = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            quotes = line.count(b'"')
            while line and not line.endswith(b"\n"):  # drain the rest of the long line
                line = f.readline(limit + 1)
                quotes += line.count(b'"')
            yield lineno, None, quotes
            continue
        yield lineno, line[:-1] if line.endswith(b"\n") else line, line.count(b'"')


def _decode(line: bytes) -> str:
    # surrogateescape keeps invalid UTF-8 bytes visible (as lone surrogates) so the one bad
    # caption is rejected with a reason instead of the whole manifest failing.
    return line.decode("utf-8", errors="surrogateescape")


class _CsvLines:
    """Feeds csv.reader decoded physical lines; remembers, since the last `mark()`, which were
    over the limit and how many quote characters went by (odd: inside a quoted field)."""

    def __init__(self, lines: Iterator[tuple[int, bytes | None, int]]):
        self.lines = lines
        self.too_long = False
        self.quotes = 0

    def mark(self) -> None:
        self.too_long, self.quotes = False, 0

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        lineno, line, quotes = next(self.lines)
        self.quotes += quotes
        if line is None:
            self.too_long = True
            return '"' * (quotes % 2) + "\n"  # same quoting state as the line it replaces
        text = _decode(line)
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # spreadsheets' UTF-8 byte-order mark
        return text + "\n"

    def skip_quoted_rest(self) -> None:
        """After a csv.Error inside a quoted field: drop the lines up to the one closing it,
        so the next row starts on a row boundary again."""
        while self.quotes % 2:
            try:
                next(self)
            except StopIteration:
                return


class _BoundedTarInfo(tarfile.TarInfo):
    """Tar headers that tarfile itself would read whole (pax / GNU long-name records, the
    extended sparse map) are bounded: a crafted header claiming a gigabyte makes the file a
    `bad_tar` instead of a gigabyte in memory. (`_proc_member` is tarfile's documented
    override point for TarInfo subclasses.)"""

    HEADER_TYPES = (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )

    def _proc_member(self, tar):
        if self.type in self.HEADER_TYPES and self.size > MAX_ROW_BYTES:
            raise tarfile.SubsequentHeaderError(
                f"extended header of {self.size} bytes (> {MAX_ROW_BYTES})"
            )
        if self.type == tarfile.GNUTYPE_SPARSE and getattr(self, "_sparse_structs", (0, 0))[1]:
            raise tarfile.SubsequentHeaderError("sparse member with an extended sparse map")
        return super()._proc_member(tar)


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: `shard-{000..009}.tar` (zero-padded ranges) and `{a,b}`."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi - lo > 1_000_000:
            raise ValueError(f"shard range too large: {{{body}}}")
        width = len(rng.group(1))
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


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
    def _folder(self, folder: str) -> Iterator[Any]:
        if _is_local(folder) and os.path.isfile(_local(folder)):
            # A file of unknown kind is not an empty folder: say so instead of 0 inputs.
            rec = _record(folder, (folder, 0), uri=folder)
            yield reject(
                rec,
                "read",
                "unknown_input",
                f"{folder}: a file, but not a known manifest ({', '.join(MANIFEST_EXTENSIONS)}"
                f", optionally compressed) or tar ({', '.join(TAR_MODES)}); set input_format",
            )
            return
        if _is_local(folder) and not os.path.isdir(_local(folder)):
            rec = _record(folder, (folder, 0), uri=folder)
            yield reject(rec, "read", "missing_file", f"{folder}: no such folder")
            return
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
        why = _not_regular(path)
        if why:
            rec = _record(path, (path, 0))
            yield reject(rec, "read", "not_a_regular_file", f"{path}: {why}")
            return
        lower = path.lower()
        if lower.endswith(".parquet"):
            rows = self._parquet_rows(path)
        elif _strip_compression(lower).endswith(".csv"):
            rows = self._csv_rows(path)
        else:
            rows = self._jsonl_rows(path)
        base = _dirname(path)
        lineno = 0
        while True:
            try:
                lineno, row, error = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # the file itself: missing, corrupt gzip, bad header
                kind = classify_read_error(exc)[0] if isinstance(exc, OSError) else "bad_manifest"
                ref = f"{path}#after:L{lineno}" if lineno else path
                msg = f"{path}: rest of the manifest unreadable: {type(exc).__name__}: {exc}"
                yield reject(_record(ref, (path, lineno + 1)), "read", kind, msg)
                return
            ref = f"{path}#L{lineno}"
            try:
                if error is not None:
                    raise RowError("bad_manifest_row", error)
                yield self._manifest_record(ref, (path, lineno), base, row)
            except RowError as exc:
                yield reject(_record(ref, (path, lineno)), "read", exc.kind, str(exc))
            except Exception as exc:  # any other surprise in one row stays in that row
                msg = f"{type(exc).__name__}: {exc}"
                yield reject(_record(ref, (path, lineno)), "read", "bad_manifest_row", msg)

    def _manifest_record(self, ref: str, order: tuple, base: str, row: dict) -> dict[str, Any]:
        cfg = self.config
        img_col = _pick(row, cfg.image_column, IMAGE_COLUMNS)
        value = row.get(img_col) if img_col else None
        if value is None or value == "":
            raise RowError("bad_manifest_row", f"no image column in {sorted(map(str, row))}")
        data = None
        if isinstance(value, dict):  # Hugging Face `Image` feature: {"bytes", "path"}
            data, value = value.get("bytes"), value.get("path")
            if data is not None and not isinstance(data, bytes):
                raise RowError("bad_manifest_row", f"image bytes are a {_type_name(data)}")
            if data is None and not value:
                raise RowError("bad_manifest_row", "image struct with neither bytes nor path")
        if value is not None and not isinstance(value, str):
            raise RowError(
                "bad_manifest_row", f"image path must be a string, not {_type_name(value)}"
            )
        if value is not None and ("\x00" in value or not value.strip()):
            raise RowError("bad_manifest_row", f"bad image path {value[:200]!r}")
        if data is not None:
            if len(data) > cfg.max_file_bytes:
                raise RowError("file_too_large", f"embedded image > {cfg.max_file_bytes} bytes")
            uri = value or ref
        else:
            uri = _resolve_path(base, value, cfg.allow_outside_paths)
            if uri is None:
                raise RowError(
                    "path_outside_manifest",
                    f"{value[:200]!r} leaves the manifest's folder {base} "
                    "(use an absolute path, or allow_outside_paths)",
                )
        cap_col = _pick(row, cfg.caption_column, CAPTION_COLUMNS)
        caption, cap_err = _text(row.get(cap_col)) if cap_col else (None, None)
        lang_col = _pick(row, cfg.language_column, LANGUAGE_COLUMNS)
        language = _label(row.get(lang_col) if lang_col else None, "language", MAX_LANGUAGE_CHARS)
        split = _label(row.get("split"), "split", MAX_SPLIT_CHARS)
        rec = _record(
            ref,
            order,
            uri=uri,
            data=data,
            split=split or None,
            source_caption=caption,
            source_caption_error=cap_err,
        )
        return _with_language(rec, (language or "").strip() or cfg.source_language)

    @staticmethod
    def _open_text(path: str) -> IO[bytes]:
        # Compression from the name (`.jsonl.gz`); Beam streams it (remote files too).
        return FileSystems.open(path, compression_type=CompressionTypes.AUTO)

    def _jsonl_rows(self, path: str) -> Iterator[tuple[int, dict, str | None]]:
        with self._open_text(path) as f:
            for lineno, line, _ in _bounded_lines(_LineReader(f), MAX_ROW_BYTES):
                if line is None:
                    yield lineno, {}, f"line longer than {MAX_ROW_BYTES} bytes"
                    continue
                text = _decode(line)
                if lineno == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except RecursionError:
                    yield lineno, {}, "invalid JSON: nested too deeply"
                    continue
                except ValueError as exc:
                    hint = ""
                    if text.lstrip().startswith("[") and lineno <= 2:
                        hint = " (a JSON array file? manifests are JSON Lines: one object a line)"
                    yield lineno, {}, f"invalid JSON: {exc}{hint}"
                    continue
                if not isinstance(row, dict):
                    yield lineno, {}, f"not a JSON object but a {_type_name(row)}"
                    continue
                yield lineno, row, None

    def _csv_rows(self, path: str) -> Iterator[tuple[int, dict, str | None]]:
        with self._open_text(path) as f:
            lines = _CsvLines(_bounded_lines(_LineReader(f), MAX_ROW_BYTES))
            reader = csv.reader(lines)
            header: list[str] | None = None
            while True:
                start = reader.line_num + 1
                lines.mark()
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if header is None:
                        raise ValueError(f"unreadable CSV header: {exc}") from exc
                    lines.skip_quoted_rest()
                    yield start, {}, f"CSV: {exc}"
                    continue
                if lines.too_long:
                    if header is None:
                        raise ValueError(f"CSV header longer than {MAX_ROW_BYTES} bytes")
                    yield start, {}, f"row longer than {MAX_ROW_BYTES} bytes"
                    continue
                if header is None:
                    header = [h.strip() for h in values]
                    continue
                if not any(v.strip() for v in values):
                    continue  # blank line
                yield start, dict(zip(header, values, strict=False)), None

    def _parquet_rows(self, path: str) -> Iterator[tuple[int, dict, str | None]]:
        import pyarrow.parquet as pq

        # Read from the open file in small batches (never the whole file into memory): a
        # Hugging Face manifest can carry every image's bytes.
        cfg = self.config
        wanted = {
            *((cfg.image_column,) if cfg.image_column else IMAGE_COLUMNS),
            *((cfg.caption_column,) if cfg.caption_column else CAPTION_COLUMNS),
            *((cfg.language_column,) if cfg.language_column else LANGUAGE_COLUMNS),
            "split",
        }
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            pf = pq.ParquetFile(f)
            # Only the columns a row needs are read (a dataset's embeddings or other images
            # stay on disk).
            names = pf.schema_arrow.names
            columns = [n for n in names if n in wanted]
            images = (cfg.image_column,) if cfg.image_column else IMAGE_COLUMNS
            if not any(c in columns for c in images):
                raise ValueError(f"no image column ({', '.join(images)}) among {names[:50]}")
            i = 0
            for batch in pf.iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    i += 1
                    yield i, row, None

    # --- webdataset ---------------------------------------------------------------------
    def _webdataset(self, pattern: str) -> Iterator[Any]:
        tars: list[str] = []
        for part in expand_braces(pattern):
            if any(c in part for c in "*?[") or tar_mode(part):
                found = [m.path for m in FileSystems.match([part])[0].metadata_list]
                tars += (
                    [p for p in found if tar_mode(p)] if any(c in part for c in "*?[") else found
                )
            else:
                metas = FileSystems.match([part.rstrip("/") + "/**"])[0].metadata_list
                tars += [m.path for m in metas if tar_mode(m.path)]
        if not tars:  # say so, instead of a run of zero inputs
            rec = _record(pattern, (pattern, 0), uri=pattern)
            yield reject(rec, "read", "missing_file", f"{pattern}: no tar file found")
            return
        for tar_path in sorted(set(tars)):
            yield from self._tar_samples(tar_path)

    def _tar_samples(self, tar_path: str) -> Iterator[Any]:
        why = _not_regular(tar_path)
        if why:
            rec = _record(tar_path, (tar_path, 0))
            yield reject(rec, "read", "not_a_regular_file", f"{tar_path}: {why}")
            return
        mode = tar_mode(tar_path) or "r|"
        pending: OrderedDict[str, dict[str, Any]] = OrderedDict()  # key -> sample being built
        emitted: OrderedDict[str, None] = OrderedDict()  # recent keys already emitted
        held = [0]  # bytes of the pending samples
        index = 0

        def emit(key: str, sample: dict[str, Any]) -> Any:
            nonlocal index
            index += 1
            return self._sample(tar_path, key, sample, index - 1)

        def add(key: str, ext: str, info: tarfile.TarInfo, read) -> Iterator[Any]:
            if key in emitted:  # its sample is gone already: this member alone is the input
                nonlocal index
                rec = _record(f"{tar_path}#{key}.{ext}", (tar_path, index))
                index += 1
                yield reject(
                    rec,
                    "read",
                    "split_sample",
                    f"member {info.name!r} came after its sample was emitted (more than "
                    f"{WDS_GROUP_WINDOW} keys or {WDS_GROUP_BYTES} bytes later); keep a "
                    "sample's members together",
                )
                return
            sample = pending.setdefault(
                key, {"members": {}, "problems": [], "names": [], "bytes": 0}
            )
            if len(sample["names"]) < 100:  # for messages only; a key may have many members
                sample["names"].append(posixpath.basename(info.name))
            problem = self._member_problem(info, ext)
            if problem:
                sample["problems"] = [*sample["problems"], problem][:5]
            elif ext in sample["members"]:
                sample["problems"].append(("bad_sample", f"duplicate member {info.name!r}"))
                sample["problems"] = sample["problems"][:5]
            elif ext in WDS_IMAGE_EXTS or ext in WDS_TEXT_EXTS:
                sample["members"][ext] = read(info)
                sample["bytes"] += info.size
                held[0] += info.size
            # Emit the oldest samples once the window of keys, or of bytes held, is full.
            while len(pending) > WDS_GROUP_WINDOW or (
                held[0] > WDS_GROUP_BYTES and len(pending) > 1
            ):
                old_key, old = pending.popitem(last=False)
                held[0] -= old["bytes"]
                emitted[old_key] = None
                if len(emitted) > MAX_REMEMBERED_KEYS:
                    emitted.popitem(last=False)
                yield emit(old_key, old)

        last_key = ""
        try:
            with (
                FileSystems.open(tar_path, compression_type=CompressionTypes.UNCOMPRESSED) as f,
                tarfile.open(fileobj=f, mode=mode, tarinfo=_BoundedTarInfo) as tar,
            ):

                def read(info: tarfile.TarInfo) -> bytes:
                    data = tar.extractfile(info)
                    return data.read(info.size) if data else b""

                for info in tar:
                    if info.isdir():
                        continue
                    base = posixpath.basename(info.name)
                    if "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    key = posixpath.join(posixpath.dirname(info.name), stem)
                    last_key = key
                    yield from add(key, ext.lower(), info, read)
        except Exception as exc:  # tarfile/zlib/lzma/bz2/OS errors: all mean a bad file
            # The rest of this file is unreadable: what was read so far still counts; the
            # rest is one dead letter for the file (no tar header tells how many samples).
            for key, sample in pending.items():
                yield emit(key, sample)
            pending.clear()
            ref = f"{tar_path}#after:{last_key}" if last_key else tar_path
            rec = _record(ref, (tar_path, index))
            yield reject(rec, "read", "bad_tar", f"{tar_path}: {self._tar_hint(tar_path, exc)}")
            return
        for key, sample in pending.items():
            yield emit(key, sample)

    def _member_problem(self, info: tarfile.TarInfo, ext: str) -> tuple[str, str] | None:
        """Why a member may not be read (from its header alone), or None."""
        if info.issparse():
            return "unsafe_member", f"{info.name!r} is a sparse member"
        if info.issym() or info.islnk():
            return "unsafe_member", f"{info.name!r} is a link to {info.linkname!r}"
        if not info.isreg():
            return "unsafe_member", f"{info.name!r} is a device, FIFO or special member"
        limit = MAX_ROW_BYTES if ext in WDS_TEXT_EXTS else self.config.max_file_bytes
        if info.size > limit and (ext in WDS_IMAGE_EXTS or ext in WDS_TEXT_EXTS):
            return "file_too_large", f"{info.name!r} is {info.size} bytes (> {limit})"
        return None

    @staticmethod
    def _tar_hint(tar_path: str, exc: BaseException) -> str:
        try:
            with FileSystems.open(tar_path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                magic = f.read(6)
        except Exception:
            magic = b""
        found = {
            b"\x1f\x8b": "gzip",
            b"BZh": "bzip2",
            b"\xfd7zXZ": "xz",
            b"\x28\xb5\x2f\xfd": "zstd",
        }
        for head, name in found.items():
            if magic.startswith(head) and tar_mode(tar_path) == "r|":
                return f"{name} data in a file named .tar (name it .tar.gz etc.): {exc}"
        return f"{type(exc).__name__}: {exc}"

    def _sample(self, tar_path: str, key: str, sample: dict[str, Any], index: int) -> Any:
        cfg = self.config
        ref = f"{tar_path}#{key}"
        members = sample["members"]
        image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
        rec = _record(
            ref,
            (tar_path, index),
            uri=ref,
            data=members.get(image_ext) if image_ext else None,
        )
        if sample["problems"]:
            kind, message = sample["problems"][0]
            return reject(rec, "read", kind, f"{ref}: {message}")
        if image_ext is None:
            return reject(rec, "read", "no_image_in_sample", f"members: {sorted(sample['names'])}")
        caption, cap_err, language = None, None, None
        if "txt" in members:
            caption, cap_err = _text(members["txt"])
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except (ValueError, RecursionError) as exc:
                return reject(rec, "read", "bad_sample", f"{ref}.json: invalid JSON: {exc}"[:500])
            if not isinstance(meta, dict):
                return reject(rec, "read", "bad_sample", f"{ref}.json is a {_type_name(meta)}")
            if caption is None and cap_err is None:
                value = next((meta[c] for c in CAPTION_COLUMNS if c in meta), None)
                caption, cap_err = _text(value)
            try:
                language = _label(
                    meta.get("language", meta.get("lang")), "language", MAX_LANGUAGE_CHARS
                )
                rec["split"] = _label(meta.get("split"), "split", MAX_SPLIT_CHARS) or None
            except RowError as exc:
                return reject(rec, "read", "bad_sample", f"{ref}.json: {exc}")
        rec["source_caption"], rec["source_caption_error"] = caption, cap_err
        return _with_language(rec, (language or "").strip() or cfg.source_language)


# --- reading bytes ------------------------------------------------------------------------
# OSErrors that the path itself causes; any other OSError (EIO, ECONNRESET, ETIMEDOUT, ESTALE
# on NFS...) may pass and is retried.
_PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EINVAL,
    errno.ENXIO,
}
_TRANSIENT_NAMES = (
    "Timeout",
    "Unavailable",
    "Connection",
    "TooManyRequests",
    "ServerError",
    "InternalServerError",
    "ServiceUnavailable",
    "BadGateway",
    "BrokenPipe",
    "Retry",
)


def classify_read_error(exc: BaseException) -> tuple[str, bool]:
    """(dead-letter kind, transient) for an exception raised while reading a file."""
    details = getattr(exc, "exception_details", None)  # BeamIOError: {path: cause}
    if isinstance(details, dict) and details:
        return classify_read_error(next(iter(details.values())))
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, FileNotFoundError):
        return "missing_file", False
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return "not_a_regular_file", False
    if isinstance(exc, PermissionError):
        return "permission_denied", False
    if any(n in type(exc).__name__ for n in _TRANSIENT_NAMES):
        return "read_error", True
    if isinstance(exc, OSError):
        if exc.errno in _PERMANENT_ERRNOS:
            return "unreadable", False
        return "read_error", True  # EIO, ECONNRESET, timeouts, ...: may pass
    if cause is not None and cause is not exc:
        return classify_read_error(cause)
    return "unreadable", False


class ReadBytes(beam.DoFn):
    """Fetch the image bytes of records that only carry a URI; bounded, retried, and every
    failure a dead letter with a transient or permanent kind."""

    def __init__(
        self, max_file_bytes: int, retries: int = READ_RETRIES, backoff_s: float = READ_BACKOFF_S
    ):
        self.max_file_bytes = max_file_bytes
        self.retries = retries
        self.backoff_s = backoff_s

    def process(self, rec: dict[str, Any]) -> Iterator[Any]:
        if rec["data"] is not None:
            if len(rec["data"]) > self.max_file_bytes:  # bytes carried in from a manifest/tar
                yield reject(
                    rec, "read", "file_too_large", f"{rec['uri']}: > {self.max_file_bytes} bytes"
                )
                return
            yield rec
            return
        uri = rec.get("read_uri") or rec["uri"]  # bytes: a local name that is not UTF-8
        attempt = 0
        while True:
            try:
                data = self._read(uri)
                break
            except _Refused as exc:
                yield reject(rec, "read", exc.kind, f"{rec['uri']}: {exc}")
                return
            except Exception as exc:  # BeamIOError / OSError / a client library's own errors
                kind, transient = classify_read_error(exc)
                if transient and attempt < self.retries:
                    time.sleep(self.backoff_s * 2**attempt)
                    attempt += 1
                    continue
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                msg = f"{rec['uri']}: {type(exc).__name__}: {exc}{tries}"
                yield reject(rec, "read", kind, msg)
                return
        if data is None:
            msg = f"{rec['uri']}: > {self.max_file_bytes} bytes"
            yield reject(rec, "read", "file_too_large", msg)
            return
        rec = {**rec, "data": data}
        rec.pop("read_uri", None)
        bump(rec, "read.ok")
        if attempt:
            bump(rec, "read.retried")
        yield rec

    def _read(self, uri: str | bytes) -> bytes | None:
        """The file's bytes, or None when it is larger than the limit."""
        limit = self.max_file_bytes
        if isinstance(uri, bytes) or _is_local(uri):
            path = uri if isinstance(uri, bytes) else _local(uri)
            st = os.stat(path)  # FileNotFoundError etc. classify as permanent
            if not stat.S_ISREG(st.st_mode):
                raise _Refused("not_a_regular_file", _file_type(st.st_mode))
            if st.st_size > limit:
                return None
            # O_NONBLOCK: should the path have become a FIFO since the stat, open does not
            # block; fstat then refuses it.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise _Refused("not_a_regular_file", _file_type(st.st_mode))
                data = f.read(limit + 1)
        else:
            with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read(limit + 1)
        return None if len(data) > limit else data


class _Refused(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return f"{name}, not a regular file (not opened)"
    return "not a regular file (not opened)"


class ReadInputs(beam.PTransform):
    """`--input` -> input records (main output) and rejects (tagged `DEAD`). `keep`, when
    given, makes the transform that selects the listed inputs (and listing rejects) to read,
    e.g. one work unit's: applied before any file's bytes are read."""

    def __init__(self, config: AugmentConfig, keep: Callable[[], beam.PTransform] | None = None):
        super().__init__()
        self.config = config
        self.keep = keep

    def expand(self, pbegin):
        expanded = (
            pbegin
            | "Input" >> beam.Create([self.config.input])
            | "Expand" >> beam.ParDo(ExpandInput(self.config)).with_outputs(DEAD, main="records")
        )
        listed, listing_dead = expanded.records, expanded[DEAD]
        if self.keep is not None:
            listed = listed | "Keep" >> self.keep()
            listing_dead = listing_dead | "KeepDead" >> self.keep()
        read = (
            listed
            # Listing/parsing happens in one worker; spread the records before reading bytes.
            | "Spread" >> beam.Reshuffle()
            | "ReadBytes"
            >> beam.ParDo(ReadBytes(self.config.max_file_bytes)).with_outputs(DEAD, main="ok")
        )
        dead = (listing_dead, read[DEAD]) | "FlattenReadDead" >> beam.Flatten()
        return read.ok, dead

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
- Compressed manifests and tars are inflated here, `INFLATE_CHUNK` bytes at a time (`_Inflate`;
  never Beam's CompressedFile, which inflates 16 MiB of compressed input in one call): a gzip
  bomb costs the line limit, not its inflated size. The compression comes from the name.
- Parquet manifests are read in batches of about `PARQUET_BATCH_BYTES`, sized from the footer;
  a row group whose needed columns are over `parquet_group_limit` (uncompressed, from the
  footer) is refused unread, and an embedded image over `max_file_bytes` is refused from its
  Arrow length before it is copied out.
- Relative manifest paths resolve inside the manifest's folder and may not climb out of it
  (`path_outside_manifest`), by name or through a symlink (local paths are checked by their
  real path), unless `allow_outside_paths`; absolute paths and URIs are the user's explicit
  choice and stay allowed.
- Tars are opened with the compression their name says (`.tar` is uncompressed: a gzip stream
  named `.tar` is a `bad_tar` dead letter, never inflated); member sizes are checked from the
  header before any byte is read (`max_file_bytes`; `.txt`/`.json` members `MAX_ROW_BYTES`);
  sparse, link and device members are refused (`unsafe_member`); members of one key are
  grouped even when interleaved, within a window of `WDS_GROUP_WINDOW` later keys (and
  `WDS_GROUP_BYTES` held); a member later than that is a `split_sample` dead letter.
- Language codes are normalised once, here, through the translators' language table
  (`en-US`, `pt_BR` -> `en`, `pt`); an unknown code is kept as given and counted.
- Transient errors (object stores, network: `classify_read_error`) are retried with bounded
  backoff: `ReadBytes` retries the whole read; a manifest or tar being streamed is reopened at
  the byte where it failed (`_RetryingStream`) and read on. What still fails after the retries
  is dead-lettered as `read_error`, the transient kind `--retry-failed` reprocesses.
- `ReadBytes` refuses non-regular local files from `os.stat` before opening them, and bounds
  every read.
- Within a work unit, every planned input the reader did not emit (the manifest changed or
  failed part way since the driver listed it) becomes a `not_read` dead letter (`ReadInputs`),
  so a unit's books balance against its plan, not only against what was read.

All file access goes through `apache_beam.io.filesystems.FileSystems`, so `gs://` works on
Dataflow. An input record is a dict:
    input_ref, uri, data (bytes or None), split, source_caption, source_caption_error,
    source_language, source_language_given, order (a sort key that fixes which duplicate is
    kept), stats, and read_uri (bytes) for a local file whose name is not UTF-8: it is read by
    those bytes while `uri` and `input_ref` carry it printable (`\\xNN`), since Beam's coders
    and Parquet strings need valid UTF-8.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import errno
import http.client
import io
import json
import logging
import lzma
import os
import posixpath
import re
import stat
import tarfile
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator
from functools import lru_cache
from typing import IO, Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from babelcap.pipelines.accounting import INPUTS, bump
from babelcap.pipelines.deadletter import DEAD, clip, printable, reject
from babelcap.pipelines.options import AugmentConfig
from babelcap.translators.languages import resolve

log = logging.getLogger(__name__)

TEXT_MANIFEST_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".csv")
MANIFEST_EXTENSIONS = (*TEXT_MANIFEST_EXTENSIONS, ".parquet")
# Compressions a text manifest may carry, by extension -> how `_Inflate` reads it (the names
# Beam's FileSystems know; `zst` needs the `zstandard` package).
COMPRESSION_SUFFIXES = {
    ".gz": "gz",
    ".bz2": "bz2",
    ".zst": "zst",
    ".zstd": "zst",
    ".xz": "xz",
    ".lzma": "xz",
    ".deflate": "deflate",
}
# Tar name endings -> stream mode (`r|` + compression). Chosen from the name, never sniffed
# (`r|*` would inflate a gzip bomb named `.tar`); the tar itself is always read with `r|`
# over `_Inflate`, which bounds what one read inflates.
TAR_MODES = {
    ".tar": "r|",
    ".tar.gz": "r|gz",
    ".tgz": "r|gz",
    ".tar.bz2": "r|bz2",
    ".tbz2": "r|bz2",
    ".tar.xz": "r|xz",
    ".txz": "r|xz",
    ".tar.zst": "r|zst",
    ".tzst": "r|zst",
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
# Transient read errors are retried this many times, waiting READ_BACKOFF_S * 2**attempt (at
# most READ_BACKOFF_MAX_S); a streamed manifest or tar is reopened at most STREAM_REOPENS times
# in all (each failure that passes counts: a flaky store cannot keep one file going forever).
READ_RETRIES = 3
READ_BACKOFF_S = 0.5
READ_BACKOFF_MAX_S = 8.0
STREAM_REOPENS = 12
# Compressed input: raw bytes are read, and inflated, this many bytes per step.
RAW_CHUNK = 1 << 16
INFLATE_CHUNK = 1 << 16
# Memory an xz or zstd decoder may use for the window its header asks for (xz -9 needs 65 MiB;
# zstd's own default limit is this): a header asking for more is a dead letter, not an
# allocation.
MAX_DECODER_BYTES = 128 << 20
# Parquet manifests: a batch holds about this many bytes of the needed columns (from the
# footer's sizes; at least one row, at most PARQUET_BATCH_ROWS rows) ...
PARQUET_BATCH_BYTES = 8 << 20
PARQUET_BATCH_ROWS = 64
# ... and a row group whose needed columns hold more than this (uncompressed, from the footer)
# is refused without being read (pyarrow inflates a data page whole): at least
# 4 x max_file_bytes, so that rows of images up to the file limit always fit.
PARQUET_GROUP_BYTES = 256 << 20

# csv's default field limit is 131,072 characters; a field up to a whole row is allowed (and
# bounded by the row limit), a larger one is a csv.Error for that row only.
csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))


def _strip_compression(lower: str) -> str:
    for suffix in COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            return lower[: -len(suffix)]
    return lower


def compression_of(path: str) -> str | None:
    """The compression a manifest's name says (`m.jsonl.gz` -> `gz`), or None."""
    lower = path.lower()
    return next((c for ext, c in COMPRESSION_SUFFIXES.items() if lower.endswith(ext)), None)


def parquet_group_limit(max_file_bytes: int) -> int:
    """Largest Parquet row group (uncompressed bytes of the columns read) read at all."""
    return max(PARQUET_GROUP_BYTES, 4 * max_file_bytes)


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


def _resolve_path(
    base_dir: str, path: str, allow_outside: bool, base_real: str | None = None
) -> str | None:
    """A manifest path -> the path to read, or None when a relative path leaves the manifest's
    folder (and that is not allowed). URIs and absolute paths are untouched.

    `..` is resolved by name (as in a URL); then, for a local path, the file it names must
    really lie inside the folder, symlinks followed (`imgs -> /` in the folder does not make
    `imgs/etc/passwd` readable). `base_real`: the folder's real path, when known already."""
    if "://" in path or path.startswith("/"):
        return path
    rel = posixpath.normpath(path)
    if not allow_outside and (rel == ".." or rel.startswith("../")):
        return None
    if not base_dir:
        joined = rel
    else:
        scheme, sep, rest = base_dir.partition("://")
        joined = posixpath.normpath(posixpath.join(rest if sep else scheme, rel))
        joined = f"{scheme}://{joined}" if sep else joined
    if not allow_outside and _is_local(joined):
        root = base_real or _real_folder(base_dir)
        real = os.path.realpath(_local(joined))
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            return None
    return joined


def _real_folder(folder: str) -> str:
    return os.path.realpath(_local(folder) or ".")


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
        raise RowError(
            "bad_manifest_row", f"{field} is not valid UTF-8: {clip(printable(value), 100)!r}"
        )
    if len(value) > max_chars:
        raise RowError("bad_manifest_row", f"{field} longer than {max_chars} characters")
    return value


class RowError(ValueError):
    """One manifest row or tar sample is unusable: (kind, message) for its dead letter."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ReadFailed(Exception):
    """Reading a manifest or tar failed for a reason of the file, not of its content (missing,
    permissions, or a transient error that outlived the retries): `kind` is the dead-letter
    kind (`read_error` when transient)."""

    def __init__(self, kind: str, transient: bool, message: str):
        super().__init__(message)
        self.kind = kind
        self.transient = transient


class _RetryingStream(io.RawIOBase):
    """A file opened through Beam's FileSystems (raw bytes, no decompression) whose transient
    errors (`classify_read_error`) are retried with bounded backoff: the file is reopened and
    positioned at the byte where it failed (seek, or reading up to it), so a decompressor, a
    line reader or tarfile above it reads on as if nothing happened. A permanent error, or a
    transient one that outlives the retries, raises `ReadFailed`."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.retries = READ_RETRIES
        self.backoff_s = READ_BACKOFF_S
        self.pos = 0
        self.reopens = 0
        self.f: Any = None
        self._do(lambda f: None)  # open now: a missing file fails here, with its kind

    def _open(self) -> Any:
        f = FileSystems.open(self.path, compression_type=CompressionTypes.UNCOMPRESSED)
        if self.pos:
            if getattr(f, "seekable", lambda: False)():
                f.seek(self.pos)
            else:  # read up to where we were, in bounded steps
                left = self.pos
                while left:
                    got = len(f.read(min(left, RAW_CHUNK)))
                    if not got:
                        raise ValueError(f"{self.path} is shorter than when it was opened")
                    left -= got
        return f

    def _do(self, op: Callable[[Any], Any]) -> Any:
        attempt = 0
        while True:
            try:
                if self.f is None:
                    self.f = self._open()
                return op(self.f)
            except Exception as exc:
                kind, transient = classify_read_error(exc)
                self._drop()
                if not transient or attempt >= self.retries or self.reopens >= STREAM_REOPENS:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    msg = f"{type(exc).__name__}: {exc}{tries}"
                    raise ReadFailed(kind, transient, msg) from exc
                log.warning(
                    "%s: %s: %s; reopening at byte %d", self.path, type(exc).__name__, exc, self.pos
                )
                time.sleep(min(READ_BACKOFF_MAX_S, self.backoff_s * 2**attempt))
                attempt += 1
                self.reopens += 1

    def _drop(self) -> None:
        f, self.f = self.f, None
        if f is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                f.close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self._do(lambda f: getattr(f, "seekable", lambda: False)()))

    def read(self, size: int | None = -1) -> bytes:
        n = -1 if size is None else size
        data = self._do(lambda f: f.read(n))
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = self._do(lambda f: f.seek(offset, whence))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self._drop()
        super().close()


class _Zlib:
    """zlib's decompressobj with the interface of bz2's and lzma's decompressors (input not
    consumed because of `max_length` is kept here, not handed back)."""

    def __init__(self, wbits: int):
        self.d = zlib.decompressobj(wbits)
        self.tail = b""

    @property
    def eof(self) -> bool:
        return self.d.eof

    @property
    def unused_data(self) -> bytes:
        return self.d.unused_data

    @property
    def needs_input(self) -> bool:
        return not self.tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self.d.decompress(self.tail + data if self.tail else data, max_length)
        self.tail = self.d.unconsumed_tail
        return out


class _Inflate(io.RawIOBase):
    """Streaming decompression in which every `read(n)` inflates at most n bytes (at most
    `INFLATE_CHUNK` for `read()`), from `RAW_CHUNK` compressed bytes at a time: a small file
    that inflates to gigabytes is never in memory at once. Memory is the caller's buffer plus
    the decoder's window (32 KiB for gzip/deflate, about 4 MiB for bzip2, at most
    `MAX_DECODER_BYTES` for xz). Concatenated streams (multi-member gzip, pbzip2, xz) are read
    on; a stream that ends before its end marker (a cut download) raises EOFError."""

    def __init__(self, raw: IO[bytes], kind: str):
        super().__init__()
        if kind not in ("gz", "deflate", "bz2", "xz"):
            raise ValueError(f"unknown compression {kind!r}")
        self.raw = raw
        self.kind = kind
        self.d = self._new()
        self.done = False

    def _new(self) -> Any:
        if self.kind == "gz":
            return _Zlib(16 + zlib.MAX_WBITS)
        if self.kind == "deflate":
            return _Zlib(zlib.MAX_WBITS)
        if self.kind == "bz2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor(memlimit=MAX_DECODER_BYTES)  # .xz and .lzma alike

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        n = INFLATE_CHUNK if size is None or size < 0 else size
        if n == 0 or self.done:
            return b""
        while True:
            if self.d.eof:  # a stream ended: another may follow (concatenated files)
                data = self.d.unused_data
                while True:
                    if self.kind == "gz":
                        data = data.lstrip(b"\0")  # gzip allows zero padding at the end
                    if data:
                        break
                    data = self.raw.read(RAW_CHUNK)
                    if not data:
                        self.done = True
                        return b""
                self.d = self._new()
            elif self.d.needs_input:
                data = self.raw.read(RAW_CHUNK)
                if not data:
                    out = self.d.decompress(b"", n)  # what the decoder still holds
                    if out:
                        return out
                    raise EOFError(
                        f"the {self.kind} data ends before its end marker (a cut or partial file)"
                    )
            else:
                data = b""
            out = self.d.decompress(data, n)
            if out:
                return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decompressing(raw: IO[bytes], kind: str | None) -> IO[bytes]:
    """`raw` read through the decompression `kind` (None: as it is), bounded per read."""
    if not kind:
        return raw
    if kind == "zst":
        try:
            import zstandard
        except ImportError as exc:
            raw.close()
            raise ValueError(
                "zstd data needs the `zstandard` package (pip install zstandard)"
            ) from exc
        decoder = zstandard.ZstdDecompressor(max_window_size=MAX_DECODER_BYTES)
        return decoder.stream_reader(raw, read_size=RAW_CHUNK, read_across_frames=True)
    return _Inflate(raw, kind)


def open_stream(path: str, compression: str | None = None) -> IO[bytes]:
    """A manifest or tar for streaming: raw bytes through FileSystems (any filesystem), with
    transient errors retried (`_RetryingStream`) and `compression` inflated a bounded step at a
    time (`_Inflate`). Raises ReadFailed when the file cannot be opened."""
    return _decompressing(_RetryingStream(path), compression)


class _LineReader:
    """`readline(limit)` over any file object with `read(n)`."""

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
    """Feeds csv.reader decoded physical lines; remembers, since the last `mark()` (one row),
    its first and last line numbers, whether a line was over the limit, how many quote
    characters went by (odd: inside a quoted field), and the lines themselves (up to
    `RESYNC_BYTES`), so that a row a never-closed quote ran to the end of the file can be
    read again from its second line (`resync`). `exhausted`: the file has ended."""

    RESYNC_BYTES = 2 * MAX_ROW_BYTES

    def __init__(self, lines: Iterator[tuple[int, bytes | None, int]]):
        self.lines = lines
        self.pushed: deque[tuple[int, bytes | None, int]] = deque()  # lines to give again
        self.exhausted = False
        self.mark()

    def mark(self) -> None:
        self.too_long, self.quotes = False, 0
        self.first = self.last = 0
        self.kept: list[tuple[int, bytes | None, int]] | None = []
        self.kept_bytes = 0

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        if self.pushed:
            item = self.pushed.popleft()
        else:
            try:
                item = next(self.lines)
            except StopIteration:
                self.exhausted = True
                raise
        lineno, line, quotes = item
        self.first = self.first or lineno
        self.last = lineno
        self.quotes += quotes
        if self.kept is not None:
            self.kept_bytes += MAX_ROW_BYTES if line is None else len(line)
            if self.kept_bytes > self.RESYNC_BYTES:
                self.kept = None  # too much to read again
            else:
                self.kept.append(item)
        if line is None:
            self.too_long = True
            return '"' * (quotes % 2) + "\n"  # same quoting state as the line it replaces
        text = _decode(line)
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # spreadsheets' UTF-8 byte-order mark
        return text + "\n"

    def span(self) -> str:
        """For a message: the lines the current row took, when more than one."""
        if self.last <= self.first:
            return ""
        n = self.last - self.first + 1
        return f" (lines L{self.first}-L{self.last}, {n} lines, taken as one row)"

    def resync(self) -> bool:
        """Give the current row's lines but its first again (after a quote opened in the first
        line ran to the end of the file); False when there are none or they were not kept."""
        if not self.kept or len(self.kept) < 2:
            return False
        self.pushed.extendleft(reversed(self.kept[1:]))
        self.exhausted = False
        return True

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


def _parquet_sizes(batch: Any, image_col: str) -> tuple[list[int], list[int]]:
    """Per row of an Arrow record batch: (bytes of its embedded image, bytes of its other
    string and binary values), from Arrow's own lengths: nothing is copied out. The image is
    the image column when it holds bytes, or the `bytes` field of its struct (Hugging Face)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    image, other = [0] * n, [0] * n
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_struct(col.type):
            parts = [
                (col.type.field(k).name == "bytes", pc.struct_field(col, [k]))
                for k in range(col.type.num_fields)
            ]
        else:
            parts = [(True, col)]
        for is_bytes_field, arr in parts:
            try:
                lengths = pc.binary_length(arr).to_pylist()
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid, TypeError):
                continue  # not a string or binary value (a number, a list...)
            binary = pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)
            target = image if name == image_col and binary and is_bytes_field else other
            for j, length in enumerate(lengths):
                if length:
                    target[j] += length
    return image, other


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
        if _is_local(folder):
            try:
                mode = os.stat(_local(folder)).st_mode
            except OSError as exc:
                kind = classify_read_error(exc)[0]
                why = "no such folder" if kind == "missing_file" else f"{type(exc).__name__}: {exc}"
                rec = _record(folder, (folder, 0), uri=folder)
                yield reject(rec, "read", kind, f"{folder}: {why}")
                return
            if stat.S_ISREG(mode):
                # A file of unknown kind is not an empty folder: say so instead of 0 inputs.
                rec = _record(folder, (folder, 0), uri=folder)
                yield reject(
                    rec,
                    "read",
                    "unknown_input",
                    f"{folder}: a file, but not a known manifest "
                    f"({', '.join(MANIFEST_EXTENSIONS)}, optionally compressed: "
                    f"{', '.join(COMPRESSION_SUFFIXES)}) or tar ({', '.join(TAR_MODES)}); set "
                    "input_format",
                )
                return
            if not stat.S_ISDIR(mode):  # a FIFO, device or socket: never opened
                rec = _record(folder, (folder, 0), uri=folder)
                yield reject(rec, "read", "not_a_regular_file", f"{folder}: {_file_type(mode)}")
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
        base_real = _real_folder(base) if _is_local(base or ".") else None
        lineno = 0
        while True:
            try:
                lineno, row, error = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # the file itself: missing, cut, corrupt, bad header
                if isinstance(exc, ReadFailed):  # its kind: missing, read_error (transient)...
                    kind, why = exc.kind, str(exc)
                else:  # the content: corrupt compression, CSV header, Parquet structure
                    kind, why = "bad_manifest", f"{type(exc).__name__}: {exc}"
                ref = f"{path}#after:L{lineno}" if lineno else path
                msg = f"{path}: rest of the manifest unreadable: {why}"
                yield reject(_record(ref, (path, lineno + 1)), "read", kind, msg)
                return
            ref = f"{path}#L{lineno}"
            try:
                if isinstance(error, RowError):
                    raise error
                if error is not None:
                    raise RowError("bad_manifest_row", error)
                yield self._manifest_record(ref, (path, lineno), base, row, base_real)
            except RowError as exc:
                yield reject(_record(ref, (path, lineno)), "read", exc.kind, str(exc))
            except Exception as exc:  # any other surprise in one row stays in that row
                msg = f"{type(exc).__name__}: {exc}"
                yield reject(_record(ref, (path, lineno)), "read", "bad_manifest_row", msg)

    def _manifest_record(
        self, ref: str, order: tuple, base: str, row: dict, base_real: str | None = None
    ) -> dict[str, Any]:
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
            uri = _resolve_path(base, value, cfg.allow_outside_paths, base_real)
            if uri is None:
                raise RowError(
                    "path_outside_manifest",
                    f"{value[:200]!r} leaves the manifest's folder {base or '.'}, by name or "
                    "through a symlink (use an absolute path, or allow_outside_paths)",
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
        # Compression from the name (`.jsonl.gz`), inflated a bounded step at a time; any
        # filesystem, transient errors retried where the stream broke.
        return open_stream(path, compression_of(path))

    def _jsonl_rows(self, path: str) -> Iterator[tuple[int, dict, str | RowError | None]]:
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

    def _csv_rows(self, path: str) -> Iterator[tuple[int, dict, str | RowError | None]]:
        with self._open_text(path) as f:
            lines = _CsvLines(_bounded_lines(_LineReader(f), MAX_ROW_BYTES))
            reader = csv.reader(lines)
            header: list[str] | None = None
            while True:
                lines.mark()
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if header is None:
                        raise ValueError(f"unreadable CSV header: {exc}") from exc
                    start = lines.first
                    lines.skip_quoted_rest()
                    yield start, {}, f"CSV: {exc}{lines.span()}"
                    continue
                start = lines.first
                if lines.exhausted:
                    # The file ended inside a quoted field: a quote opened in this row never
                    # closes (a legitimate multi-line field does). The row is a dead letter,
                    # and the lines it swallowed are read again as rows of their own.
                    if header is None:
                        raise ValueError("a quote in the CSV header never closes")
                    span = lines.span()
                    if lines.resync():
                        reader = csv.reader(lines)
                        span += "; the lines after its first are read again"
                    yield start, {}, f"CSV: a quote opened in this row never closes{span}"
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

    def _parquet_rows(self, path: str) -> Iterator[tuple[int, dict, str | RowError | None]]:
        import pyarrow.parquet as pq

        # Read from the open file in small batches (never the whole file into memory): a
        # Hugging Face manifest can carry every image's bytes. What pyarrow holds at once is
        # one data page of a column (inflated whole) and one batch; both are bounded from the
        # footer before a byte of data is read (the row group cap), and an embedded image over
        # the file limit is refused from its Arrow length, never copied out.
        cfg = self.config
        wanted = {
            *((cfg.image_column,) if cfg.image_column else IMAGE_COLUMNS),
            *((cfg.caption_column,) if cfg.caption_column else CAPTION_COLUMNS),
            *((cfg.language_column,) if cfg.language_column else LANGUAGE_COLUMNS),
            "split",
        }
        limit = cfg.max_file_bytes
        group_limit = parquet_group_limit(limit)
        with open_stream(path) as f:
            # buffer_size: column chunks are streamed page by page, not read whole.
            pf = pq.ParquetFile(f, buffer_size=1 << 20)
            # Only the columns a row needs are read (a dataset's embeddings or other images
            # stay on disk).
            names = pf.schema_arrow.names
            columns = [n for n in names if n in wanted]
            images = (cfg.image_column,) if cfg.image_column else IMAGE_COLUMNS
            image_col = next((c for c in images if c in columns), None)
            if image_col is None:
                raise ValueError(f"no image column ({', '.join(images)}) among {names[:50]}")
            meta = pf.metadata
            i = 0
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                size = sum(
                    group.column(j).total_uncompressed_size
                    for j in range(group.num_columns)
                    if group.column(j).path_in_schema.split(".", 1)[0] in columns
                )
                if size > group_limit:
                    why = (
                        f"row group {g} holds {size} bytes of the columns read (uncompressed; "
                        f"> {group_limit}): not read. Write the manifest with smaller row "
                        "groups (e.g. row_group_size=100), or raise max_file_bytes"
                    )
                    for _ in range(group.num_rows):
                        i += 1
                        yield i, {}, RowError("file_too_large", why)  # one each: raised once
                    continue
                per_row = max(1, size // max(1, group.num_rows))
                batch_rows = max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES // per_row))
                for batch in pf.iter_batches(
                    batch_size=batch_rows, row_groups=[g], columns=columns
                ):
                    image_bytes, other_bytes = _parquet_sizes(batch, image_col)
                    if max(image_bytes, default=0) <= limit and (
                        max(other_bytes, default=0) <= MAX_ROW_BYTES
                    ):
                        for row in batch.to_pylist():
                            i += 1
                            yield i, row, None
                        continue
                    for j in range(batch.num_rows):  # only the rows within bounds copied out
                        i += 1
                        if image_bytes[j] > limit:
                            msg = f"embedded image of {image_bytes[j]} bytes (> {limit})"
                            yield i, {}, RowError("file_too_large", msg)
                        elif other_bytes[j] > MAX_ROW_BYTES:
                            yield i, {}, f"row longer than {MAX_ROW_BYTES} bytes"
                        else:
                            yield i, batch.slice(j, 1).to_pylist()[0], None

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
        compression = (tar_mode(tar_path) or "r|").split("|", 1)[1] or None
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
                reading[0] = key  # should this read fail, the sample is cut: see below
                sample["members"][ext] = read(info)
                reading[0] = None
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

        last_key, prev_key = "", ""
        reading: list[str | None] = [None]  # the key whose member is being read
        try:
            # Always an uncompressed tar stream, read through `_Inflate` for the compression
            # the name says: tarfile's own `r|gz` inflates 10 KB at a time without a bound.
            with (
                open_stream(tar_path, compression) as f,
                tarfile.open(fileobj=f, mode="r|", tarinfo=_BoundedTarInfo) as tar,
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
                    if key != last_key:
                        last_key, prev_key = key, last_key
                    yield from add(key, ext.lower(), info, read)
        except Exception as exc:
            # The rest of this file is unreadable: what was read so far still counts; the
            # rest is one dead letter for the file (no tar header tells how many samples):
            # `read_error` (transient) or another kind of the file itself when reading failed,
            # `bad_tar` when what was read is not a tar (tarfile/zlib/lzma/bz2 errors).
            # A sample whose member was being read when it failed is cut: it is part of the
            # rest, not a sample with a member missing.
            if reading[0] is not None and pending.pop(reading[0], None) is not None:
                last_key = prev_key if reading[0] == last_key else last_key
            for key, sample in pending.items():
                yield emit(key, sample)
            pending.clear()
            ref = f"{tar_path}#after:{last_key}" if last_key else tar_path
            rec = _record(ref, (tar_path, index))
            if isinstance(exc, ReadFailed):
                yield reject(rec, "read", exc.kind, f"{tar_path}: {exc}")
            else:
                msg = f"{tar_path}: {self._tar_hint(tar_path, exc)}"
                yield reject(rec, "read", "bad_tar", msg)
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
# Exception class names (any library's: google.api_core, botocore, requests, urllib3,
# google.auth, Beam's own retries) that mean "try again later".
_TRANSIENT_NAMES = (
    "Timeout",
    "Unavailable",
    "Connection",
    "TooManyRequests",
    "ServerError",
    "InternalServerError",
    "ServiceUnavailable",
    "BadGateway",
    "GatewayTimeout",
    "DeadlineExceeded",
    "IncompleteRead",
    "RemoteDisconnected",
    "ProtocolError",
    "ChunkedEncodingError",
    "TransportError",
    "Throttl",
    "SlowDown",
    "BrokenPipe",
    "Retry",
)
# Error codes of object stores (botocore's `response["Error"]["Code"]` and the like).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "500",
        "502",
        "503",
        "504",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset({"AccessDenied", "Forbidden", "AllAccessDisabled", "403", "401"})


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) an exception carries, if any: google.api_core (`code`),
    requests (`response.status_code`), botocore (`response["Error"]["Code"]`,
    `response["ResponseMetadata"]["HTTPStatusCode"]`), urllib (`code`), others (`status`)."""
    status: Any = None
    code: Any = None
    for attr in ("code", "status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            status = value
            break
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = error.get("Code") if isinstance(error, dict) else None
        meta = response.get("ResponseMetadata") or {}
        if status is None and isinstance(meta, dict):
            status = meta.get("HTTPStatusCode")
    elif response is not None and status is None:
        status = getattr(response, "status_code", None) or getattr(response, "status", None)
    status = status if isinstance(status, int) and 100 <= status <= 599 else None
    return status, code if isinstance(code, str) else None


def classify_read_error(exc: BaseException) -> tuple[str, bool]:
    """(dead-letter kind, transient) for an exception raised while reading a file. Transient:
    network and object-store errors that may pass (timeouts, resets, 5xx, 408 and 429,
    throttling); permanent: what the path itself causes (missing, permissions, 4xx)."""
    details = getattr(exc, "exception_details", None)  # BeamIOError: {path: cause}
    if isinstance(details, dict) and details:
        return classify_read_error(next(iter(details.values())))
    if isinstance(exc, ReadFailed):
        return exc.kind, exc.transient
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, FileNotFoundError):
        return "missing_file", False
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return "not_a_regular_file", False
    if isinstance(exc, PermissionError):
        return "permission_denied", False
    status, code = _status_and_code(exc)
    if code in _TRANSIENT_CODES:
        return "read_error", True
    if code in _MISSING_CODES:
        return "missing_file", False
    if code in _DENIED_CODES:
        return "permission_denied", False
    if status is not None:
        if status in (404, 410):
            return "missing_file", False
        if status in (401, 403):
            return "permission_denied", False
        if status in (408, 429) or status >= 500:
            return "read_error", True
        if 400 <= status < 500:
            return "unreadable", False
    if isinstance(exc, http.client.HTTPException):  # IncompleteRead, a cut connection ...
        return "read_error", True
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
                    time.sleep(min(READ_BACKOFF_MAX_S, self.backoff_s * 2**attempt))
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


NOT_READ_MESSAGE = (
    "planned for this unit when the input was listed, but the reader did not come to it in "
    "this run: the input changed since (a manifest cut or edited, a tar replaced) or failed part "
    "way (see the file's other `read` dead letters and the log); --retry-failed reads it again"
)


def _not_read(item: tuple[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    ref, groups = item
    if any(True for _ in groups["planned"]) and not any(True for _ in groups["seen"]):
        rec = _record(ref, (ref, 0))
        bump(rec, "read.not_read")
        yield reject(rec, "read", "not_read", NOT_READ_MESSAGE).value


class _NotRead(beam.PTransform):
    """(records, dead letters) the reader emitted for a unit's inputs -> one `not_read` dead
    letter (counted as an input) for each planned reference among neither: every planned
    input is accounted for, so a unit's books balance against its plan."""

    def __init__(self, planned: Collection[str]):
        super().__init__()
        self.planned = sorted(planned)

    def expand(self, pcolls):
        listed, dead = pcolls
        seen = (
            listed | "RecordRefs" >> beam.Map(lambda r: (r["input_ref"], 1)),
            dead | "DeadRefs" >> beam.Map(lambda d: (d["row"]["input_ref"], 1)),
        ) | "Seen" >> beam.Flatten()
        planned = (
            listed.pipeline
            | "Planned" >> beam.Create(self.planned)
            | "KeyPlanned" >> beam.Map(lambda ref: (ref, 0))
        )
        return (
            {"planned": planned, "seen": seen}
            | "ByRef" >> beam.CoGroupByKey()
            | "Missing" >> beam.FlatMap(_not_read)
        )


class ReadInputs(beam.PTransform):
    """`--input` -> input records (main output) and rejects (tagged `DEAD`). `keep`, when
    given, makes the transform that selects the listed inputs (and listing rejects) to read,
    e.g. one work unit's: applied before any file's bytes are read. When that transform names
    the references it keeps (`refs`, as `units.KeepUnits` does), each of them the reader did
    not emit becomes a `not_read` dead letter (`_NotRead`)."""

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
            keep = self.keep()
            listed = listed | "Keep" >> keep
            listing_dead = listing_dead | "KeepDead" >> self.keep()
            planned = getattr(keep, "refs", None)
            if planned:
                not_read = (listed, listing_dead) | "NotRead" >> _NotRead(planned)
                listing_dead = (listing_dead, not_read) | "WithNotRead" >> beam.Flatten()
        read = (
            listed
            # Listing/parsing happens in one worker; spread the records before reading bytes.
            | "Spread" >> beam.Reshuffle()
            | "ReadBytes"
            >> beam.ParDo(ReadBytes(self.config.max_file_bytes)).with_outputs(DEAD, main="ok")
        )
        dead = (listing_dead, read[DEAD]) | "FlattenReadDead" >> beam.Flatten()
        return read.ok, dead

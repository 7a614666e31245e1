"""Export shards as WebDataset tars for open_clip's own trainer (`--dataset-type webdataset`).

One sample per image: `<key>.<jpg|png|webp>`, `<key>.txt` (ONE caption in the chosen language)
and `<key>.json`. The folder also gets `sizes.json` (tar name -> samples, which open_clip reads
to know the dataset size; it lists only the tars this export wrote) and `_info.json` (what was
exported, how, and what was skipped and why).

Which caption goes into `.txt` (`caption_select`):
- `best` (default): the highest score. A caption's score is its own CLIP `score`, else that of
  the caption it was translated from (a translation of a well-matching English caption inherits
  its match); ties go to the higher `translation_score`, then to the earlier caption. With no
  score at all, a caption whose lineage is not the source alt-text is preferred;
- `first`: the first eligible caption; `random`: a seeded draw per image (seed + image id).
Eligible: captions in the language and of the origins asked for (`caption_origins`; default all),
and never an unscored source caption (or a translation of one) when scored ones exist.

`.json` keeps the row's FULL caption list (every language, in shard order), so `source_index`
stays valid; `caption_index` points at the caption in `.txt`.

Safety: tar member names come from a sanitised key (image ids are checked, anything else becomes
`[A-Za-z0-9_-]` plus a hash), never a path; a repeated image id is skipped (counted), and so is
an id whose key equals a key already written (a crafted id equal to another id's sanitised key),
as are rows without a usable image (a non-image payload is counted under its decoder reason, not
a crash). Image references by path are read bounded, regular files only; relative ones only
under `image_root`. Each caption's `model` and the `source_uri` carry no folders of this
machine (`babelcap.core.paths.portable_ref`). The export writes only its own names into the
folder: an `_info.json` is believed only when it carries `"format": INFO_FORMAT` and lists only
plain names an export writes (`sizes.json`, `_info.json`, `PREFIX-NNNNNN.tar`), else the folder
is refused before anything is written; it refuses to overwrite a file that a previous export
did not record, and removes only tars that a previous export recorded and this one did not
rewrite, inside the folder. Files are written under a temporary name and renamed in, never
through a link.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field, field_validator

from babelcap.core import schema
from babelcap.core.config import FrozenConfigModel
from babelcap.core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_rgb
from babelcap.core.lists import parse_list
from babelcap.core.paths import portable_ref
from babelcap.core.shards import find_shards

log = logging.getLogger(__name__)

SIZES = "sizes.json"
INFO = "_info.json"
INFO_FORMAT = "babelcap export-wds 1"  # marks an _info.json this module wrote
_INFO_MAX_BYTES = 64_000_000
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what open_clip's decoder reads as is
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_BATCH_ROWS = 64  # rows (with image bytes) in memory at a time
_EXAMPLES = 20  # skipped rows kept as examples per reason in _info.json


class ExportError(ValueError):
    """The export cannot run as asked (nothing has been written)."""


class WdsExportConfig(FrozenConfigModel):
    """What `export-wds` writes (CLI flags are derived from these fields)."""

    language: str = Field(description="caption language to export, e.g. pt")
    caption_origins: tuple[str, ...] = Field(
        (), description="caption origins to choose from, e.g. synthetic,translated (default all)"
    )
    caption_select: Literal["best", "first", "random"] = Field(
        "best", description="best score | first eligible | random (seeded per image)"
    )
    seed: int = Field(0, description="seed of caption_select=random")
    splits: tuple[str, ...] = Field(
        ("train",),
        description='row splits to export (default train; "train,val"; "all": every split); '
        "rows without a split are always exported",
    )
    maxcount: int = Field(10_000, ge=1, description="samples per tar")
    maxsize: int = Field(1_000_000_000, ge=1, description="bytes per tar (about)")
    prefix: str = Field("shard", description="tar names: PREFIX-000000.tar, ...")
    image_root: str | None = Field(
        None, description="folder that relative image paths in the shards are read from"
    )
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="largest image read")

    @field_validator("caption_origins", "splits", mode="before")
    @classmethod
    def _list(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, bool) or value is None:
            raise ValueError("expected a list or a comma-separated string")
        return tuple(parse_list(value))

    @field_validator("caption_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [o for o in value if o not in schema.ORIGINS]
        if unknown:
            raise ValueError(f"unknown caption origin(s) {unknown}; known: {schema.ORIGINS}")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _SAFE_KEY.fullmatch(value):
            raise ValueError("prefix must be letters, digits, '_' or '-'")
        return value

    @property
    def all_splits(self) -> bool:
        return not self.splits or "all" in self.splits


# ----------------------------------------------------------------------------- keys


def safe_key(image_id: Any) -> str:
    """A tar key for an image id: the id itself when it is plain (`[A-Za-z0-9_-]`, as the
    SHA-256 hex ids babelcap writes are), else its plain characters plus a hash of the id, so
    a crafted id (`../../x`, dots, NUL) can neither escape a folder nor split a sample."""
    text = "" if image_id is None else str(image_id)
    if _SAFE_KEY.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return (re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:48] + "_" + digest).lstrip("_")


# ----------------------------------------------------------------------------- captions


def _effective_score(caps: Sequence[Mapping[str, Any]], i: int) -> float | None:
    """A caption's own score, else the score of the caption it was translated from."""
    seen = set()
    while i not in seen and 0 <= i < len(caps):
        seen.add(i)
        if caps[i].get("score") is not None:
            return float(caps[i]["score"])
        src = caps[i].get("source_index")
        if src is None:
            return None
        i = int(src)
    return None


def _from_source(caps: Sequence[Mapping[str, Any]], i: int) -> bool:
    """True when the caption is source alt-text or (a chain of) translations of it."""
    seen = set()
    while i not in seen and 0 <= i < len(caps):
        seen.add(i)
        if caps[i].get("origin") == schema.ORIGIN_SOURCE:
            return True
        src = caps[i].get("source_index")
        if src is None:
            return False
        i = int(src)
    return False


def choose_caption(
    caps: Sequence[Mapping[str, Any]], config: WdsExportConfig, image_id: str = ""
) -> int | None:
    """Index (in `caps`) of the caption to export for this row, or None (see module doc)."""
    eligible = [
        i
        for i, c in enumerate(caps)
        if c.get("language") == config.language
        and (not config.caption_origins or c.get("origin") in config.caption_origins)
        and (c.get("text") or "").strip()
    ]
    if not eligible:
        return None
    scores = {i: _effective_score(caps, i) for i in eligible}
    if any(s is not None for s in scores.values()):
        eligible = [i for i in eligible if scores[i] is not None or not _from_source(caps, i)]
    if config.caption_select == "first":
        return eligible[0]
    if config.caption_select == "random":
        digest = hashlib.sha256(f"{config.seed}:{image_id}".encode()).digest()
        return random.Random(digest).choice(eligible)

    def rank(i: int) -> tuple:
        s, ts = scores[i], caps[i].get("translation_score")
        return (
            s is not None,
            s if s is not None else 0.0,
            not _from_source(caps, i),
            ts if ts is not None else -1.0,
            -i,
        )

    return max(eligible, key=rank)


# ----------------------------------------------------------------------------- images


def _read_path(path: str, config: WdsExportConfig) -> bytes:
    """Bytes of an image referenced by path: URIs and absolute paths as given, relative ones
    only under `image_root`; regular files only, at most `max_image_bytes`."""
    limit = config.max_image_bytes
    if "://" in path and not path.startswith("file://"):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(limit + 1)
    else:
        local = path.removeprefix("file://")
        if not os.path.isabs(local):
            if config.image_root is None:
                raise ImageError("relative_image_path", f"{path}: relative path, no image_root")
            root = os.path.realpath(config.image_root)
            local = os.path.realpath(os.path.join(root, local))
            if os.path.commonpath([root, local]) != root:
                raise ImageError("path_outside_image_root", f"{path}: outside {root}")
        if not os.path.isfile(local):  # FIFOs, devices, folders are never opened
            raise ImageError("missing_file", f"{path}: not a regular file")
        with open(local, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageError("too_large", f"{path}: larger than {limit} bytes")
    return data


def image_payload(image: Mapping[str, Any] | None, config: WdsExportConfig) -> tuple[bytes, str]:
    """(bytes, extension) that open_clip's decoder reads as babelcap's decoder does, or
    ImageError(kind). JPEG/PNG/WebP in RGB or L are kept byte for byte; anything else (other
    formats, transparency, 16-bit) is written as PNG of `decode_rgb`'s pixels."""
    if not image:
        raise ImageError("no_image", "row has no image")
    data = image.get("bytes")
    if not data:
        if not image.get("path"):
            raise ImageError("no_image", "row stores neither image bytes nor a path")
        data = _read_path(str(image["path"]), config)
    if len(data) > config.max_image_bytes:
        raise ImageError("too_large", f"image larger than {config.max_image_bytes} bytes")
    rgb = decode_rgb(data, DEFAULT_MAX_PIXELS)  # validates: not_an_image, bomb, truncated...
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        fmt, mode = im.format, im.mode
    if fmt in _EXT and mode in ("RGB", "L"):
        return data, _EXT[fmt]
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _portable_caption(caption: Mapping[str, Any]) -> dict[str, Any]:
    """The caption with its `model` (captioner or translator id) without this machine's
    folders: a Hub id stays, a local model folder becomes its name (`portable_ref`)."""
    out = dict(caption)
    if isinstance(out.get("model"), str):
        out["model"] = portable_ref(out["model"])
    return out


# ----------------------------------------------------------------------------- samples


def samples(
    shard_set: Any, config: WdsExportConfig, counts: Counter, examples: dict[str, list]
) -> Iterator[dict[str, Any]]:
    """WebDataset samples ({"__key__", ext, "txt", "json"}) from validated shard files."""
    seen: set[str] = set()  # image ids written
    keys: set[str] = set()  # tar keys written (two ids may sanitise to one key)

    def skip(reason: str, row: Mapping[str, Any], message: str = "") -> None:
        counts[f"skipped.{reason}"] += 1
        bucket = examples.setdefault(reason, [])
        if len(bucket) < _EXAMPLES:
            bucket.append({"image_id": str(row.get("image_id"))[:200], "message": message[:300]})

    columns = ["image_id", "source_uri", "split", "image", "captions"]
    for path in shard_set.files:
        source = shard_set.fs.open_input_file(path) if shard_set.filesystem else path
        pf = pq.ParquetFile(source)
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                counts["rows"] += 1
                split = row["split"]
                if not config.all_splits and split is not None and split not in config.splits:
                    counts[f"split_not_selected.{split}"] += 1
                    continue
                caps = row["captions"] or []
                index = choose_caption(caps, config, str(row["image_id"]))
                if index is None:
                    skip("no_caption", row, f"no eligible {config.language} caption")
                    continue
                if row["image_id"] in seen:
                    skip("duplicate_image_id", row, "the same image id was exported already")
                    continue
                key = safe_key(row["image_id"])
                if key in keys:
                    skip("duplicate_key", row, f"key {key} is another exported image id's key")
                    continue
                try:
                    data, ext = image_payload(row["image"], config)
                except ImageError as exc:
                    skip(exc.kind, row, str(exc))
                    continue
                except OSError as exc:
                    skip("read_error", row, f"{type(exc).__name__}: {exc}")
                    continue
                seen.add(row["image_id"])
                keys.add(key)
                if key != row["image_id"]:
                    counts["key_sanitised"] += 1
                caps = [_portable_caption(c) for c in caps]
                chosen = caps[index]
                meta = {
                    "key": key,
                    "image_id": row["image_id"],
                    "source_uri": portable_ref(row["source_uri"])
                    if row["source_uri"]
                    else row["source_uri"],
                    "split": row["split"],
                    "language": config.language,
                    "caption": chosen,
                    "caption_index": index,
                    "caption_score": _effective_score(caps, index),
                    "captions": caps,
                }
                counts["written"] += 1
                yield {
                    "__key__": key,
                    ext: data,
                    "txt": chosen["text"],
                    "json": json.dumps(meta, ensure_ascii=False),
                }


# ----------------------------------------------------------------------------- writing


class _TarSink:
    """Tars named PREFIX-%06d.tar, written under a temporary name and renamed when closed."""

    def __init__(self, out: Path, config: WdsExportConfig):
        self.out, self.config = out, config
        self.index, self.tar, self.tmp = -1, None, None
        self.count = self.bytes = 0
        self.sizes: dict[str, int] = {}

    def name(self, index: int) -> str:
        return f"{self.config.prefix}-{index:06d}.tar"

    def _next(self) -> None:
        self.close()
        self.index += 1
        self.tmp = self.out / f".{self.name(self.index)}.partial"
        self.tar = tarfile.open(  # noqa: SIM115
            fileobj=_open_new(self.tmp), mode="w", format=tarfile.USTAR_FORMAT
        )
        self.count = self.bytes = 0

    def write(self, sample: Mapping[str, Any]) -> None:
        if (
            self.tar is None
            or self.count >= self.config.maxcount
            or self.bytes >= self.config.maxsize
        ):
            self._next()
        key = sample["__key__"]
        for ext, value in sample.items():
            if ext == "__key__":
                continue
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")  # key is safe: no "/", no ".", no ".."
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self.tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data) + 1024
        self.count += 1

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar.fileobj.close()  # tarfile leaves a file object it was given open
        name = self.name(self.index)
        os.replace(self.tmp, self.out / name)
        self.sizes[name] = self.count
        self.tar = None

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar.fileobj.close()
            self.tmp.unlink(missing_ok=True)
            self.tar = None


def _open_new(path: Path) -> Any:
    """A fresh file at `path` (one of this module's own temporary names) for writing: whatever
    is there (a leftover, a link) is unlinked first and the file is created exclusively, so a
    write never follows a link out of the folder."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def _write_replace(out: Path, name: str, text: str) -> None:
    """Write `out/name` whole: a temporary file, then one rename (which replaces a link
    rather than writing through it)."""
    tmp = out / f".{name}.partial"
    with _open_new(tmp) as f:
        f.write(text.encode("utf-8"))
    os.replace(tmp, out / name)


def _tar_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")


def _not_ours(info: Path, why: str) -> ExportError:
    return ExportError(
        f"{info}: {why}; it was not written by babelcap export-wds, so nothing in "
        f"{info.parent} is overwritten or removed: choose another folder"
    )


def _previous_files(out: Path) -> set[str]:
    """Names a previous export recorded in its `_info.json` (its own files), or ExportError
    when `_info.json` is there and is not one this module wrote: it must carry INFO_FORMAT, a
    safe prefix, and list only `sizes.json`, `_info.json` and tars `PREFIX-NNNNNN.tar` of that
    prefix (plain names, so nothing outside the folder can ever be named)."""
    info = out / INFO
    if not info.exists() and not info.is_symlink():
        return set()
    if info.is_symlink() or not info.is_file():
        raise _not_ours(info, "not a regular file")
    if info.stat().st_size > _INFO_MAX_BYTES:
        raise _not_ours(info, "too large for an export record")
    try:
        data = json.loads(info.read_bytes())
    except (ValueError, RecursionError):
        raise _not_ours(info, "not JSON") from None
    if not isinstance(data, dict) or data.get("format") != INFO_FORMAT:
        raise _not_ours(info, f'no "format": "{INFO_FORMAT}"')
    config = data.get("config")
    prefix = config.get("prefix") if isinstance(config, dict) else None
    files = data.get("files")
    if not isinstance(prefix, str) or not _SAFE_KEY.fullmatch(prefix):
        raise _not_ours(info, "no valid prefix")
    if not isinstance(files, list):
        raise _not_ours(info, "no file list")
    tars = _tar_pattern(prefix)
    for name in files:
        if not (isinstance(name, str) and (name in (SIZES, INFO) or tars.fullmatch(name))):
            raise _not_ours(info, f"it lists {str(name)[:100]!r}, not a name an export writes")
    return set(files)


def _check_folder(out: Path, config: WdsExportConfig) -> set[str]:
    """Refuse to overwrite anything that is not a previous export's own file (see
    `_previous_files`); returns the previous export's files."""
    previous = _previous_files(out)
    pattern = _tar_pattern(config.prefix)
    theirs = sorted(
        p.name
        for p in out.iterdir()
        if (pattern.fullmatch(p.name) or p.name == SIZES) and p.name not in previous
    )
    if theirs:
        raise ExportError(
            f"{out} holds {', '.join(theirs[:5])}{' ...' if len(theirs) > 5 else ''}, not written "
            "by an earlier export-wds (no _info.json lists it): refusing to overwrite; choose "
            "another folder or --prefix"
        )
    folders = sorted(
        p.name
        for p in out.iterdir()
        if (p.name in previous or p.name == SIZES or pattern.fullmatch(p.name))
        and p.is_dir()
        and not p.is_symlink()
    )
    if folders:
        raise ExportError(f"{out}: {', '.join(folders[:5])} is a folder: refusing to replace it")
    return previous


def _remove_stale(out: Path, names: Sequence[str]) -> None:
    """Unlink an earlier export's own tars (plain names already checked) inside `out` only."""
    for name in names:
        path = out / name
        if path.parent != out or os.path.basename(name) != name:  # never outside the folder
            raise ExportError(f"{name}: not a plain file name in {out}")
        if path.is_file() or path.is_symlink():  # a link itself, never what it points to
            path.unlink(missing_ok=True)


def export_webdataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | Path,
    lang: str | None = None,
    config: WdsExportConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write `out_dir/<prefix>-000000.tar`..., `sizes.json` and `_info.json`; returns the
    counts. Options are `WdsExportConfig` fields (`maxcount=10`, `splits="all"`, ...)."""
    if config is None:
        config = WdsExportConfig(language=lang, **options)
    elif lang is not None or options:
        config = config.updated({**options, **({"language": lang} if lang else {})})
    shard_set = find_shards(shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = _check_folder(out, config)

    counts: Counter = Counter()
    examples: dict[str, list] = {}
    sink = _TarSink(out, config)
    try:
        for sample in samples(shard_set, config, counts, examples):
            sink.write(sample)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    sizes = sink.sizes
    written = set(sizes)
    stale = sorted(n for n in previous if n not in written and n.endswith(".tar"))
    _remove_stale(out, stale)  # an earlier export's own tars, not rewritten now
    _write_replace(out, SIZES, json.dumps(sizes, indent=1))
    n = len(sizes)
    pattern = f"{config.prefix}-{{000000..{max(n - 1, 0):06d}}}.tar" if n else None
    skipped = {k.removeprefix("skipped."): v for k, v in counts.items() if k.startswith("skipped.")}
    other_splits = {
        k.removeprefix("split_not_selected."): v
        for k, v in counts.items()
        if k.startswith("split_not_selected.")
    }
    result = {
        "rows": counts["rows"],
        "written": counts["written"],
        "skipped": dict(sorted(skipped.items())),
        "splits_not_selected": dict(sorted(other_splits.items())),
        "keys_sanitised": counts["key_sanitised"],
        "tars": n,
        "pattern": pattern,
        "sizes": sizes,
        "removed_stale": stale,
        "out": os.fspath(out),
    }
    info = {
        "format": INFO_FORMAT,
        "config": config.to_dict(),
        "inputs": [
            portable_ref(os.path.abspath(f) if "://" not in f else f) for f in shard_set.files
        ],
        "files": sorted([*sizes, SIZES, INFO]),
        **{k: v for k, v in result.items() if k not in ("out", "sizes")},
        "skipped_examples": examples,
    }
    _write_replace(out, INFO, json.dumps(info, indent=1, ensure_ascii=False))
    return result


def tar_sample_count(path: str | Path) -> int:
    """Number of distinct sample keys in one tar."""
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar if m.isfile()})

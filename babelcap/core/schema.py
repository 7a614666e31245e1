"""The shard contract: one module that every writer and reader of babelcap shards uses.

An augmented shard holds one row per image. Captions of every origin (source alt-text,
synthetic, translated, gold) sit in one list column, each linked to the caption it was
translated from. Schema version, pipeline configuration and model ids live in the Parquet
file metadata, so a shard describes itself.

Rows that fail a stage go to dead-letter shards (``DEAD_LETTER_SCHEMA``) with the stage and
the reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from babelcap.core.paths import portable_ref

# Major: readers refuse other majors. Minor: fields added (listed in ADDED_FIELDS), which
# readers of this version accept as absent in files written before them.
SCHEMA_VERSION = "1.1"

# Caption origins.
ORIGIN_SOURCE = "source"  # alt-text that came with the image
ORIGIN_SYNTHETIC = "synthetic"  # written by an image captioner
ORIGIN_TRANSLATED = "translated"  # machine translation of another caption in the row
ORIGIN_GOLD = "gold"  # human (or grammar) reference, used for evaluation and oracles
ORIGINS = (ORIGIN_SOURCE, ORIGIN_SYNTHETIC, ORIGIN_TRANSLATED, ORIGIN_GOLD)

# Hugging Face `datasets` Image feature convention: struct<bytes, path>.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

CAPTION_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("language", pa.string(), nullable=False),  # ISO 639-1 where one exists
        pa.field("origin", pa.string(), nullable=False),  # one of ORIGINS
        pa.field("model", pa.string()),  # producing model id (captioner / translator)
        pa.field("prompt", pa.string()),  # captioner prompt prefix, if any
        pa.field("source_index", pa.int32()),  # index in `captions` this was translated from
        pa.field("score", pa.float32()),  # optional quality score (CLIP score)
        # Translations only (1.1), from `translators.scoring`; null when not scored:
        # combined translation quality in [0, 1] (mean of the signals below, as [0, 1])
        pa.field("translation_score", pa.float32()),
        # chrF (0-1) of the round trip (translation translated back) against the source
        pa.field("roundtrip_chrf", pa.float32()),
        # the translator's mean log-probability per token of this translation (<= 0)
        pa.field("translation_logprob", pa.float32()),
    ]
)

# Caption fields added by minor versions: files written before them may lack them.
ADDED_FIELDS = frozenset({"translation_score", "roundtrip_chrf", "translation_logprob"})

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the image bytes, hex
        pa.field("source_uri", pa.string()),  # where the image came from (path or URI)
        pa.field("split", pa.string()),  # optional split from the input manifest
        pa.field("image", IMAGE_TYPE),  # optional stored image (bytes and/or path)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("captions", pa.list_(CAPTION_TYPE), nullable=False),
        pa.field("embedding", pa.list_(pa.float32())),  # optional precomputed image embedding
        pa.field("embedding_model", pa.string()),  # id of the image tower that made it
    ]
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("input_ref", pa.string(), nullable=False),  # path/URI/manifest row reference
        pa.field("stage", pa.string(), nullable=False),  # e.g. "read", "decode", "caption"
        pa.field("error_kind", pa.string(), nullable=False),  # short machine-readable reason
        pa.field("message", pa.string()),  # human-readable detail
        pa.field("image_id", pa.string()),  # when known
    ]
)

# Parquet key-value metadata keys.
META_SCHEMA_VERSION = b"babelcap.schema_version"
META_KIND = b"babelcap.kind"  # "shard" or "dead_letter"
META_CONFIG = b"babelcap.config"  # JSON: the pipeline configuration
META_MODELS = b"babelcap.models"  # JSON: {"captioner": id, "translator": id, ...}

KIND_SHARD = "shard"
KIND_DEAD_LETTER = "dead_letter"


class SchemaError(ValueError):
    """A file does not follow the babelcap shard contract."""


def image_id_for(data: bytes) -> str:
    """Stable content id of an image: sha256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


def caption(
    text: str,
    language: str,
    origin: str,
    *,
    model: str | None = None,
    prompt: str | None = None,
    source_index: int | None = None,
    score: float | None = None,
    translation_score: float | None = None,
    roundtrip_chrf: float | None = None,
    translation_logprob: float | None = None,
) -> dict[str, Any]:
    """Build one caption entry (a dict matching ``CAPTION_TYPE``)."""
    if origin not in ORIGINS:
        raise ValueError(f"unknown caption origin {origin!r}; expected one of {ORIGINS}")
    return {
        "text": text,
        "language": language,
        "origin": origin,
        "model": model,
        "prompt": prompt,
        "source_index": source_index,
        "score": score,
        "translation_score": translation_score,
        "roundtrip_chrf": roundtrip_chrf,
        "translation_logprob": translation_logprob,
    }


def portable(value: Any) -> Any:
    """`value` (a configuration, model ids, ...: JSON-like) with every absolute local path made
    portable (`babelcap.core.paths.portable_ref`: `/home/me/models/blip` -> `blip`). URIs, Hub
    ids, relative paths and every other value stay as they are. For what travels with the data
    (file metadata, the run manifest, the dataset card); the private unit records under
    `_units/` keep the full values, which the run compares."""
    if isinstance(value, str | os.PathLike):
        return portable_ref(os.fspath(value))
    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    return value


def file_metadata(
    kind: str = KIND_SHARD,
    config: Mapping[str, Any] | None = None,
    models: Mapping[str, Any] | None = None,
) -> dict[bytes, bytes]:
    """Parquet key-value metadata for a babelcap file (paths made portable: a shard carries no
    folder of the machine that wrote it)."""
    return {
        META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
        META_KIND: kind.encode(),
        META_CONFIG: json.dumps(portable(dict(config or {})), sort_keys=True, default=str).encode(),
        META_MODELS: json.dumps(portable(dict(models or {})), sort_keys=True, default=str).encode(),
    }


# Hugging Face `datasets` reads a file's features from this schema metadata key: with it,
# `load_dataset` decodes `image` as an Image without a cast.
META_HUGGINGFACE = b"huggingface"


def hf_features(arrow_schema: pa.Schema) -> dict[str, Any]:
    """The `datasets` Features (as its JSON) of a shard schema; `image` is an Image."""

    def feature(name: str, t: pa.DataType) -> Any:
        if name == "image" and t.equals(IMAGE_TYPE):
            return {"_type": "Image"}
        if pa.types.is_struct(t):
            return {
                f.name: feature(f.name, f.type) for f in (t.field(i) for i in range(t.num_fields))
            }
        if pa.types.is_list(t):
            return [feature("", t.value_type)]  # a list of one feature: datasets' List
        names = {"float": "float32", "double": "float64", "halffloat": "float16"}
        return {"dtype": names.get(str(t), str(t)), "_type": "Value"}

    return {f.name: feature(f.name, f.type) for f in arrow_schema}


def shard_schema(
    config: Mapping[str, Any] | None = None, models: Mapping[str, Any] | None = None
) -> pa.Schema:
    """``SHARD_SCHEMA`` carrying babelcap metadata (for writers such as Beam's WriteToParquet)
    and Hugging Face's feature metadata."""
    meta = file_metadata(KIND_SHARD, config, models)
    meta[META_HUGGINGFACE] = json.dumps({"info": {"features": hf_features(SHARD_SCHEMA)}}).encode()
    return SHARD_SCHEMA.with_metadata(meta)


def dead_letter_schema(config: Mapping[str, Any] | None = None) -> pa.Schema:
    return DEAD_LETTER_SCHEMA.with_metadata(file_metadata(KIND_DEAD_LETTER, config))


def dead_letter(
    input_ref: str,
    stage: str,
    error_kind: str,
    message: str = "",
    image_id: str | None = None,
) -> dict[str, Any]:
    """Build one dead-letter row (a dict matching ``DEAD_LETTER_SCHEMA``)."""
    return {
        "input_ref": input_ref,
        "stage": stage,
        "error_kind": error_kind,
        "message": message[:2000],
        "image_id": image_id,
    }


@dataclass(frozen=True)
class FileInfo:
    """What the metadata of one babelcap Parquet file says."""

    path: str
    kind: str
    schema_version: str
    num_rows: int
    config: dict[str, Any]
    models: dict[str, Any]


def _decode_meta(meta: Mapping[bytes, bytes] | None, key: bytes, default: str = "") -> str:
    if not meta or key not in meta:
        return default
    return meta[key].decode()


def _type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Compare types ignoring field nullability and metadata, allowing large/view variants."""
    if pa.types.is_null(actual):
        return True  # an all-null column written without a type casts to anything
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(actual):
            return False
        names = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        return all(
            _type_matches(names[expected.field(i).name], expected.field(i).type)
            if expected.field(i).name in names
            else expected.field(i).name in ADDED_FIELDS  # written by an older minor version
            for i in range(expected.num_fields)
        )
    if pa.types.is_list(expected):
        if not (
            pa.types.is_list(actual)
            or pa.types.is_large_list(actual)
            or pa.types.is_fixed_size_list(actual)
        ):
            return False
        return _type_matches(actual.value_type, expected.value_type)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_binary(expected):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual)
    return actual.equals(expected)


def check_schema(actual: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise SchemaError naming the first missing or mistyped column of ``actual``."""
    for field in expected:
        idx = actual.get_field_index(field.name)
        if idx < 0:
            raise SchemaError(
                f"{where}: missing column {field.name!r} (expected type {field.type}); "
                f"columns present: {actual.names}"
            )
        got = actual.field(idx).type
        if not _type_matches(got, expected.field(field.name).type):
            raise SchemaError(
                f"{where}: column {field.name!r} has type {got}, expected {field.type}"
            )


def read_file_info(path: str, filesystem: Any = None) -> FileInfo:
    """Read and check the footer of one babelcap Parquet file (no row data is read)."""
    try:
        pf = pq.ParquetFile(path, filesystem=filesystem)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
    meta = pf.schema_arrow.metadata
    kind = _decode_meta(meta, META_KIND)
    if not kind:
        # A plain Parquet file: decide by its columns, so hand-made shards still validate.
        kind = KIND_DEAD_LETTER if "stage" in pf.schema_arrow.names else KIND_SHARD
    expected = SHARD_SCHEMA if kind == KIND_SHARD else DEAD_LETTER_SCHEMA
    check_schema(pf.schema_arrow, expected, path)
    return FileInfo(
        path=path,
        kind=kind,
        schema_version=_decode_meta(meta, META_SCHEMA_VERSION, "unknown"),
        num_rows=pf.metadata.num_rows,
        config=json.loads(_decode_meta(meta, META_CONFIG, "{}") or "{}"),
        models=json.loads(_decode_meta(meta, META_MODELS, "{}") or "{}"),
    )


def validate(path: str, kind: str = KIND_SHARD, filesystem: Any = None) -> FileInfo:
    """Check that ``path`` is a babelcap file of ``kind``; raise SchemaError otherwise."""
    info = read_file_info(path, filesystem=filesystem)
    if info.kind != kind:
        raise SchemaError(f"{path}: is a {info.kind!r} file, expected {kind!r}")
    major = info.schema_version.split(".")[0]
    if info.schema_version != "unknown" and major != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(
            f"{path}: schema version {info.schema_version} is not compatible with "
            f"this babelcap (schema {SCHEMA_VERSION})"
        )
    return info


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema = SHARD_SCHEMA) -> pa.Table:
    """Build a table from row dicts with the exact schema (missing optional keys become null)."""
    rows = list(rows)
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)

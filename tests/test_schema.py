"""The shard contract: round trip, validation errors, and `babelcap inspect`."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babelcap.cli import main
from babelcap.core import schema
from babelcap.core.shards import write_shard
from babelcap.pipelines.inspect import inspect_paths


def _row(i: int, with_embedding: bool = False) -> dict:
    data = f"image-{i}".encode()
    caps = [
        schema.caption(f"a red circle {i}", "en", schema.ORIGIN_SOURCE),
        schema.caption(
            "a photo of a red circle",
            "en",
            schema.ORIGIN_SYNTHETIC,
            model="world/captioner",
            prompt="a photo of",
            score=0.31,
        ),
        schema.caption(
            "uma foto de um círculo vermelho",
            "pt",
            schema.ORIGIN_TRANSLATED,
            model="world/m2m",
            source_index=1,
            score=0.29,
        ),
    ]
    return {
        "image_id": schema.image_id_for(data),
        "source_uri": f"images/{i}.png",
        "split": "train",
        "image": {"bytes": data, "path": f"{i}.png"},
        "width": 64,
        "height": 64,
        "captions": caps,
        "embedding": [0.1, 0.2, 0.3] if with_embedding else None,
        "embedding_model": "world/clip" if with_embedding else None,
    }


def _write_world_like(tmp_path, n_shards=3, rows_per_shard=5):
    for s in range(n_shards):
        rows = [
            _row(s * rows_per_shard + i, with_embedding=(i % 2 == 0)) for i in range(rows_per_shard)
        ]
        write_shard(
            str(tmp_path / f"shard-{s:05d}.parquet"),
            rows,
            config={"languages": ["pt"]},
            models={"captioner": "world/captioner"},
        )
    dead = [
        schema.dead_letter("images/bad.jpg", "decode", "truncated", "image file is truncated"),
        schema.dead_letter("images/empty.jpg", "read", "empty_file", "0 bytes"),
        schema.dead_letter("images/bad2.jpg", "decode", "truncated", "image file is truncated"),
    ]
    write_shard(
        str(tmp_path / "dead-letter-00000.parquet"),
        dead,
        kind=schema.KIND_DEAD_LETTER,
    )


def test_round_trip_keeps_rows_and_metadata(tmp_path):
    rows = [_row(0, with_embedding=True), _row(1)]
    path = str(tmp_path / "s.parquet")
    write_shard(path, rows, config={"seed": 3}, models={"translator": "m2m"})
    info = schema.validate(path)
    assert info.num_rows == 2 and info.kind == schema.KIND_SHARD
    assert info.schema_version == schema.SCHEMA_VERSION
    assert info.config == {"seed": 3} and info.models == {"translator": "m2m"}
    back = pq.read_table(path).to_pylist()
    assert back[0]["captions"][2]["source_index"] == 1
    assert back[0]["captions"][2]["text"] == "uma foto de um círculo vermelho"
    assert back[0]["image"]["bytes"] == b"image-0"
    assert back[0]["embedding"] == pytest.approx([0.1, 0.2, 0.3])
    assert back[1]["embedding"] is None


def test_image_id_is_the_sha256_the_readme_promises():
    """README, "The shard format": `image_id` is the sha256 of the image bytes (hex), stable
    across runs and machines. Pinned to the standard's test vectors, not to itself."""
    # FIPS 180-2 / NIST test vectors for SHA-256.
    assert schema.image_id_for(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert schema.image_id_for(b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    data = b"\x89PNG any bytes at all"
    assert schema.image_id_for(data) == hashlib.sha256(data).hexdigest()
    # (tests/test_pipeline_e2e.py checks that the pipeline's rows carry it.)


def test_unknown_origin_is_rejected():
    with pytest.raises(ValueError, match="origin"):
        schema.caption("x", "en", "invented")


def test_missing_column_error_names_column_and_file(tmp_path):
    table = schema.rows_to_table([_row(0)]).drop_columns(["captions"])
    path = str(tmp_path / "broken.parquet")
    pq.write_table(table, path)
    with pytest.raises(schema.SchemaError) as err:
        schema.validate(path)
    assert "captions" in str(err.value) and "broken.parquet" in str(err.value)


def test_mistyped_column_error_names_column(tmp_path):
    table = schema.rows_to_table([_row(0)])
    idx = table.schema.get_field_index("width")
    table = table.set_column(idx, "width", pa.array(["64"]))
    path = str(tmp_path / "typed.parquet")
    pq.write_table(table, path)
    with pytest.raises(schema.SchemaError, match=r"'width' has type string"):
        schema.validate(path)


def test_mistyped_nested_caption_field(tmp_path):
    bad_caption = pa.struct([("text", pa.string()), ("language", pa.int32())])
    table = pa.table(
        {
            "image_id": ["a"],
            "source_uri": ["x"],
            "split": pa.array([None], pa.string()),
            "image": pa.array([None], schema.IMAGE_TYPE),
            "width": pa.array([1], pa.int32()),
            "height": pa.array([1], pa.int32()),
            "captions": pa.array([[{"text": "t", "language": 1}]], pa.list_(bad_caption)),
            "embedding": pa.array([None], pa.list_(pa.float32())),
            "embedding_model": pa.array([None], pa.string()),
        }
    )
    path = str(tmp_path / "nested.parquet")
    pq.write_table(table, path)
    with pytest.raises(schema.SchemaError, match="captions"):
        schema.validate(path)


def test_not_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("hello")
    with pytest.raises(schema.SchemaError, match="not a readable Parquet file"):
        schema.validate(str(path))


def test_dead_letter_file_is_not_a_shard(tmp_path):
    _write_world_like(tmp_path, n_shards=1)
    with pytest.raises(schema.SchemaError, match="expected 'shard'"):
        schema.validate(str(tmp_path / "dead-letter-00000.parquet"))
    info = schema.validate(str(tmp_path / "dead-letter-00000.parquet"), schema.KIND_DEAD_LETTER)
    assert info.num_rows == 3


def test_incompatible_schema_version(tmp_path):
    path = str(tmp_path / "v2.parquet")
    table = schema.rows_to_table([_row(0)])
    meta = schema.file_metadata()
    meta[schema.META_SCHEMA_VERSION] = b"2.0"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(schema.SchemaError, match=r"schema version 2\.0"):
        schema.validate(path)


def test_inspect_counts_match_what_was_written(tmp_path):
    _write_world_like(tmp_path, n_shards=3, rows_per_shard=5)
    data = inspect_paths(str(tmp_path), batch_size=2)  # small batches: exercise streaming
    assert len(data["files"]) == 4
    assert data["shard_rows"] == 15 and data["captions"] == 45
    assert data["by_language"] == {"en": 30, "pt": 15}
    assert data["by_origin"] == {"source": 15, "synthetic": 15, "translated": 15}
    assert data["by_language_origin"]["pt/translated"] == 15
    assert data["with_embedding"] == 9  # rows 0, 2, 4 of each shard
    assert data["dead_letter_rows"] == 3
    assert {"stage": "decode", "error_kind": "truncated", "rows": 2} in data["dead_letters"]
    assert data["caption_chars"]["max"] == len("uma foto de um círculo vermelho")
    assert len(data["samples"]) == 3
    assert data["metadata"]["models"] == {"captioner": "world/captioner"}


def test_inspect_cli_text_and_json(tmp_path, capsys):
    _write_world_like(tmp_path, n_shards=2)
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| pt | 0 | 0 | 10 | 0 | 10 |" in text
    assert "| decode | truncated | 2 |" in text
    assert main(["inspect", str(tmp_path / "shard-*.parquet"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shard_rows"] == 10 and data["dead_letter_rows"] == 0


def test_inspect_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err

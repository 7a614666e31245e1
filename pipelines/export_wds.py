"""Export shards as WebDataset tars for open_clip's own trainer (`--dataset-type webdataset`).

Each sample: `<image_id>.<jpg|png|webp>` (the stored image bytes), `<image_id>.txt` (one caption
in the chosen language: the first one, i.e. the source caption when there is one, else the first
translation) and `<image_id>.json` (every caption in that language, with origins and scores,
plus image_id and source_uri). `sizes.json` maps each tar's name to its sample count, which
open_clip reads to know the dataset size. Keys are image ids (hex), so no member name can
escape the extraction folder; tars are written with the `webdataset` library's `ShardWriter`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
from PIL import Image

from babelcap.core import schema
from babelcap.core.shards import find_shards

log = logging.getLogger(__name__)

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _image_bytes(image: dict[str, Any] | None) -> tuple[bytes, str] | None:
    if not image:
        return None
    data = image.get("bytes")
    if data is None and image.get("path"):
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(image["path"], compression_type="uncompressed") as f:
                data = f.read()
        except Exception:
            return None
    if not data:
        return None
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
    if fmt not in _EXT:  # open_clip decodes jpg/png/webp: re-encode anything else as PNG
        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"
    return data, _EXT[fmt]


def samples(files: list[str], lang: str, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    for file in files:
        schema.validate(file)
        dataset = ds.dataset(file, format="parquet")
        for batch in dataset.to_batches(
            batch_size=256, columns=["image_id", "source_uri", "image", "captions"]
        ):
            for row in batch.to_pylist():
                caps = [c for c in row["captions"] if c["language"] == lang]
                if not caps:
                    counts["no_caption_in_language"] += 1
                    continue
                image = _image_bytes(row["image"])
                if image is None:
                    counts["no_image"] += 1
                    continue
                data, ext = image
                counts["written"] += 1
                yield {
                    "__key__": row["image_id"],
                    ext: data,
                    "txt": caps[0]["text"],
                    "json": json.dumps(
                        {
                            "image_id": row["image_id"],
                            "source_uri": row["source_uri"],
                            "language": lang,
                            "captions": caps,
                        },
                        ensure_ascii=False,
                    ),
                }


def export_webdataset(
    shards: str | Path,
    out_dir: str | Path,
    lang: str,
    maxcount: int = 10_000,
    prefix: str = "shard",
) -> dict[str, Any]:
    """Write `out_dir/<prefix>-000000.tar`... and `sizes.json`; returns the counts."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "no_caption_in_language": 0, "no_image": 0}
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples(list(find_shards(shards).files), lang, counts):
            sink.write(sample)
    sizes: dict[str, int] = {}
    for tar in sorted(out.glob(f"{prefix}-*.tar")):
        sizes[tar.name] = tar_sample_count(tar)
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return {**counts, "tars": len(sizes), "sizes": sizes, "out": os.fspath(out)}


def tar_sample_count(path: Path) -> int:
    """Number of distinct sample keys in one tar."""
    import tarfile

    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar if m.isfile()})

"""Is an evaluation set part of the training data? Checked before every evaluation.

Quality figures mean nothing when the model trained on the images it is evaluated on.
`check_overlap` compares the evaluation images with an index of the training images, by
`image_id` and by perceptual hash confirmed at 32x32 (the rule of `babelcap.core.near_duplicates`),
so resized or re-encoded copies are caught too, as DataComp deduplicates its pool against its
evaluation sets.

The index (`TrainingImages`: id, pHash and where each image is) is built from the training
shards (the rows of the splits trained on) and saved with a run (`training_images.parquet`), so
`babelcap eval` can check a model against what its run recorded. Thumbnails of training images
are read back from their shards only for pHash candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from babelcap.core.images import ImageError, decode_rgb, open_rgb
from babelcap.core.near_duplicates import (
    MAX_HASH_DISTANCE,
    MAX_THUMB_RMSE,
    hash_distances,
    phash,
    thumb_rmse,
    thumbnail,
)
from babelcap.core.shards import ShardSet, find_shards

log = logging.getLogger(__name__)

INDEX_FILE = "training_images.parquet"
_INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("phash", pa.uint64()),
        ("split", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
    ]
)


class ContaminationError(ValueError):
    """The evaluation images overlap the training images."""


@dataclass
class TrainingImages:
    """The training images by id and by pHash, with where each came from (file, row)."""

    image_ids: list[str] = field(default_factory=list)
    # pHash per image; None where the shard holds no bytes (only the id can be checked)
    hashes: list[int | None] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def save(self, path: str | Path) -> Path:
        table = pa.table(
            {
                "image_id": self.image_ids,
                "phash": pa.array(self.hashes, pa.uint64()),
                "split": self.splits,
                "file": self.files,
                "row": self.rows,
            },
            schema=_INDEX_SCHEMA,
        )
        pq.write_table(table, str(path), compression="zstd")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TrainingImages:
        table = pq.read_table(str(path), schema=_INDEX_SCHEMA)
        return cls(
            image_ids=table["image_id"].to_pylist(),
            hashes=table["phash"].to_pylist(),
            splits=table["split"].to_pylist(),
            files=table["file"].to_pylist(),
            rows=table["row"].to_pylist(),
        )


def index_training_images(
    shards: ShardSet | str | Sequence[str], splits: Sequence[str] | None = ("train",)
) -> TrainingImages:
    """Index the images of the rows a trainer with this split filter reads (None: all rows;
    rows without a split are always read, like the trainer does)."""
    shards = shards if isinstance(shards, ShardSet) else find_shards(shards)
    out = TrainingImages()
    for path in shards.files:
        dataset = ds.dataset(path, format="parquet", filesystem=shards.filesystem)
        row = 0
        for batch in dataset.to_batches(columns=["image_id", "split", "image"], batch_size=256):
            for rec in batch.to_pylist():
                index, row = row, row + 1
                if not _in_splits(rec.get("split"), splits):
                    continue
                out.image_ids.append(rec["image_id"])
                out.hashes.append(_hash_of(rec.get("image")))
                out.splits.append(rec.get("split"))
                out.files.append(path)
                out.rows.append(index)
    return out


def _in_splits(split: str | None, splits: Sequence[str] | None) -> bool:
    return splits is None or split is None or split in splits


def _hash_of(image: dict[str, Any] | None) -> int | None:
    data = (image or {}).get("bytes")
    if not data:
        return None
    try:
        return phash(decode_rgb(data))
    except ImageError:
        return None


@dataclass
class Overlap:
    """How many evaluation images were found in the training data, and how."""

    eval_images: int
    training_images: int
    by_id: int = 0
    by_hash: int = 0  # copies that are not byte-identical (resized, re-encoded)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.by_id + self.by_hash

    def summary(self) -> str:
        return (
            f"{self.total} of {self.eval_images} evaluation images are in the training data "
            f"({self.by_id} identical, {self.by_hash} resized or re-encoded copies; "
            f"{self.training_images} training images checked)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "eval_images": self.eval_images,
            "training_images": self.training_images,
            "by_id": self.by_id,
            "by_hash": self.by_hash,
            "total": self.total,
            "examples": self.examples[:10],
        }


def check_overlap(
    images: Sequence[Any], image_ids: Sequence[str | None], training: TrainingImages
) -> Overlap:
    """Compare evaluation images (PIL images or paths) and their ids with `training`."""
    known = set(training.image_ids)
    result = Overlap(eval_images=len(images), training_images=len(training))
    thumbs: dict[int, np.ndarray] = {}
    hashed = np.array([h is not None for h in training.hashes], dtype=bool)
    hashes = np.array([h or 0 for h in training.hashes], dtype=np.uint64)
    for i, (image, image_id) in enumerate(zip(images, image_ids, strict=True)):
        if image_id is not None and image_id in known:
            result.by_id += 1
            result.examples.append({"eval_index": i, "image_id": image_id, "match": "id"})
            continue
        if not hashed.any():
            continue
        im = image if isinstance(image, Image.Image) else open_rgb(image)
        distances = hash_distances(hashes, phash(im))
        candidates = np.flatnonzero((distances <= MAX_HASH_DISTANCE) & hashed)
        if not len(candidates):
            continue
        mine = thumbnail(im)
        for j in candidates[np.argsort(distances[candidates], kind="stable")]:
            if j not in thumbs:
                thumbs[j] = thumbnail(_training_image(training, int(j)))
            rmse = thumb_rmse(mine, thumbs[j])
            if rmse <= MAX_THUMB_RMSE:
                result.by_hash += 1
                result.examples.append(
                    {
                        "eval_index": i,
                        "image_id": image_id,
                        "match": "phash",
                        "training_image_id": training.image_ids[j],
                        "hash_distance": int(distances[j]),
                        "rmse": round(rmse, 4),
                    }
                )
                break
    return result


def _training_image(training: TrainingImages, j: int) -> Image.Image:
    """Read one indexed training image back from its shard (only for pHash candidates)."""
    pf = pq.ParquetFile(training.files[j])
    row = training.rows[j]
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < n:
            cell = pf.read_row_group(g, columns=["image"]).column("image")[row].as_py()
            return decode_rgb(cell["bytes"])
        row -= n
    raise IndexError(f"{training.files[j]}: no row {training.rows[j]}")


def ensure_clean(overlap: Overlap, allow: bool = False) -> Overlap:
    """Refuse a contaminated evaluation unless the user allowed it (then it is logged)."""
    if overlap.total and not allow:
        raise ContaminationError(
            f"{overlap.summary()}: recall measured on them would be inflated. Evaluate on "
            "images the model did not train on (the trainer reads data.splits, default "
            "train), or pass --allow-contamination to go on anyway (the report then says so)."
        )
    if overlap.total:
        log.warning("CONTAMINATED evaluation: %s", overlap.summary())
    return overlap


def load_run_index(model_dir: str | Path) -> TrainingImages | None:
    """The training images a run recorded next to its model (export/ or the run folder)."""
    model_dir = Path(model_dir)
    for folder in (model_dir, model_dir.parent):
        path = folder / INDEX_FILE
        if path.is_file():
            return TrainingImages.load(path)
    return None


def merge(indexes: Iterable[TrainingImages]) -> TrainingImages:
    out = TrainingImages()
    for idx in indexes:
        out.image_ids += idx.image_ids
        out.hashes += idx.hashes
        out.splits += idx.splits
        out.files += idx.files
        out.rows += idx.rows
    return out

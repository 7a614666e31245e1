"""Is an evaluation set part of the training data? Checked before every evaluation.

Quality figures mean nothing when the model trained on the images it is evaluated on.
`check_overlap` compares the evaluation images with the images a model trained on, by
`image_id` and by perceptual hash confirmed on an 8x8 thumbnail (the one rule of
`babelcap.core.near_duplicates`), so resized or re-encoded copies are caught too, as DataComp
deduplicates its pool against its evaluation sets.

The trainer records what it trains on (`training_images.parquet`: the rows of the splits it
reads, plus what its base model's run recorded) next to the run, its export and its adapter;
`evaluate` finds it from the model's folder and refuses a contaminated evaluation unless the
user allows it, and then the report says so first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from babelcap.core.images import ImageError, decode_rgb, open_rgb
from babelcap.core.near_duplicates import Fingerprints
from babelcap.core.shards import ShardSet, find_shards

log = logging.getLogger(__name__)

INDEX_FILE = "training_images.parquet"


class ContaminationError(ValueError):
    """The evaluation images overlap the training images."""


def index_training_images(
    shards: ShardSet | str | Sequence[str], splits: Sequence[str] | None = ("train",)
) -> Fingerprints:
    """Fingerprint the images of the rows a trainer with this split filter reads (None: all
    rows; rows without a split are always read, as the trainer does). Rows whose shard holds no
    image bytes are recorded by id only."""
    shards = shards if isinstance(shards, ShardSet) else find_shards(shards)
    images, ids = [], []
    for path in shards.files:
        dataset = ds.dataset(path, format="parquet", filesystem=shards.filesystem)
        for batch in dataset.to_batches(columns=["image_id", "split", "image"], batch_size=256):
            for rec in batch.to_pylist():
                split = rec.get("split")
                if splits is not None and split is not None and split not in splits:
                    continue
                ids.append(rec["image_id"])
                images.append(_pixels(rec.get("image")))
    return Fingerprints.of(images, ids)


def _pixels(image: dict[str, Any] | None) -> Any:
    data = (image or {}).get("bytes")
    if not data:
        return None
    try:
        return decode_rgb(data)
    except ImageError:
        return None


@dataclass
class Overlap:
    """How many evaluation images were found among the training images, and how."""

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
    images: Sequence[Any], image_ids: Sequence[str | None], training: Fingerprints
) -> Overlap:
    """Compare evaluation images (PIL images or paths) and their ids with `training`."""
    result = Overlap(eval_images=len(images), training_images=len(training))
    for i, (image, image_id) in enumerate(zip(images, image_ids, strict=True)):
        im = image if hasattr(image, "size") else open_rgb(image)
        found = training.match(im, image_id)
        if found is None:
            continue
        if found["match"] == "id":
            result.by_id += 1
        else:
            result.by_hash += 1
        result.examples.append({"eval_index": i, "image_id": image_id, **found})
    return result


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


def find_run_index(model_path: str | Path | None) -> Path | None:
    """The training images a run recorded next to a model (its folder, or the run folder
    above an export / adapter), or None."""
    if not model_path:
        return None
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / INDEX_FILE, folder.parent / INDEX_FILE):
        if candidate.is_file():
            return candidate
    return None


def load_run_index(model_path: str | Path | None) -> Fingerprints | None:
    path = find_run_index(model_path)
    return Fingerprints.load(path) if path is not None else None

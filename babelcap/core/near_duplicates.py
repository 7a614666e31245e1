"""Is this the same picture? Exact copies by image id, resized or re-encoded ones by pHash.

One rule for every place that asks (the evaluation's contamination check, the pipeline's
decontamination stage): an image matches a reference image when its `image_id` (sha256 of the
bytes) is the same, or when their 64-bit perceptual hashes (DCT pHash, `imagehash`) are within
`MAX_HASH_DISTANCE` bits AND the two pictures agree at 8x8 (RMSE <= `MAX_THUMB_RMSE` on
[0, 1] RGB). The second test is needed because small synthetic scenes (a shape on a plain
background) can share a pHash without being the same picture. Measured on the synthetic world:
re-encoded copies (JPEG q50-q90 at 32-200 px) stay within 6 bits and RMSE 0.021; distinct
scenes that are pHash neighbours differ by RMSE >= 0.043 (at 32x32 the margin is smaller:
0.057 vs 0.078). An 8x8 thumbnail is 192 bytes, small enough to keep for every training image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from babelcap.core.images import to_rgb

MAX_HASH_DISTANCE = 8
MAX_THUMB_RMSE = 0.03
THUMB = 8


def phash(im: Image.Image) -> int:
    """64-bit perceptual hash (DCT pHash) of an image."""
    import imagehash

    bits = imagehash.phash(to_rgb(im)).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def thumbnail(im: Image.Image) -> np.ndarray:
    """8x8 RGB as uint8: what the confirmation step compares."""
    return np.asarray(to_rgb(im).resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.uint8)


def hash_distances(hashes: np.ndarray, value: int) -> np.ndarray:
    """Hamming distance of every 64-bit hash in `hashes` to `value`."""
    return np.bitwise_count(hashes ^ np.uint64(value))


def thumb_rmse(a: np.ndarray, b: np.ndarray) -> float:
    diff = a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0
    return float(np.sqrt((diff**2).mean()))


_SCHEMA = pa.schema([("image_id", pa.string()), ("phash", pa.uint64()), ("thumbnail", pa.binary())])


@dataclass
class Fingerprints:
    """Images by id, pHash and 8x8 thumbnail (an evaluation set, or the images a model trained
    on). An image whose pixels are unknown (a shard row without bytes) has its id only."""

    image_ids: list[str | None] = field(default_factory=list)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    thumbs: np.ndarray = field(default_factory=lambda: np.zeros((0, THUMB, THUMB, 3), np.uint8))
    has_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.image_ids)

    @classmethod
    def of(
        cls, images: Sequence[Image.Image | None], image_ids: Sequence[str | None]
    ) -> Fingerprints:
        """Fingerprints of `images` (None: the id only)."""
        blank = np.zeros((THUMB, THUMB, 3), np.uint8)
        return cls(
            image_ids=list(image_ids),
            hashes=np.array([0 if im is None else phash(im) for im in images], np.uint64),
            thumbs=np.stack([blank if im is None else thumbnail(im) for im in images])
            if len(images)
            else np.zeros((0, THUMB, THUMB, 3), np.uint8),
            has_pixels=np.array([im is not None for im in images], bool),
        )

    @classmethod
    def concat(cls, parts: Sequence[Fingerprints]) -> Fingerprints:
        """All images of `parts`, each image id once (the first one kept)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        ids = [i for p in parts for i in p.image_ids]
        seen: set[str] = set()
        keep = []
        for k, image_id in enumerate(ids):
            if image_id is None:
                keep.append(k)
            elif image_id not in seen:
                keep.append(k)
                seen.add(image_id)
        return cls(
            image_ids=[ids[k] for k in keep],
            hashes=np.concatenate([p.hashes for p in parts])[keep],
            thumbs=np.concatenate([p.thumbs for p in parts])[keep],
            has_pixels=np.concatenate([p.has_pixels for p in parts])[keep],
        )

    def match(self, im: Image.Image, image_id: str | None = None) -> dict[str, Any] | None:
        """How `im` matches one of these images ({"match": "id"|"phash", ...}), or None."""
        if image_id is not None and image_id in self._ids():
            return {"match": "id", "reference_id": image_id}
        if not self.has_pixels.any():
            return None
        distances = hash_distances(self.hashes, phash(im))
        candidates = np.flatnonzero((distances <= MAX_HASH_DISTANCE) & self.has_pixels)
        if not len(candidates):
            return None
        mine = thumbnail(im)
        for j in candidates[np.argsort(distances[candidates], kind="stable")]:
            rmse = thumb_rmse(mine, self.thumbs[j])
            if rmse <= MAX_THUMB_RMSE:
                return {
                    "match": "phash",
                    "reference_id": self.image_ids[j],
                    "hash_distance": int(distances[j]),
                    "rmse": round(rmse, 4),
                }
        return None

    def _ids(self) -> set[str]:
        if getattr(self, "_id_set", None) is None:
            self._id_set = {i for i in self.image_ids if i is not None}
        return self._id_set

    def save(self, where: str | Path | BinaryIO) -> None:
        table = pa.table(
            {
                "image_id": self.image_ids,
                "phash": pa.array(
                    [
                        int(h) if p else None
                        for h, p in zip(self.hashes, self.has_pixels, strict=True)
                    ],
                    pa.uint64(),
                ),
                "thumbnail": [
                    t.tobytes() if p else None
                    for t, p in zip(self.thumbs, self.has_pixels, strict=True)
                ],
            },
            schema=_SCHEMA,
        )
        pq.write_table(table, str(where) if isinstance(where, Path) else where, compression="zstd")

    @classmethod
    def load(cls, where: str | Path | BinaryIO) -> Fingerprints:
        table = pq.read_table(str(where) if isinstance(where, Path) else where, schema=_SCHEMA)
        hashes = table["phash"].to_pylist()
        blank = bytes(THUMB * THUMB * 3)
        thumbs = [np.frombuffer(b or blank, np.uint8) for b in table["thumbnail"].to_pylist()]
        return cls(
            image_ids=table["image_id"].to_pylist(),
            hashes=np.array([h or 0 for h in hashes], np.uint64),
            thumbs=np.stack(thumbs).reshape(-1, THUMB, THUMB, 3)
            if thumbs
            else np.zeros((0, THUMB, THUMB, 3), np.uint8),
            has_pixels=np.array([h is not None for h in hashes], bool),
        )

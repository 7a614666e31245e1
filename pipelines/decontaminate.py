"""Keep an evaluation set's images out of the training data (stage "decontaminate").

Given the fingerprints of an evaluation set (`babelcap.core.near_duplicates.Fingerprints`, a
small Parquet file any Beam filesystem can hold), every decoded image is compared with them by
image id and by pHash confirmed at 32x32, so resized or re-encoded copies are caught too. A
match is either dropped to the dead-letter output (kind `matches_eval_set`, with the matching
reference and distance in the message) or kept and flagged: its `split` becomes
`eval_overlap`, which the trainer's split filter (default `train`) never reads.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from babelcap.core.images import ImageError, decode_rgb
from babelcap.core.near_duplicates import Fingerprints
from babelcap.pipelines.accounting import bump
from babelcap.pipelines.deadletter import reject

STAGE = "decontaminate"
MATCHES_EVAL_SET = "matches_eval_set"
FLAGGED_SPLIT = "eval_overlap"
MODES = ("drop", "flag")


def read_fingerprints(path: str) -> Fingerprints:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return Fingerprints.load(io.BytesIO(f.read()))


class DropEvalImages(beam.DoFn):
    """Drop (or flag) records whose image is in the evaluation set's fingerprints."""

    def __init__(self, fingerprints: str, mode: str = "drop", max_image_pixels: int = 64_000_000):
        if mode not in MODES:
            raise ValueError(f"decontamination mode must be one of {MODES}, not {mode!r}")
        self.fingerprints = fingerprints
        self.mode = mode
        self.max_image_pixels = max_image_pixels
        self._reference: Fingerprints | None = None

    def setup(self) -> None:
        self._reference = read_fingerprints(self.fingerprints)

    def process(self, rec: dict[str, Any]) -> Iterator[Any]:
        assert self._reference is not None
        try:
            im = decode_rgb(rec["data"], self.max_image_pixels)
        except ImageError:  # the decode stage already let only good images through
            yield rec
            return
        found = self._reference.match(im, rec.get("image_id"))
        if found is None:
            yield rec
            return
        detail = ", ".join(f"{k}={v}" for k, v in found.items())
        if self.mode == "drop":
            yield reject(rec, STAGE, MATCHES_EVAL_SET, f"{rec.get('uri')}: {detail}")
            return
        rec = dict(rec)
        rec["split"] = FLAGGED_SPLIT
        bump(rec, f"{STAGE}.flagged")
        yield rec

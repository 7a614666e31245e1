"""Decode and check images; check source captions.

Images are decoded by `babelcap.core.images.decode_rgb`, the decoder every other stage and
the trainer use too; its `ImageError.kind` is the dead-letter reason.

`DecodeImages` (a DoFn) applies it, computes `image_id` from the original bytes, prepares the
bytes stored in the shard's `image` column, and checks the source caption (invalid UTF-8,
empty, overlong -> dropped with a counted reason; the image itself still goes on).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from PIL import Image

from babelcap.core import schema
from babelcap.core.images import ImageError, decode_rgb
from babelcap.pipelines.accounting import bump, caption_drop
from babelcap.pipelines.deadletter import reject
from babelcap.pipelines.options import AugmentConfig

STAGE = "decode"


def encode_for_storage(im: Image.Image, max_side: int | None) -> bytes:
    """Re-encode (optionally downscaled) RGB as PNG for small images, else JPEG q=90."""
    if max_side and max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if im.width * im.height <= 256 * 256:
        im.save(buf, format="PNG", optimize=False)
    else:
        im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def check_source_caption(rec: dict[str, Any], max_chars: int) -> tuple[str | None, str | None]:
    """(caption, drop reason) for a record's source caption."""
    if rec.get("source_caption_error"):
        return None, rec["source_caption_error"]
    text = rec.get("source_caption")
    if text is None:
        return None, None
    text = " ".join(text.split())
    if not text:
        return None, "empty"
    if len(text) > max_chars:
        return None, "too_long"
    return text, None


class DecodeImages(beam.DoFn):
    def __init__(self, config: AugmentConfig):
        self.config = config

    def process(self, rec: dict[str, Any]) -> Iterator[Any]:
        cfg = self.config
        data: bytes = rec["data"]
        rec = dict(rec)
        rec["image_id"] = schema.image_id_for(data) if data else None
        try:
            im = decode_rgb(data, cfg.max_image_pixels)
        except ImageError as exc:
            yield reject(rec, STAGE, exc.kind, f"{rec.get('uri')}: {exc}")
            return
        rec["width"], rec["height"] = im.size
        if cfg.store_image == "bytes":
            # Filled from `data` once no stage needs the pixels (builder.StoreImage), so the
            # bytes are not shipped twice between stages.
            rec["image"] = None
        elif cfg.store_image == "reencode":
            data_out = encode_for_storage(im, cfg.resize_max_side)
            rec["image"] = {"bytes": data_out, "path": rec["uri"]}
        elif cfg.store_image == "path":
            rec["image"] = {"bytes": None, "path": rec["uri"]}
        else:
            rec["image"] = None
        text, reason = check_source_caption(rec, cfg.text.max_source_chars)
        captions = []
        if reason:
            caption_drop(rec, "source", reason)
        elif text is not None:
            captions.append(
                schema.caption(text, rec.get("source_language") or "en", schema.ORIGIN_SOURCE)
            )
            bump(rec, "decode.source_captions")
        rec["captions"] = captions
        bump(rec, "decode.ok")
        yield rec

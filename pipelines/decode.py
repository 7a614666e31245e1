"""Decode and check images; check source captions.

`decode_rgb` is the one place that turns bytes into an RGB PIL image: it rejects zero-byte,
non-image, truncated and corrupt files and decompression bombs (a configurable pixel limit,
checked from the header before any pixel is decoded), and converts every mode to RGB (CMYK,
16-bit, palette with transparency composited on white, first frame of animations).

`DecodeImages` (a DoFn) applies it, computes `image_id` from the original bytes, prepares the
bytes stored in the shard's `image` column, and checks the source caption (invalid UTF-8,
empty, overlong -> dropped with a counted reason; the image itself still goes on).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipelines import schema
from pipelines.accounting import bump, caption_drop
from pipelines.deadletter import reject
from pipelines.options import AugmentConfig

STAGE = "decode"


class ImageError(ValueError):
    """An input that is not a usable image; `kind` is the dead-letter error_kind."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Bytes -> RGB image, or ImageError(kind) with kind in
    empty_file, not_an_image, decompression_bomb, truncated_image, corrupt_image."""
    if not data:
        raise ImageError("empty_file", "zero-byte file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError("not_an_image", str(exc)) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("decompression_bomb", str(exc)) from exc
        except Exception as exc:
            raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                "decompression_bomb", f"{width}x{height} = {width * height} px > {max_pixels}"
            )
        try:
            im.verify()  # structure check (CRCs, chunk order) without decoding pixels
            im = Image.open(io.BytesIO(data))
            im.seek(0)  # first frame of animations
            im.load()
        except OSError as exc:
            kind = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
            raise ImageError(kind, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    return _to_rgb(im)


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

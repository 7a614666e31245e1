"""The one image decoder: bytes or a file -> an RGB PIL image, the same pixels everywhere.

The pipeline (captioning, CLIP scores and embeddings), the trainer, the evaluator and the world
all decode through here, so an RGBA or 16-bit image gives every stage the same pixels:
transparency is composited on white, 16/32-bit greyscale is scaled (not clipped) to 8 bits,
palette images with transparency go through RGBA, animations give their first frame.

`decode_rgb` also rejects zero-byte, non-image, truncated and corrupt files and decompression
bombs (a pixel limit checked from the header before any pixel is decoded), with an
`ImageError.kind` that the pipeline uses as the dead-letter reason.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ImageError(ValueError):
    """An input that is not a usable image; `kind` is the dead-letter error_kind."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple:
        # Pickled as (kind, message): a shared model's worker sends it back to the caller.
        return type(self), (self.kind, str(self))


def to_rgb(im: Image.Image) -> Image.Image:
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


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
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
    return to_rgb(im)


def open_rgb(
    source: str | Path | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """A file path or bytes -> RGB image (through `decode_rgb`); files over `max_bytes` are
    refused before they are read."""
    if isinstance(source, bytes):
        return decode_rgb(source, max_pixels)
    with open(source, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{source}: larger than {max_bytes} bytes")
    return decode_rgb(data, max_pixels)

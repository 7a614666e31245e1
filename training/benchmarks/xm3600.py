"""Crossmodal-3600 (XM3600) as Google distributes it: ``captions.jsonl`` (from captions.zip),
one JSON object per line with ``image/key`` and, per language code, ``{"caption": [...]}``; the
images (from images.tgz) as ``images/<key>.jpg``. 3,600 images, 36 languages.

``captions``: ``first`` (default) uses the first caption per image and language, as
CLIP_benchmark's loader does (so figures compare with the published tables); ``all`` uses every
caption (image->text then counts an image as found when any of its captions is in the top k).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from babelcap.training.benchmarks.common import (
    Builder,
    DatasetError,
    first_existing,
    parse_languages,
    read_text,
)
from babelcap.training.eval_data import EvalData

_KEY = re.compile(r"^[0-9A-Za-z_-]+$")


def load(
    path: str,
    languages: Sequence[str] | None,
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    captions: str = "first",
    images: str | None = None,
) -> EvalData:
    """XM3600 from folder `path` (or its ``captions.jsonl``); `languages` None: all 36 (every
    language in the file); `split` is ignored (one split)."""
    root = Path(path)
    jsonl = root if root.is_file() else first_existing(root / "captions.jsonl")
    if jsonl is None:
        raise DatasetError(f"xm3600: no captions.jsonl in {root}")
    image_dir = Path(images) if images else jsonl.parent / "images"
    if captions not in ("first", "all"):
        raise DatasetError(f"xm3600: captions={captions!r}; use first or all")
    limit = 1 if captions == "first" else None
    if max_captions is not None:
        limit = max_captions if limit is None else min(limit, max_captions)
    builder = Builder("xm3600", languages, max_images, limit)
    seen_langs: set[str] = set()
    for n, line in enumerate(read_text(jsonl).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = row["image/key"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(f"{jsonl}:{n}: not an XM3600 caption line ({e})") from None
        if not isinstance(key, str) or not _KEY.match(key):
            raise DatasetError(f"{jsonl}:{n}: bad image/key {key!r}")
        row_langs = [k for k, v in row.items() if isinstance(v, dict) and "caption" in v]
        seen_langs.update(row_langs)
        if builder.full() and image_dir / f"{key}.jpg" not in builder.index:
            break
        i = builder.image(image_dir / f"{key}.jpg")
        for lang in row_langs if languages is None else languages:
            for text in (row.get(lang) or {}).get("caption") or []:
                builder.caption(lang, str(text), i)
    parse_languages(languages, seen_langs, f"xm3600 {jsonl}")
    return builder.finish()

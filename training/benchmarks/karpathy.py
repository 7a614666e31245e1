"""Karpathy-style JSON (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_flickr8k
.json``) and its translated copies: ``{"images": [{"filename", "filepath" (COCO only), "split"
("train"/"val"/"test"/"restval"), "sentences": [{"raw": ...}, ...]}, ...]}``.

`PATH` is one such file; its language is ``lang=`` if given, else the code its name ends with
(``dataset_flickr30k_pt.json``, ``dataset_coco.pt.json``), else ``en``. Other languages are
read from the copies next to it named that way (``<stem>_<lang>.json``, ``<stem>.<lang>.json``,
``<stem>-<lang>.json``, with `<stem>` the file's name less its own language code). Images are
``images=DIR / filepath / filename`` (default: the JSON's folder, or its ``images/`` or
``flickr30k-images/`` folder, whichever holds the first image). Every sentence of an image is a
caption (5 per image in the originals), as CLIP_benchmark reads Flickr30k and COCO.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from babelcap.training.benchmarks.common import (
    Builder,
    DatasetError,
    first_existing,
    inside,
    read_text,
)
from babelcap.training.eval_data import EvalData

_LANG_SUFFIX = re.compile(r"^(?P<stem>.+?)[._-](?P<lang>[a-z]{2,3}(?:[-_][A-Za-z]{2,4})?)$")
_NOT_LANGS = {"coco", "val", "test", "all"}


def language_of(path: Path, default: str = "en") -> tuple[str, str]:
    """(stem, language) of a Karpathy JSON file name."""
    match = _LANG_SUFFIX.match(path.stem)
    if match and match["lang"] not in _NOT_LANGS:
        return match["stem"], match["lang"]
    return path.stem, default


def _images(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(read_text(path))
        rows = doc["images"]
        if not isinstance(rows, list):
            raise TypeError("images is not a list")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a Karpathy-style JSON ({e})") from None
    return rows


def _relative(row: dict[str, Any], path: Path) -> str:
    name = row.get("filename")
    if not isinstance(name, str):
        raise DatasetError(f"{path}: an image without filename")
    folder = row.get("filepath") or ""
    return f"{folder}/{name}" if folder else name


def load(
    path: str,
    languages: Sequence[str],
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    images: str | None = None,
    lang: str | None = None,
) -> EvalData:
    main = Path(path)
    if not main.is_file():
        raise DatasetError(f"karpathy: {main} is not a file (give the dataset_*.json itself)")
    stem, main_lang = language_of(main, lang or "en")
    files: dict[str, Path] = {}
    for want in languages:
        if want == main_lang:
            files[want] = main
            continue
        found = first_existing(
            *(main.with_name(f"{stem}{sep}{want}.json") for sep in ("_", ".", "-"))
        )
        if found is None:
            raise DatasetError(
                f"karpathy: no {want!r} captions: {main} is {main_lang!r} and there is no "
                f"{stem}_{want}.json next to it"
            )
        files[want] = found
    rows_by_lang = {want: _images(file) for want, file in files.items()}
    first_rows = next(iter(rows_by_lang.values()))
    if images:
        image_dir = Path(images)
    else:
        folder = main.parent
        probe = _relative(first_rows[0], main) if first_rows else ""
        candidates = (folder, folder / "images", folder / "flickr30k-images")
        image_dir = next((d for d in candidates if probe and (d / probe).is_file()), folder)
    builder = Builder("karpathy", languages, max_images, max_captions)
    for want, rows in rows_by_lang.items():
        for row in rows:
            if split is not None and row.get("split") != split:
                continue
            where = inside(image_dir, _relative(row, files[want]))
            if builder.full() and where not in builder.index:
                continue
            i = builder.image(where)
            for sentence in row.get("sentences") or []:
                text = sentence.get("raw") if isinstance(sentence, dict) else None
                if isinstance(text, str):
                    builder.caption(want, text, i)
    return builder.finish()

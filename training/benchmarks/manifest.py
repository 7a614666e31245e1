"""A plain manifest for a user's own test set: one row per caption with the image's path, the
caption and its language (and optionally the split), as JSONL, CSV (with a header) or Parquet.

Column names: image ``image``/``image_path``/``path``/``file``; caption ``caption``/``text``;
language ``language``/``lang`` (or ``lang=CODE`` for a file without that column); split
``split`` (rows without one are in every split). Image paths are relative to the manifest's
folder (or ``images=DIR``) and must stay inside it. Rows of one image share its path, so an
image with several captions is one image with several captions.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from babelcap.training.benchmarks.common import (
    MAX_ANNOTATION_BYTES,
    Builder,
    DatasetError,
    inside,
    parse_languages,
    read_text,
)
from babelcap.training.eval_data import EvalData

IMAGE_COLUMNS = ("image", "image_path", "path", "file")
CAPTION_COLUMNS = ("caption", "text")
LANGUAGE_COLUMNS = ("language", "lang")


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if path.stat().st_size > MAX_ANNOTATION_BYTES:
            raise DatasetError(f"{path}: larger than {MAX_ANNOTATION_BYTES} bytes")
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    elif suffix == ".csv":
        yield from csv.DictReader(io.StringIO(read_text(path)))
    elif suffix in (".jsonl", ".json"):
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{n}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise DatasetError(f"{path}:{n}: not a JSON object")
                yield row
    else:
        raise DatasetError(f"manifest {path}: use .jsonl, .csv or .parquet")


def _pick(row: dict[str, Any], names: Sequence[str]) -> Any:
    return next((row[n] for n in names if row.get(n) not in (None, "")), None)


def load(
    path: str,
    languages: Sequence[str] | None,
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    images: str | None = None,
    lang: str | None = None,
) -> EvalData:
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"manifest: {file} is not a file")
    image_dir = Path(images) if images else file.parent
    builder = Builder("manifest", languages, max_images, max_captions)
    seen_langs: set[str] = set()
    for n, row in enumerate(_rows(file), 1):
        image, caption = _pick(row, IMAGE_COLUMNS), _pick(row, CAPTION_COLUMNS)
        language = _pick(row, LANGUAGE_COLUMNS) or lang
        if image is None or caption is None or language is None:
            raise DatasetError(
                f"{file} row {n}: needs an image path ({'/'.join(IMAGE_COLUMNS)}), a caption "
                f"({'/'.join(CAPTION_COLUMNS)}) and a language ({'/'.join(LANGUAGE_COLUMNS)} "
                "or lang=CODE)"
            )
        seen_langs.add(str(language))
        if split is not None and row.get("split") not in (None, "", split):
            continue
        if languages is not None and str(language) not in builder.data.texts:
            continue
        where = inside(image_dir, str(image))
        if builder.full() and where not in builder.index:
            continue
        builder.caption(str(language), str(caption), builder.image(where))
    parse_languages(languages, seen_langs, f"manifest {file}")
    return builder.finish()

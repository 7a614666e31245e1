"""Multi30K task 1 as github.com/multi30k/dataset lays it out: ``data/task1/raw/<split>.<lang>``
(``.gz`` as committed, or unpacked; line i captions image i) and ``data/task1/image_splits/
<split>.txt`` (Flickr30k file names, one a line), with the Flickr30k images under ``images=DIR``
(default ``PATH/images``). Splits: ``test`` (= ``test_2016_flickr``: 1,000 images; en, de, fr,
cs), ``test_2017_flickr``, ``test_2017_mscoco``, ``test_2018_flickr``, ``val``, ``train``.
`PATH` is the repository's root or its ``data/task1`` folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from babelcap.training.benchmarks.common import (
    Builder,
    DatasetError,
    first_existing,
    inside,
    read_lines,
)
from babelcap.training.eval_data import EvalData

SPLIT_ALIASES = {"test": "test_2016_flickr", None: "test_2016_flickr"}


def load(
    path: str,
    languages: Sequence[str],
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    images: str | None = None,
) -> EvalData:
    root = Path(path)
    task = first_existing(root / "data" / "task1", root / "task1") or root
    name = SPLIT_ALIASES.get(split, split)
    names_file = task / "image_splits" / f"{name}.txt"
    if not names_file.is_file():
        raise DatasetError(f"multi30k: no image list {names_file} (split {name!r})")
    names = read_lines(names_file)
    image_dir = Path(images) if images else root / "images"
    builder = Builder("multi30k", languages, max_images, max_captions)
    index = [builder.image(inside(image_dir, n.strip())) for n in names]
    for lang in languages:
        raw = task / "raw" / f"{name}.{lang}"
        file = first_existing(raw, raw.with_name(raw.name + ".gz"))
        if file is None:
            raise DatasetError(f"multi30k: no {raw}[.gz] (split {name!r}, language {lang!r})")
        lines = read_lines(file)
        if len(lines) != len(names):
            raise DatasetError(f"multi30k: {file} has {len(lines)} lines for {len(names)} images")
        for i, text in zip(index, lines, strict=True):
            builder.caption(lang, text, i)
    return builder.finish()

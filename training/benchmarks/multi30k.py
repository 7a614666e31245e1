"""Multi30K task 1 as github.com/multi30k/dataset lays it out: ``data/task1/raw/<split>.<lang>``
(``.gz`` as committed, or unpacked; line i captions image i) and ``data/task1/image_splits/
<split>.txt`` (image file names, one a line), with the images under ``images=DIR`` (default
``PATH/images``). `PATH` is the repository's root or its ``data/task1`` folder.

Splits and their images:

- ``test`` (= ``test_2016_flickr``: 1,000 images; en, de, fr, cs), ``val``, ``train``:
  Flickr30k images, ``DIR`` the flickr30k-images folder;
- ``test_2017_flickr`` (en, de, fr) and ``test_2018_flickr``: Flickr images that are *not*
  in Flickr30k, a separate download the multi30k README points to, ``DIR`` its folder;
- ``test_2017_mscoco`` (461 images; en, de, fr): COCO 2014 images listed as
  ``COCO_train2014_000000117071.jpg#367178`` (the ``#`` part, a COCO caption id, is dropped),
  ``DIR`` a COCO root with ``train2014/`` and ``val2014/`` (see `common.resolve_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from babelcap.training.benchmarks.common import (
    Builder,
    DatasetError,
    first_existing,
    read_lines,
    resolve_image,
)
from babelcap.training.eval_data import EvalData

SPLIT_ALIASES = {"test": "test_2016_flickr", None: "test_2016_flickr"}


def image_name(line: str) -> str:
    """The file name of an image-split line (``name.jpg#<caption id>`` in test_2017_mscoco)."""
    return line.strip().partition("#")[0]


def available_languages(task: Path, split: str) -> list[str]:
    """The languages with a caption file of `split` in ``task/raw``, sorted."""
    langs = set()
    for file in (task / "raw").glob(f"{split}.*"):
        lang = file.name[len(split) + 1 :].removesuffix(".gz")
        if lang and "." not in lang:
            langs.add(lang)
    return sorted(langs)


def load(
    path: str,
    languages: Sequence[str] | None,
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    images: str | None = None,
) -> EvalData:
    """Multi30K split `split` from folder `path` (`languages` None: every caption file)."""
    root = Path(path)
    task = first_existing(root / "data" / "task1", root / "task1") or root
    name = SPLIT_ALIASES.get(split, split)
    names_file = task / "image_splits" / f"{name}.txt"
    if not names_file.is_file():
        raise DatasetError(f"multi30k: no image list {names_file} (split {name!r})")
    names = read_lines(names_file)
    image_dir = Path(images) if images else root / "images"
    languages = available_languages(task, name) if languages is None else list(languages)
    if not languages:
        raise DatasetError(f"multi30k: no {task / 'raw' / name}.<lang>[.gz]")
    builder = Builder("multi30k", languages, max_images, max_captions)
    index = [builder.image(resolve_image(image_dir, image_name(n))) for n in names]
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

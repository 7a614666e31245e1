"""Zero-shot classification from an image folder, with class names and prompt templates per
language as data files:

- ``PATH/<split>/<class>/*.{jpg,jpeg,png,webp}`` (or ``PATH/<class>/...`` without splits);
- ``PATH/classnames.json``: ``{"<lang>": ["name of class 1", ...]}`` in the sorted order of the
  class folders, or ``{"<class folder>": {"<lang>": "name"}}``;
- ``PATH/templates.json`` (optional): ``{"<lang>": ["a photo of a {c}.", ...]}`` (``{c}`` or
  ``{}`` is the class name); languages it lacks use the shipped ``templates.json`` next to this
  module (and ``{c}`` alone where that has none).

The dataset has one task, ``zs_classes`` in the results, and no captions. ``task=NAME`` renames
it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from babelcap.training.benchmarks.common import (
    Builder,
    DatasetError,
    first_existing,
    read_text,
)
from babelcap.training.eval_data import EvalData, ZeroShotTask

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
DEFAULT_TEMPLATES_FILE = Path(__file__).with_name("templates.json")


@cache
def default_templates() -> dict[str, list[str]]:
    return json.loads(DEFAULT_TEMPLATES_FILE.read_text(encoding="utf-8"))["templates"]


def _json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not JSON ({e})") from None


def class_names(
    path: Path, keys: Sequence[str], languages: Sequence[str] | None
) -> dict[str, list[str]]:
    """Class names per language from `path` (`languages` None: every language it names for
    all classes)."""
    doc = _json(path)
    if languages is None:
        if all(isinstance(doc.get(k), dict) for k in keys):
            languages = sorted(set.intersection(*(set(doc[k]) for k in keys)))
        else:
            languages = sorted(lang for lang, v in doc.items() if isinstance(v, list))
        if not languages:
            raise DatasetError(f"{path}: no class names in any language")
    names: dict[str, list[str]] = {}
    for lang in languages:
        if isinstance(doc.get(lang), list):
            got = [str(x) for x in doc[lang]]
        elif all(isinstance(doc.get(k), dict) for k in keys):
            got = [str(doc[k].get(lang, "")) for k in keys]
        else:
            raise DatasetError(f"{path}: no class names in {lang!r}")
        if len(got) != len(keys) or not all(got):
            raise DatasetError(
                f"{path}: {len(got)} names in {lang!r} for {len(keys)} class folders {list(keys)}"
            )
        names[lang] = got
    return names


def load(
    path: str,
    languages: Sequence[str] | None,
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    task: str = "classes",
) -> EvalData:
    """Zero-shot task from folder `path` (`languages` None: every language of its class
    names)."""
    root = Path(path)
    base = root / split if split and (root / split).is_dir() else root
    keys = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not keys:
        raise DatasetError(f"imagefolder: no class folders in {base}")
    names_file = first_existing(root / "classnames.json", base / "classnames.json")
    if names_file is None:
        raise DatasetError(f"imagefolder: no classnames.json in {root}")
    names = class_names(names_file, keys, languages)
    languages = list(names)
    own = first_existing(root / "templates.json", base / "templates.json")
    given = _json(own) if own else {}
    templates = {
        lang: list(given.get(lang) or default_templates().get(lang) or ["{c}"])
        for lang in languages
    }
    builder = Builder("imagefolder", languages, max_images, max_captions)
    labels: list[int | None] = []
    for label, key in enumerate(keys):
        for file in sorted((base / key).iterdir()):
            wanted = file.suffix.lower() in IMAGE_SUFFIXES and not builder.full()
            if wanted and builder.image(file) is not None:
                labels.append(label)
    data = builder.finish()
    data.zero_shot = {task: ZeroShotTask(labels=labels, classes=names, templates=templates)}
    return data

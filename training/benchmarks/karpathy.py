"""Karpathy-style JSON (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_flickr8k
.json``: ``{"images": [{"filename", "filepath" (COCO only), "split" ("train"/"val"/"test"/
"restval"), "sentences": [{"raw": ...}, ...]}, ...]}``) and translated captions for it.

`PATH` is one such file: it gives the images, their splits and the captions in its own
language, ``lang=`` if given, else the code its name ends with (``dataset_flickr30k_pt.json``,
``dataset_coco.pt.json``), else ``en``. Every sentence of an image is a caption (5 per image in
the originals), as CLIP_benchmark reads Flickr30k and COCO. Images are ``images=DIR / filepath
/ filename`` (default: the JSON's folder, or its ``images/`` or ``flickr30k-images/`` folder,
whichever holds the first image; a COCO file name also resolves as in `common.resolve_image`).

Captions in another language L come from the file given as the option ``L=FILE`` (as given, or
relative to the JSON's folder), else from the first of these next to the JSON (`<stem>` is its
name less its own language code, `<dataset>` the JSON's ``dataset``, `<split>` the split):
``<stem>_L.json``, ``<stem>_L.token``, ``<stem>_L.tsv``, ``<stem>_L.txt`` (``.L.`` and ``-L.``
too), ``<dataset>_<split>_L.txt``. Formats, as publishers ship translations:

- a Karpathy JSON (a translated copy): its sentences, by image path;
- a COCO-style annotations JSON (``{"annotations": [{"image_id", "caption"}]}``, CAPIVARA's
  MS-COCO-PT): by the Karpathy row's ``cocoid``;
- Flickr30k's token format (``<name>.jpg#<n>\\t<caption>``: ``results_20130124.token``,
  CAPIVARA's Flickr30k-PT TSV): by file name;
- CLIP_benchmark's (``flickr30k_test_zh.txt``: a header line, then ``<name>.jpg,<caption>``
  with the caption unquoted, commas and all): by file name.

Only the JSON's images are read; a translation's images outside the split are ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from babelcap.training.benchmarks.common import (
    Builder,
    DatasetError,
    first_existing,
    inside,
    read_lines,
    read_text,
    resolve_image,
)
from babelcap.training.eval_data import EvalData

_LANG_SUFFIX = re.compile(r"^(?P<stem>.+?)[._-](?P<lang>[a-z]{2,3}(?:[-_][A-Za-z]{2,4})?)$")
_NOT_LANGS = {"coco", "val", "test", "all"}
_LANG_OPTION = re.compile(r"^[a-z]{2,3}(?:_[A-Za-z]{2,4})?$")
_SEPARATORS = ("_", ".", "-")
_CAPTION_SUFFIXES = (".json", ".token", ".tsv", ".txt")


def language_of(path: Path, default: str = "en") -> tuple[str, str]:
    """(stem, language) of a Karpathy JSON (or caption) file name."""
    match = _LANG_SUFFIX.match(path.stem)
    if match and match["lang"] not in _NOT_LANGS:
        return match["stem"], match["lang"]
    return path.stem, default


def _json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not JSON ({e})") from None


def _images(doc: Any, path: Path) -> list[dict[str, Any]]:
    rows = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: not a Karpathy-style JSON (no images list)")
    return rows


def _relative(row: dict[str, Any], path: Path) -> str:
    name = row.get("filename")
    if not isinstance(name, str):
        raise DatasetError(f"{path}: an image without filename")
    folder = row.get("filepath") or ""
    return f"{folder}/{name}" if folder else name


def _sentences(row: dict[str, Any]) -> list[str]:
    texts = (s.get("raw") if isinstance(s, dict) else None for s in row.get("sentences") or [])
    return [t for t in texts if isinstance(t, str)]


def _cocoid(row: dict[str, Any]) -> int | None:
    if isinstance(row.get("cocoid"), int):
        return row["cocoid"]
    digits = re.search(r"(\d+)\.jpg$", str(row.get("filename") or ""))
    return int(digits[1]) if digits else None


class Captions:
    """One language's captions from a translation file, looked up by a Karpathy row."""

    def __init__(self, path: Path, main: Path) -> None:
        self.path = path
        self.by: dict[Any, list[str]] = {}
        self.key: Callable[[dict[str, Any]], Any]
        if path.name.endswith((".json", ".json.gz")):
            doc = _json(path)
            if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
                self._coco_annotations(doc["annotations"])
                self.key = _cocoid
            else:
                for row in _images(doc, path):
                    self.by.setdefault(_relative(row, path), []).extend(_sentences(row))
                self.key = lambda row: _relative(row, main)
        else:
            self._lines(read_lines(path))
            self.key = lambda row: row.get("filename")

    def _coco_annotations(self, annotations: list[Any]) -> None:
        for n, ann in enumerate(annotations):
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                raise DatasetError(f"{self.path}: annotation {n} has no caption")
            self.by.setdefault(ann.get("image_id"), []).append(ann["caption"])

    def _lines(self, lines: list[str]) -> None:
        first = next((line for line in lines if line.strip()), "")
        if "\t" in first:  # Flickr30k token format: name.jpg#n<TAB>caption, no header
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                name, tab, caption = line.partition("\t")
                if not tab:
                    raise DatasetError(f"{self.path}:{n}: not <image>#<n><TAB><caption>")
                name = name.strip()
                self.by.setdefault(name.rpartition("#")[0] or name, []).append(caption)
            return
        # CLIP_benchmark's flickr: a header, then name.jpg,caption; the caption is not quoted
        # and may hold commas, so split where CLIP_benchmark does (at the first ".jpg,")
        for n, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            name, sep, caption = line.strip().partition(".jpg,")
            if not sep:
                raise DatasetError(f"{self.path}:{n}: not <image>.jpg,<caption>")
            self.by.setdefault(f"{name}.jpg", []).append(caption)

    def of(self, row: dict[str, Any]) -> list[str]:
        return self.by.get(self.key(row), [])


def _sibling(
    main: Path, stem: str, lang: str, dataset: str | None, split: str | None
) -> Path | None:
    names = [f"{stem}{sep}{lang}{suffix}" for suffix in _CAPTION_SUFFIXES for sep in _SEPARATORS]
    if lang == "en":
        names.append(f"{stem}.json")  # the original next to a translated copy
    if dataset and split:
        names.append(f"{dataset}_{split}_{lang}.txt")  # CLIP_benchmark's file name
    return first_existing(*(main.with_name(n) for n in names if main.with_name(n) != main))


def _sibling_languages(main: Path, stem: str, dataset: str | None, split: str | None) -> set[str]:
    """Languages with a caption file next to `main` named as `_sibling` looks for them."""
    langs = set()
    original = main.with_name(f"{stem}.json")
    if original != main and original.is_file():
        langs.add("en")  # the original next to the translated copy given
    for file in main.parent.iterdir():
        if file == main or not file.name.endswith(_CAPTION_SUFFIXES):
            continue
        file_stem, lang = language_of(file, "")
        cb_stem = f"{dataset}_{split}" if dataset and split else None
        if lang and file_stem in (stem, cb_stem) and _LANG_OPTION.match(lang):
            langs.add(lang)
    return langs


def load(
    path: str,
    languages: Sequence[str] | None,
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    images: str | None = None,
    lang: str | None = None,
    **caption_files: str,
) -> EvalData:
    """Karpathy JSON `path`, its split `split` (None: all), captions in `languages` (None:
    its own and every translation found); ``<lang>=FILE`` options name translation files."""
    main = Path(path)
    if not main.is_file():
        raise DatasetError(f"karpathy: {main} is not a file (give the dataset_*.json itself)")
    for key in caption_files:
        if not _LANG_OPTION.match(key):
            raise DatasetError(
                f"karpathy: unknown option {key}=; options: images=DIR, lang=CODE and "
                "<lang>=FILE (a translation's captions)"
            )
    stem, main_lang = language_of(main, lang or "en")
    doc = _json(main)
    rows = _images(doc, main)
    dataset = doc.get("dataset") if isinstance(doc.get("dataset"), str) else None
    if languages is None:
        found = _sibling_languages(main, stem, dataset, split)
        languages = sorted({main_lang, *found, *caption_files})
    sources: dict[str, Captions | None] = {}  # None: the JSON's own sentences
    for want in languages:
        if want in caption_files:
            given = Path(caption_files[want])
            file = given if given.is_absolute() or given.exists() else main.parent / given
            if not file.is_file():
                raise DatasetError(f"karpathy: {want}={caption_files[want]}: no such file")
            sources[want] = Captions(file, main)
        elif want == main_lang:
            sources[want] = None
        else:
            found_file = _sibling(main, stem, want, dataset, split)
            if found_file is None:
                raise DatasetError(
                    f"karpathy: no {want!r} captions: {main} is {main_lang!r}; give "
                    f"{want}=FILE or put {stem}_{want}.json (.token, .tsv, .txt) next to it"
                )
            sources[want] = Captions(found_file, main)
    for want, source in sources.items():
        if source is not None and rows and not any(source.of(row) for row in rows):
            raise DatasetError(
                f"karpathy: {source.path} ({want}) has captions for none of {main}'s images"
            )
    if images:
        image_dir = Path(images)
    else:
        folder = main.parent
        probe = _relative(rows[0], main) if rows else ""
        candidates = (folder, folder / "images", folder / "flickr30k-images")
        image_dir = next((d for d in candidates if probe and (d / probe).is_file()), folder)
    builder = Builder("karpathy", languages, max_images, max_captions)
    for row in rows:
        if split is not None and row.get("split") != split:
            continue
        where = inside(image_dir, _relative(row, main))
        if not where.is_file():  # a COCO root laid out otherwise (flat, or 2017's folders)
            where = resolve_image(image_dir, str(row["filename"]))
        if builder.full() and where not in builder.index:
            continue
        i = builder.image(where)
        for want, source in sources.items():
            for text in _sentences(row) if source is None else source.of(row):
                builder.caption(want, text, i)
    data = builder.finish()
    # which dataset it is, so CLIP_benchmark's result records can use its name for it
    data.name = f"karpathy-{dataset}" if dataset else "karpathy"
    return data

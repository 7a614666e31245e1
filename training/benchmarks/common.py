"""What every benchmark reader shares: bounded reads of annotation files, image paths kept
inside the dataset's folder, and one builder that turns (image, language, caption) triples into
`EvalData` (each image once, first-seen order, limits applied)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from babelcap.core.images import DEFAULT_MAX_BYTES
from babelcap.training.eval_data import EvalData

log = logging.getLogger(__name__)

# Annotation files: XM3600's captions.jsonl is ~60 MB, dataset_coco.json ~150 MB.
MAX_ANNOTATION_BYTES = 1 << 30


class DatasetError(ValueError):
    """An evaluation dataset's files are missing or malformed (the message says which)."""


def read_bytes_bounded(path: str | Path, max_bytes: int = MAX_ANNOTATION_BYTES) -> bytes:
    """A file's bytes (``.gz``: decompressed), refusing more than `max_bytes`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DatasetError(f"{path}: larger than {max_bytes} bytes; refusing to read it")
    return data


def read_text(path: str | Path, max_bytes: int = MAX_ANNOTATION_BYTES) -> str:
    try:
        return read_bytes_bounded(path, max_bytes).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None


def read_lines(path: str | Path) -> list[str]:
    """Lines without their line ends (a trailing empty line dropped)."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def first_existing(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.exists()), None)


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute paths and paths that leave `root` (``..``, links)."""
    if not relative or Path(relative).is_absolute():
        raise DatasetError(f"image path {relative!r} must be relative to {root}")
    base = root.resolve()
    path = (base / relative).resolve()
    if path != base and base not in path.parents:
        raise DatasetError(f"image path {relative!r} leaves the dataset folder {root}")
    return path


# COCO 2014 file names say their folder: COCO_train2014_000000117071.jpg is in train2014/.
_COCO_NAME = re.compile(r"^COCO_(?P<split>(?:train|val|test)\d{4})_(?P<id>\d+)\.jpg$")


def resolve_image(root: Path, name: str) -> Path:
    """Where image `name` of a name list is under `root`: ``root/<name>`` (a flat folder, as
    CLIP_benchmark's XTD10 images.tar.gz unpacks), else, for a COCO 2014 name, the folder its
    ``COCO_<split>_`` prefix names (``root/train2014/<name>``, ``root/val2014/<name>``, as COCO
    distributes them), else the same image in COCO 2017's layout (``root/train2017/<id>.jpg`` or
    ``root/val2017/<id>.jpg``: 2017 regrouped the 2014 images under their bare 12-digit ids).
    XTD10 (800 train2014 + 200 val2014 names) and Multi30K's test_2017_mscoco mix both folders,
    so one ``images=`` folder cannot hold them otherwise. A name found nowhere gives the path
    its prefix implies, which the builder reports as missing."""
    flat = inside(root, name)
    match = _COCO_NAME.match(name)
    if match is None or flat.is_file():
        return flat
    nested = inside(root, f"{match['split']}/{name}")
    bare = f"{int(match['id']):012d}.jpg"
    later = (inside(root, f"{folder}/{bare}") for folder in ("train2017", "val2017"))
    return first_existing(nested, *later) or nested


def file_sha256(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """sha256 of an image file (the shards' ``image_id``), refusing files over `max_bytes`."""
    h = hashlib.sha256()
    seen = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            seen += len(chunk)
            if seen > max_bytes:
                raise DatasetError(f"{path}: image larger than {max_bytes} bytes")
            h.update(chunk)
    return h.hexdigest()


def parse_languages(
    languages: Sequence[str] | None, available: Iterable[str], what: str
) -> list[str]:
    """`languages` if the dataset has each of them (None: all it has, sorted), else a clear
    error naming what it has."""
    have = set(available)
    if languages is None:
        return sorted(have)
    missing = [lang for lang in languages if lang not in have]
    if missing:
        raise DatasetError(
            f"{what}: no captions in {', '.join(missing)}; it has {', '.join(sorted(have))}"
        )
    return list(languages)


class Builder:
    """Collects images (by path, each once) and captions per language into `EvalData`;
    `languages` None takes every language the reader passes (the dataset's, sorted)."""

    def __init__(
        self,
        name: str,
        languages: Sequence[str] | None,
        max_images: int | None = None,
        max_captions: int | None = None,
    ) -> None:
        self.name = name
        self.every_language = languages is None
        languages = [] if languages is None else list(languages)
        self.languages = languages
        self.max_images = max_images
        self.max_captions = max_captions
        self.index: dict[Path, int] = {}
        self.per_image: dict[tuple[str, int], int] = {}
        self.missing: list[str] = []
        self.data = EvalData(
            images=[],
            texts={lang: [] for lang in languages},
            text_to_image={lang: [] for lang in languages},
            name=name,
        )

    def full(self) -> bool:
        return self.max_images is not None and len(self.index) >= self.max_images

    def image(self, path: Path) -> int | None:
        """The index of the image at `path` (added if new); None: missing file or over limit."""
        if path in self.index:
            return self.index[path]
        if not path.is_file():
            self.missing.append(str(path))
            return None
        if self.full():
            return None
        self.index[path] = i = len(self.data.images)
        self.data.images.append(path)
        return i

    def caption(self, lang: str, text: str, image: int | None) -> None:
        if self.every_language and lang not in self.data.texts:
            self.data.texts[lang], self.data.text_to_image[lang] = [], []
        if image is None or lang not in self.data.texts:
            return
        text = text.strip()
        if not text:
            return
        n = self.per_image.get((lang, image), 0)
        if self.max_captions is not None and n >= self.max_captions:
            return
        self.per_image[(lang, image)] = n + 1
        self.data.texts[lang].append(text)
        self.data.text_to_image[lang].append(image)

    def finish(self) -> EvalData:
        """The data with image ids; missing image files are skipped with a warning (as
        CLIP_benchmark's loaders do), and none found at all is an error."""
        if self.missing:
            log.warning(
                "%s: %d image file(s) missing, skipped (first: %s)",
                self.name,
                len(self.missing),
                self.missing[0],
            )
        if not self.data.images:
            where = f" (first missing: {self.missing[0]})" if self.missing else ""
            raise DatasetError(f"{self.name}: no images with captions found{where}")
        self.data.image_ids = [file_sha256(p) for p in self.data.images]
        if self.every_language:  # reports list languages in one order whatever the files'
            order = sorted(self.data.texts)
            self.data.texts = {lang: self.data.texts[lang] for lang in order}
            self.data.text_to_image = {lang: self.data.text_to_image[lang] for lang in order}
        self.data.info = {"kind": self.name, "missing_images": len(self.missing)}
        return self.data

"""XTD10 as adobe-research/Cross-lingual-Test-Dataset-XTD10 distributes it: ``test_image_names
.txt`` (1,000 COCO 2014 image file names, one a line) and ``test_1kcaptions_<lang>.txt`` (line i
is the caption of image i) in ``XTD10/``, with German and French in ``MIC/`` and Japanese (file
code ``jp``) in ``STAIR/``. `PATH` is the repository's root or any one of those folders holding
all the files.

The images are COCO's, 800 from train2014 and 200 from val2014 (``images=DIR``; default
``PATH/images``): ``DIR`` is a COCO root with ``train2014/`` and ``val2014/`` (or COCO 2017's
``train2017/`` and ``val2017/``), or one flat folder of the 1,000 names (CLIP_benchmark's own
images.tar.gz); see `common.resolve_image`.
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

IMAGE_LIST = "test_image_names.txt"
CAPTIONS = "test_1kcaptions_{}.txt"
FILE_CODES = {"ja": "jp"}  # XTD's file name for Japanese
SUBDIRS = ("", "XTD10", "MIC", "STAIR")


def _find(root: Path, name: str) -> Path | None:
    return first_existing(*(root / sub / name for sub in SUBDIRS))


def available_languages(root: Path) -> list[str]:
    """The languages with a caption file under `root` (``jp`` read as ``ja``), sorted."""
    codes = {
        p.name[len("test_1kcaptions_") : -len(".txt")]
        for sub in SUBDIRS
        for p in (root / sub).glob(CAPTIONS.format("*"))
    }
    to_lang = {code: lang for lang, code in FILE_CODES.items()}
    return sorted(to_lang.get(code, code) for code in codes)


def load(
    path: str,
    languages: Sequence[str] | None,
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
    images: str | None = None,
) -> EvalData:
    """XTD10 from folder `path` (`languages` None: every caption file there); `split` is
    ignored (XTD10 is one test set)."""
    root = Path(path)
    names_file = _find(root, IMAGE_LIST)
    if names_file is None:
        raise DatasetError(f"xtd10: no {IMAGE_LIST} in {root} (or XTD10/ under it)")
    names = read_lines(names_file)
    image_dir = Path(images) if images else first_existing(root / "images") or root
    languages = available_languages(root) if languages is None else list(languages)
    if not languages:
        raise DatasetError(f"xtd10: no {CAPTIONS.format('<lang>')} under {root}")
    builder = Builder("xtd10", languages, max_images, max_captions)
    # Images in list order, so image i is line i whatever the languages.
    index = [builder.image(resolve_image(image_dir, name.strip())) for name in names]
    for lang in languages:
        code = FILE_CODES.get(lang, lang)
        file = _find(root, CAPTIONS.format(code))
        if file is None:
            raise DatasetError(f"xtd10: no {CAPTIONS.format(code)} under {root}")
        lines = read_lines(file)
        if len(lines) != len(names):
            raise DatasetError(
                f"xtd10: {file} has {len(lines)} lines for {len(names)} images in {names_file}"
            )
        for i, text in zip(index, lines, strict=True):
            builder.caption(lang, text, i)
    return builder.finish()

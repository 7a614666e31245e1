"""Write a synthetic world to disk, laid out like a user's data set.

    world.json                      seed, sizes, languages, split counts, generator version
    images/<split>/<id>.png         rendered scenes (ids are 6-digit global indices)
    manifest.jsonl                  {"image_path", "caption" (English alt-text), "language",
                                     "split"}
    gold/<lang>.jsonl               {"image_path", "split", "captions": [K parallel paraphrases]}
    scenes.jsonl                    {"image_path", "split", "scene": {...}, "alt_text": kind}

The alt-text is what a web crawl gives: a share `alt_text_noise` of it is useless ("generic":
"IMG_0412.jpg", "image", ...) or describes another picture ("mismatched"); the rest ("clean") is
one of the image's English gold paraphrases. That noise is what synthetic captions and CLIP
filtering are for (CAPIVARA), so the world can show what they buy.

Image i depends only on (seed, i), so the output is byte-identical for a seed whatever the
number of worker processes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from babelcap.core.devices import available_cores
from babelcap.world.grammar import LANGUAGES, NUM_VARIANTS, describe, describe_all
from babelcap.world.scene import COLOURS, SHAPES, SIZES, render, sample_scene

GENERATOR_VERSION = 2  # 2: noisy alt-text
ALT_TEXT_KINDS = ("clean", "generic", "mismatched")
# Alt-text as crawls have it when it says nothing about the picture.
GENERIC_ALT_TEXTS = (
    "image",
    "photo",
    "picture",
    "untitled",
    "thumbnail",
    "click to enlarge",
    "stock image",
    "abstract shapes",
    "colourful shapes",
    "geometric art",
    "my drawing",
    "wallpaper",
)
SPLITS = ("train", "val", "test")
# The small world the tests and the quick benchmarks share (.cache/test-world).
TEST_WORLD: dict[str, Any] = {"n_images": 400, "seed": 7, "image_size": 64}
# world.json keys that identify a build: same values -> same bytes.
_IDENTITY = ("version", "seed", "n_images", "image_size", "alt_text_noise", "languages", "counts")
_OUTPUTS = ("world.json", "manifest.jsonl", "scenes.jsonl", "images", "gold")
# Written first by every build (with exactly WORLD_MARKER_TEXT): a folder with world files and
# neither this marker nor a world.json of babelcap's keys is the user's, and `build_world`
# refuses to touch it.
WORLD_MARKER = ".babelcap-world"
WORLD_MARKER_TEXT = "babelcap world build\n"
# world.json keys (and their types) that every build writes: a world.json without all of them is
# not proof that the folder is a babelcap world.
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "seed": int,
    "n_images": int,
    "image_size": int,
    "alt_text_noise": (int, float),
    "languages": list,
    "num_variants": int,
    "counts": dict,
    "shapes": list,
    "colours": list,
    "sizes": list,
}
# The files a build writes under images/ and gold/: only these are removed by a rebuild.
_OWN_IMAGE = re.compile(r"\d{6,}\.png")
_OWN_GOLD = re.compile(r"[a-z]{2,3}\.jsonl")


def image_rng(seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512: stable across runs and Python hash seeds.
    return random.Random(f"babelcap-world:{seed}:{index}")


def split_counts(n_images: int, splits: Sequence[float]) -> dict[str, int]:
    if len(splits) != 3 or abs(sum(splits) - 1.0) > 1e-6 or min(splits) < 0:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {splits}")
    n_train = round(n_images * splits[0])
    n_val = round(n_images * splits[1])
    return {"train": n_train, "val": n_val, "test": n_images - n_train - n_val}


def split_of(index: int, counts: dict[str, int]) -> str:
    if index < counts["train"]:
        return "train"
    return "val" if index < counts["train"] + counts["val"] else "test"


def noisy_alt_text(rng: random.Random, noise: float) -> tuple[str, str | None]:
    """(kind, text) of an image's alt-text; text None means its own gold caption ("clean")."""
    if rng.random() >= noise:
        return "clean", None
    if rng.random() < 0.5:
        if rng.random() < 0.3:
            return (
                "generic",
                f"{rng.choice(('IMG', 'DSC', 'image'))}_{rng.randrange(10000):04d}.jpg",
            )
        return "generic", rng.choice(GENERIC_ALT_TEXTS)
    # The alt-text of some other picture (a scene drawn here, never rendered).
    return "mismatched", describe(sample_scene(rng), "en", rng.randrange(NUM_VARIANTS))


def _make_image(
    job: tuple[int, int, str, int, tuple[str, ...], str, float],
) -> dict[str, Any]:
    """Sample, render and save image `index`; return its rows (captions, scene)."""
    index, seed, out_dir, image_size, languages, split, alt_noise = job
    rng = image_rng(seed, index)
    scene = sample_scene(rng)
    alt_variant = rng.randrange(NUM_VARIANTS)
    alt_kind, alt_text = noisy_alt_text(rng, alt_noise)
    rel_path = f"images/{split}/{index:06d}.png"
    # Fixed PNG options and no metadata chunks: same scene -> same bytes.
    render(scene, image_size).save(Path(out_dir) / rel_path, format="PNG", compress_level=6)
    return {
        "image_path": rel_path,
        "split": split,
        "scene": scene.to_dict(),
        "captions": {lang: describe_all(scene, lang) for lang in languages},
        "alt_variant": alt_variant,
        "alt_kind": alt_kind,
        "alt_text": alt_text,
    }


def _babelcap_meta(path: Path) -> bool:
    """Is `path` a world.json that babelcap wrote (a JSON object with all of its keys)?"""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
            return False
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and all(
        isinstance(meta.get(k), t) and not isinstance(meta.get(k), bool)
        for k, t in _META_TYPES.items()
    )


def _marker_is_ours(path: Path) -> bool:
    try:
        return (
            not path.is_symlink()
            and path.is_file()
            and path.stat().st_size < 100
            and path.read_text(encoding="utf-8") == WORLD_MARKER_TEXT
        )
    except (OSError, ValueError):
        return False


def is_world_folder(out: str | Path) -> bool:
    """Did a babelcap world build write into `out`? Its marker file (exactly as a build writes
    it) or a world.json with every key a build writes; any other world.json is not proof."""
    out = Path(out)
    return _marker_is_ours(out / WORLD_MARKER) or _babelcap_meta(out / "world.json")


def _write_marker(out: Path) -> None:
    marker = out / WORLD_MARKER
    if marker.is_symlink():  # never write through a link
        marker.unlink()
    marker.write_text(WORLD_MARKER_TEXT, encoding="utf-8")


def _check_layout(out: Path) -> None:
    """FileExistsError when a build would have to write through a link or replace a folder or
    a file that is in the way (checked before anything is written)."""
    for name in ("world.json", "manifest.jsonl", "scenes.jsonl"):
        if (out / name).is_dir() and not (out / name).is_symlink():
            raise FileExistsError(f"{out / name} is a folder: refusing to replace it")
    for folder in [out / "images", *(out / "images" / s for s in SPLITS), out / "gold"]:
        if folder.is_symlink():
            raise FileExistsError(f"{folder} is a link: refusing to write through it")
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is not a folder: refusing to replace it")


def _remove_world_files(out: Path) -> None:
    """Remove what an earlier build wrote: its top-level files, images/<split>/NNNNNN.png and
    gold/<lang>.jsonl, and those folders when that leaves them empty. Anything else in them
    (a user's file) stays."""
    for name in ("world.json", "manifest.jsonl", "scenes.jsonl"):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    owned = [*((out / "images" / s, _OWN_IMAGE) for s in SPLITS), (out / "gold", _OWN_GOLD)]
    for folder, pattern in owned:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if pattern.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file()):
                os.unlink(entry.path)
    for folder in [*(out / "images" / s for s in SPLITS), out / "images", out / "gold"]:
        with contextlib.suppress(OSError):  # only when empty
            folder.rmdir()


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def build_world(
    out_dir: str | Path,
    n_images: int = 1000,
    seed: int = 0,
    languages: Sequence[str] = LANGUAGES,
    image_size: int = 64,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    workers: int | None = None,
    progress: bool = True,
    alt_text_noise: float = 0.5,
) -> dict[str, Any]:
    """Build a world into `out_dir` (its earlier world files are replaced); return world.json.

    `alt_text_noise`: the share of images whose alt-text is generic or another image's.
    """
    languages = tuple(languages)
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language(s) {unknown}; known: {', '.join(LANGUAGES)}")
    if "en" not in languages:
        languages = ("en", *languages)  # the manifest's alt-text is English
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if not 0.0 <= alt_text_noise <= 1.0:
        raise ValueError(f"alt_text_noise must be in [0, 1], got {alt_text_noise}")
    counts = split_counts(n_images, splits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    theirs = [name for name in _OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if theirs and not is_world_folder(out):
        raise FileExistsError(
            f"{out} holds {', '.join(theirs)} but is not a babelcap world (no world.json written "
            f"by babelcap, no {WORLD_MARKER}): refusing to replace them; choose an empty or new "
            "folder"
        )
    _check_layout(out)
    _write_marker(out)
    _remove_world_files(out)  # never mix files of two builds (models/ is left alone)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "gold").mkdir(exist_ok=True)

    if workers is None:
        # A pool only pays off for bigger worlds.
        workers = min(available_cores(), 8) if n_images >= 2000 else 1
    jobs = [
        (i, seed, str(out), image_size, languages, split_of(i, counts), alt_text_noise)
        for i in range(n_images)
    ]
    with contextlib.ExitStack() as stack:

        def sink(path: Path):
            return stack.enter_context(open(path, "w", encoding="utf-8", newline="\n"))

        manifest, scenes = sink(out / "manifest.jsonl"), sink(out / "scenes.jsonl")
        gold = {lang: sink(out / "gold" / f"{lang}.jsonl") for lang in languages}
        bar = stack.enter_context(
            tqdm(total=n_images, desc="world images", unit="img", disable=not progress)
        )
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context().Pool(workers))
            rows = pool.imap(_make_image, jobs, chunksize=64)  # imap keeps index order
        else:
            rows = map(_make_image, jobs)
        for row in rows:
            path, split = row["image_path"], row["split"]
            english = row["captions"]["en"]
            manifest.write(
                _dumps(
                    {
                        "image_path": path,
                        "caption": row["alt_text"] or english[row["alt_variant"]],
                        "language": "en",
                        "split": split,
                    }
                )
            )
            scenes.write(
                _dumps(
                    {
                        "image_path": path,
                        "split": split,
                        "scene": row["scene"],
                        "alt_text": row["alt_kind"],
                    }
                )
            )
            for lang in languages:
                gold[lang].write(
                    _dumps({"image_path": path, "split": split, "captions": row["captions"][lang]})
                )
            bar.update()

    meta = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_images": n_images,
        "image_size": image_size,
        "alt_text_noise": alt_text_noise,
        "languages": list(languages),
        "num_variants": NUM_VARIANTS,
        "counts": counts,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
    }
    # Written last: a world.json means a complete world.
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def world_meta(world_dir: str | Path) -> dict[str, Any] | None:
    """world.json of a complete world in `world_dir` (written last by `build_world`), or None."""
    path = Path(world_dir) / "world.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _identity(
    n_images: int = 1000,
    seed: int = 0,
    languages: Sequence[str] = LANGUAGES,
    image_size: int = 64,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    alt_text_noise: float = 0.5,
) -> dict[str, Any]:
    """The world.json identity `build_world` would write for these parameters."""
    languages = tuple(languages)
    if "en" not in languages:
        languages = ("en", *languages)
    return {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_images": n_images,
        "image_size": image_size,
        "alt_text_noise": alt_text_noise,
        "languages": list(languages),
        "counts": split_counts(n_images, splits),
    }


def is_built(world_dir: str | Path, **params: Any) -> bool:
    """Is a complete world built in `world_dir` with these `build_world` parameters (and this
    generator version)? Parameters left out count as their defaults."""
    meta = world_meta(world_dir)
    if meta is None:
        return False
    wanted = _identity(**params)
    return all(meta.get(k) == wanted[k] for k in _IDENTITY)


def ensure_world(
    out_dir: str | Path, *, workers: int | None = None, progress: bool = True, **params: Any
) -> Path:
    """The world in `out_dir`: reused when it was built with these parameters (see
    `is_built`), (re)built otherwise. The one "is this world built" check for the CLI, demo,
    tests and benchmarks; `params` are `build_world`'s."""
    out = Path(out_dir)
    if is_built(out, **params):
        return out
    build_world(out, workers=workers, progress=progress, **params)
    return out

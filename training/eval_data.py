"""Evaluation datasets: images once, captions per language, and the zero-shot tasks a dataset
provides (labels per image, class names and prompt templates per language), in the spirit of
CLIP_benchmark, where datasets, class names and templates are data, not code of the evaluator.

`load_eval_data(spec, languages, ...)` reads one dataset named by `spec`:

- ``shards:PATH`` or a plain path / folder / glob / URI: babelcap shards (found with
  `babelcap.core.shards.find_shards`), images from their bytes, gold captions;
  ``shards[ORIGIN,ORIGIN]:PATH`` picks captions of other origins (e.g. ``shards[translated]:out``,
  ``shards[*]:out`` for every origin). Shards have no zero-shot tasks.
- ``NAME:ARG``: a reader registered under the entry-point group ``babelcap.eval_datasets``
  (``[project.entry-points."babelcap.eval_datasets"]`` in a pyproject), called as
  ``reader(ARG, languages=..., split=..., max_images=..., max_captions=...)`` (``languages``
  None: every language the dataset has) and returning `EvalData`. The world registers
  ``world`` (``world:PATH``); training never imports it.

After the argument, comma-separated items choose the split (a bare word: ``xm3600:DIR``,
``karpathy:dataset_flickr30k.json,test``, ``world:W,val``; ``all`` for every split) and pass
reader options (``key=value``: ``xtd10:DIR,images=/data/coco``), so one string names a
dataset the same way in `babelcap eval --dataset`, the trainer's config and a benchmark script.
The public benchmarks' readers (xm3600, xtd10, multi30k, karpathy, manifest) are in
`babelcap.training.benchmarks`, registered like any other.

A new dataset is one reader function and one entry point; the evaluator needs no change.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from babelcap.core import schema

ENTRY_POINT_GROUP = "babelcap.eval_datasets"
SHARDS = "shards"
DEFAULT_TEMPLATES = ["{}"]


@dataclass
class ZeroShotTask:
    """One classification task: a label (index into the classes, or None) per image, the class
    names in each language (same order in every language) and prompt templates per language
    (``"{}"`` stands for the class name)."""

    labels: list[int | None]
    classes: dict[str, list[str]] = field(default_factory=dict)
    templates: dict[str, list[str]] = field(default_factory=dict)

    def templates_for(self, lang: str) -> list[str]:
        return list(self.templates.get(lang) or DEFAULT_TEMPLATES)


@dataclass
class EvalData:
    """Images once, and per language the captions with the index of their image."""

    images: list[Any]  # PIL images (decoded with babelcap.core.images) or paths
    texts: dict[str, list[str]] = field(default_factory=dict)
    text_to_image: dict[str, list[int]] = field(default_factory=dict)
    image_ids: list[str] = field(default_factory=list)  # sha256 of the image bytes (image_id)
    zero_shot: dict[str, ZeroShotTask] = field(default_factory=dict)
    name: str = ""  # the dataset's kind (xm3600, world, shards, ...), for reports
    info: dict[str, Any] = field(default_factory=dict)  # what the reader wants reported

    def only(self, languages: Sequence[str]) -> EvalData:
        """The same images and tasks with the captions of `languages` only."""
        return EvalData(
            images=self.images,
            texts={lang: self.texts[lang] for lang in languages if lang in self.texts},
            text_to_image={
                lang: self.text_to_image[lang] for lang in languages if lang in self.texts
            },
            image_ids=self.image_ids,
            zero_shot=self.zero_shot,
            name=self.name,
            info=self.info,
        )


Reader = Callable[..., EvalData]

# NAME, optional [OPTIONS], ":", ARG; a URI (scheme://) is a path, not a reader name.
_SPEC = re.compile(r"^(?P<name>[A-Za-z][\w.-]*)(?:\[(?P<options>[^\]]*)\])?:(?P<arg>.*)$")


def readers() -> dict[str, Any]:
    """Registered dataset readers (entry points of group `babelcap.eval_datasets`) by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


# A trailing ",word" (a split) or ",key=value" (a reader option) after a dataset's argument.
_SPLIT_ITEM = re.compile(r"^[A-Za-z][\w-]*$")
_OPTION_ITEM = re.compile(r"^(?P<key>[A-Za-z_]\w*)=(?P<value>.*)$")


def split_options(arg: str) -> tuple[str, str | None, dict[str, str]]:
    """(argument, split or None, options) of ``PATH[,split][,key=value...]``: trailing items
    are taken while they look like a split name or key=value (a shard list keeps its paths)."""
    items = arg.split(",")
    split: str | None = None
    options: dict[str, str] = {}
    while len(items) > 1:
        last = items[-1].strip()
        option = _OPTION_ITEM.match(last)
        if option:
            options.setdefault(option["key"], option["value"])
        elif _SPLIT_ITEM.match(last) and split is None:
            split = last
        else:
            break
        items.pop()
    return ",".join(items), split, options


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """(reader name, options or None, argument); a plain path is ("shards", None, path)."""
    match = _SPEC.match(spec)
    if match is None or "://" in spec[: match.end("name") + 3] or len(match["name"]) == 1:
        return SHARDS, None, spec  # a plain path, glob or URI (or a Windows drive letter)
    return match["name"], match["options"], match["arg"]


def load_eval_data(
    spec: str,
    languages: Sequence[str] | None,
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
) -> EvalData:
    """Read the evaluation dataset `spec` (see the module doc) for `languages` (None: every
    language the dataset has; babelcap's readers and shards take None, the world's reader needs
    its languages named, which `babelcap eval` reads from the world's world.json).

    `split`: rows of this split only (None: all; a split in the spec wins); `max_images`: the
    first N images; `max_captions`: at most N captions per image and language.
    """
    name, options, arg = parse_spec(str(spec))
    arg, spec_split, reader_options = split_options(arg)
    if spec_split is not None:
        split = None if spec_split == "all" else spec_split
    if not arg:
        raise ValueError(f"evaluation dataset {spec!r}: nothing after {name + ':'!r}")
    if name == SHARDS:
        if options is None or options.strip() in ("", schema.ORIGIN_GOLD):
            origins: tuple[str, ...] | None = (schema.ORIGIN_GOLD,)
        elif options.strip() == "*":
            origins = None
        else:
            origins = tuple(o.strip() for o in options.split(",") if o.strip())
            unknown = sorted(set(origins) - set(schema.ORIGINS))
            if unknown:
                raise ValueError(
                    f"evaluation dataset {spec!r}: unknown caption origin(s) {unknown}; "
                    f"known: {', '.join(schema.ORIGINS)} (or * for all)"
                )
        if reader_options:
            raise ValueError(f"evaluation dataset {spec!r}: shards take no key=value options")
        data = shard_eval_data(arg, languages, origins, split, max_images, max_captions)
        data.name = data.name or SHARDS
        return data
    if options is not None:
        raise ValueError(f"evaluation dataset {spec!r}: options [...] are for shards only")
    known = readers()
    if name not in known:
        names = ", ".join(sorted({SHARDS, *known}))
        raise ValueError(
            f"unknown evaluation dataset {name!r} in {spec!r}; known: {names} "
            f"(readers register under the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    reader: Reader = known[name].load()
    if reader_options:
        accepted = inspect.signature(reader).parameters
        unknown = [k for k in reader_options if k not in accepted]
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            raise ValueError(
                f"evaluation dataset {spec!r}: reader {name!r} takes no option(s) "
                f"{', '.join(unknown)}"
            )
    data = reader(
        arg,
        languages=None if languages is None else list(languages),
        split=split,
        max_images=max_images,
        max_captions=max_captions,
        **reader_options,
    )
    if not isinstance(data, EvalData):
        raise TypeError(f"evaluation dataset reader {name!r} returned {type(data).__name__}")
    data.name = data.name or name
    return data


def shard_eval_data(
    specs: str | Sequence[str],
    languages: Sequence[str] | None,
    origins: Sequence[str] | None = (schema.ORIGIN_GOLD,),
    split: str | None = None,
    max_images: int | None = None,
    max_captions: int | None = None,
) -> EvalData:
    """Shards' rows with image bytes and captions of `languages` (None: every language of
    those origins, sorted) and `origins` (None: all)."""
    import pyarrow.dataset as ds

    from babelcap.core.images import decode_rgb
    from babelcap.core.shards import find_shards

    shards = find_shards(specs)
    every = languages is None
    data = EvalData(
        images=[],
        texts={lang: [] for lang in languages or ()},
        text_to_image={lang: [] for lang in languages or ()},
    )
    dataset = ds.dataset(list(shards.files), format="parquet", filesystem=shards.filesystem)
    columns = ["image_id", "image", "split", "captions"]
    for batch in dataset.to_batches(columns=columns):
        for row in batch.to_pylist():
            if max_images is not None and len(data.images) >= max_images:
                return _in_order(data) if every else data
            if split is not None and row["split"] != split:
                continue
            image_bytes = (row["image"] or {}).get("bytes")
            if not image_bytes:
                continue
            per_lang: dict[str, list[str]] = {}
            for c in row["captions"] or []:
                wanted = every or c["language"] in data.texts
                if wanted and (origins is None or c["origin"] in origins):
                    per_lang.setdefault(c["language"], []).append(c["text"])
            if not per_lang:
                continue
            i = len(data.images)
            data.images.append(decode_rgb(image_bytes))
            data.image_ids.append(row["image_id"] or schema.image_id_for(image_bytes))
            for lang, texts in per_lang.items():
                for text in texts[:max_captions]:
                    data.texts.setdefault(lang, []).append(text)
                    data.text_to_image.setdefault(lang, []).append(i)
    return _in_order(data) if every else data


def _in_order(data: EvalData) -> EvalData:
    """`data` with its languages sorted (one order for reports whatever the shards')."""
    order = sorted(data.texts)
    data.texts = {lang: data.texts[lang] for lang in order}
    data.text_to_image = {lang: data.text_to_image[lang] for lang in order}
    return data

"""The world as an evaluation dataset (entry point ``world`` of group ``babelcap.eval_datasets``,
so ``babelcap eval --data world:PATH`` and `load_eval_data("world:PATH", ...)` read it).

Gold captions of a split per language, images decoded with the one decoder
(`babelcap.core.images.decode_rgb`) and identified by the sha256 of their bytes (the shards'
``image_id``), and zero-shot tasks: the shape and the colour of the lone object of
single-object scenes, class names per language from the world's lexicon, prompt templates per
language from ``zero_shot.json`` (data, next to this module).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from babelcap.core.images import decode_rgb
from babelcap.core.schema import image_id_for
from babelcap.training.eval_data import EvalData, ZeroShotTask
from babelcap.world.lexicon import class_names
from babelcap.world.load import load_gold, load_scenes
from babelcap.world.scene import COLOURS, SHAPES

ZERO_SHOT_FILE = Path(__file__).with_name("zero_shot.json")
CLASS_KEYS: dict[str, tuple[str, ...]] = {"shape": tuple(SHAPES), "colour": tuple(COLOURS)}


@cache
def zero_shot_config() -> dict[str, Any]:
    """{"tasks": [...], "templates": {lang: [...]}} from zero_shot.json."""
    return json.loads(ZERO_SHOT_FILE.read_text(encoding="utf-8"))


def zero_shot_tasks(scenes: Sequence[Any], languages: Sequence[str]) -> dict[str, ZeroShotTask]:
    """Tasks for images with these scenes (None: no scene known): labels of single-object
    scenes, class names and templates in `languages`."""
    config = zero_shot_config()
    tasks: dict[str, ZeroShotTask] = {}
    for task in config["tasks"]:
        keys = CLASS_KEYS[task]
        labels: list[int | None] = []
        for scene in scenes:
            objs = scene.objects if scene is not None else ()
            value = getattr(objs[0], task) if len(objs) == 1 else None
            labels.append(keys.index(value) if value in keys else None)
        tasks[task] = ZeroShotTask(
            labels=labels,
            classes={lang: [class_names(lang)[task][k] for k in keys] for lang in languages},
            templates={
                lang: list(config["templates"][lang])
                for lang in languages
                if lang in config["templates"]
            },
        )
    return tasks


def load(
    world_dir: str | Path,
    languages: Sequence[str],
    split: str | None = "test",
    max_images: int | None = None,
    max_captions: int | None = None,
) -> EvalData:
    """Evaluation data of a built world's split (None: every split)."""
    world_dir = Path(world_dir)
    gold = {lang: load_gold(world_dir, lang, split) for lang in languages}
    order = dict.fromkeys(row["image_path"] for lang in languages for row in gold[lang])
    paths = list(order)[:max_images]
    index = {p: i for i, p in enumerate(paths)}
    data = EvalData(images=[])
    for p in paths:
        raw = (world_dir / p).read_bytes()
        data.images.append(decode_rgb(raw))
        data.image_ids.append(image_id_for(raw))
    for lang in languages:
        texts, t2i = [], []
        for row in gold[lang]:
            if row["image_path"] not in index:
                continue
            for text in row["captions"][:max_captions]:
                texts.append(text)
                t2i.append(index[row["image_path"]])
        data.texts[lang], data.text_to_image[lang] = texts, t2i
    scenes = {r["image_path"]: r["scene"] for r in load_scenes(world_dir, split)}
    data.zero_shot = zero_shot_tasks([scenes.get(p) for p in paths], languages)
    return data

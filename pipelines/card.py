"""The dataset card (`OUTPUT/README.md`) written with every augment output.

It opens with the YAML header the Hugging Face Hub reads (configs with the data files of each
split, the features as the Hub writes them, languages, size category, task categories; the
licence is left for the user, who knows the images' terms), then gives the run's figures from
the manifest: counts per split, captions per language and origin, the books, the captions
the filters dropped (degenerate translations among them), dead letters, models and filters.
Everything in it comes from the manifest, whose paths are portable (no folder of this
machine). With it the folder can be pushed to the Hub as it is, and
`datasets.load_dataset(OUTPUT)` reads the splits and features it declares.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from babelcap.core import schema
from babelcap.core.shards import DATA_DIR

MARKER = "<!-- babelcap:dataset-card -->"


def size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
    ):
        if n < limit:
            return name
    return "n>100M"


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def feature_yaml(features: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`datasets` Features (their JSON, `schema.hf_features`) as the Hub's card YAML lists them
    (`dataset_info: features:`, as `datasets.Features._to_yaml_list` writes them):
    `- name: image / dtype: image`, a list of structs as `list:` of named fields, a list of
    values as `list: float32`."""

    def inner(feature: Any) -> dict[str, Any]:
        if isinstance(feature, list):  # a List of one feature
            item = inner(feature[0])
            if list(item) == ["dtype"] and isinstance(item["dtype"], str):
                return {"list": item["dtype"]}
            return {"list": item["struct"]} if list(item) == ["struct"] else {"list": item}
        kind = feature.get("_type")
        if kind == "Value":
            return {"dtype": feature["dtype"]}
        if kind:  # Image, Audio, ...: the type's snake_case name
            return {"dtype": re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()}
        return {"struct": [{"name": k, **inner(v)} for k, v in feature.items()]}

    return [{"name": name, **inner(f)} for name, f in features.items()]


def _yaml_features(items: list[dict[str, Any]], indent: str) -> list[str]:
    lines: list[str] = []
    for item in items:
        name = item["name"] if re.fullmatch(r"\w+", item["name"]) else _yaml_str(item["name"])
        lines.append(f"{indent}- name: {name}")
        for key, value in item.items():
            if key == "name":
                continue
            if isinstance(value, list):
                lines.append(f"{indent}  {key}:")
                lines += _yaml_features(value, indent + "  ")
            else:
                lines.append(f"{indent}  {key}: {value}")
    return lines


def _origins_table(captions: Mapping[str, int]) -> list[str]:
    """Captions per language (rows) and origin (columns), from the manifest's `captions`
    ("language/origin" -> count)."""
    table: dict[str, dict[str, int]] = {}
    for key, n in captions.items():
        lang, _, origin = key.partition("/")
        table.setdefault(lang, {})[origin] = table.get(lang, {}).get(origin, 0) + int(n)
    seen = {o for row in table.values() for o in row}
    origins = [o for o in schema.ORIGINS if o in seen] + sorted(seen - set(schema.ORIGINS))
    lines = [
        "| language | " + " | ".join(origins) + " | all |",
        "|---|" + "---:|" * (len(origins) + 1),
    ]
    for lang, row in sorted(table.items()):
        cells = [str(row.get(o, 0)) for o in origins] + [str(sum(row.values()))]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    totals = [str(sum(r.get(o, 0) for r in table.values())) for o in origins]
    lines.append("| all | " + " | ".join([*totals, str(sum(map(int, totals)))]) + " |")
    return lines


# What the caption drops' reasons mean, for the ones a reader would ask about.
DROP_NOTES = {
    "filter_tr.repetition_loop": "degenerate translation: a word 4-gram repeated (a loop)",
    "filter_tr.length_ratio": "degenerate translation: length far from its source's",
    "filter_tr.wrong_language": "translation not in its target language",
    "filter_tr.exact_duplicate": "translation identical to another of the row",
}


def render(manifest: Mapping[str, Any]) -> str:
    """The card's Markdown for a run manifest (see `runner.build_manifest`)."""
    splits: dict[str, int] = manifest.get("splits", {})
    languages: dict[str, int] = manifest.get("captions_per_language", {})
    books = manifest.get("accounting", {})
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in sorted(splits):
        lines += [
            f"  - split: {split}",
            f"    path: {_yaml_str(f'{DATA_DIR}/*/{split}-*.parquet')}",
        ]
    lines += ["dataset_info:", "  features:"]
    lines += _yaml_features(feature_yaml(schema.hf_features(schema.SHARD_SCHEMA)), "  ")
    lines += ["language:"] + [f"- {lang}" for lang in sorted(languages)]
    lines += [
        "size_categories:",
        f"- {size_category(int(books.get('rows_written', 0)))}",
        "task_categories:",
        "- image-to-text",
        "- zero-shot-image-classification",
        "tags:",
        "- babelcap",
        "- multilingual",
        "- synthetic-captions",
        "# license: set the licence of your images here",
        "---",
        MARKER,
        "",
        "# Multilingual image-caption dataset (babelcap)",
        "",
        "Made by `babelcap augment`: images captioned, translated with CTranslate2 and filtered "
        "with CLIP scores. Every row is one image with its captions of every origin (source "
        "alt-text, synthetic, translated), each translation linked to its source caption.",
        "",
        "## Splits",
        "",
        "| split | rows |",
        "|---|---:|",
    ]
    lines += [f"| {s} | {n} |" for s, n in sorted(splits.items())]
    lines += ["", "## Captions per language and origin", ""]
    # (a manifest of before the per-origin counts: one column)
    captions = manifest.get("captions") or {f"{k}/captions": v for k, v in languages.items()}
    lines += [*(_origins_table(captions) if captions else ["- none"]), ""]
    lines += [
        "`source`: the alt-text that came with the image; `synthetic`: written by the "
        "captioner and kept by CLIP; `translated`: a translation of an English caption of the "
        "row (its `source_index`).",
    ]
    drops = {k: v for k, v in (manifest.get("caption_drops") or {}).items() if v}
    lines += ["", "## Captions dropped by the filters", ""]
    if drops:
        lines += ["| stage.reason | captions | note |", "|---|---:|---|"]
        lines += [f"| {k} | {v} | {DROP_NOTES.get(k, '')} |" for k, v in sorted(drops.items())]
    else:
        lines += ["- none"]
    lines += [
        "",
        "## Accounting",
        "",
        f"- inputs: {books.get('inputs', 0)}",
        f"- rows written: {books.get('rows_written', 0)}",
        f"- dead-lettered: {books.get('dead_lettered', 0)} (in `dead_letter/`, with reasons)",
        f"- duplicates dropped: {books.get('duplicates_dropped', 0)}",
        f"- units committed: {len(manifest.get('units', []))}"
        + ("" if manifest.get("complete") else " (the run has not finished every unit)"),
        "",
        "## Models",
        "",
    ]
    lines += [f"- {k}: `{v}`" for k, v in sorted(manifest.get("models", {}).items())] or ["- none"]
    for lang, models in sorted((manifest.get("translators") or {}).items()):
        lines.append(f"- translations into {lang}: " + ", ".join(f"`{m}`" for m in models))
    config = manifest.get("config", {})
    filters: dict[str, Any] = {"text": config.get("text", {})}
    if config.get("clip"):
        filters["clip"] = {
            k: v for k, v in config["clip"].items() if k not in ("device", "batch_size")
        }
    lines += ["", "## Filters", "", "```json", json.dumps(filters, indent=1), "```", ""]
    dead = manifest.get("dead_letters", {})
    if dead:
        lines += ["## Dead letters", "", "| stage/kind | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(dead.items())] + [""]
    lines += [
        "## Licence",
        "",
        "Not set: babelcap cannot know the terms of the images and alt-texts. Set `license:` in "
        "the header above before publishing (and mind the captioner's and translator's terms "
        "for the generated captions).",
        "",
    ]
    lines += [
        "## Reading it",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/to/this/folder")  # splits as above, `image` decodes to PIL',
        "```",
        "",
        f"Plain Parquet readers: `{DATA_DIR}/**/*.parquet` (DuckDB, Polars, pyarrow) is every "
        "row; dead letters and bookkeeping (`_units/`) are outside it.",
        "",
    ]
    return "\n".join(lines)

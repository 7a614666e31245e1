"""The dataset card (`OUTPUT/README.md`) written with every augment output.

It opens with the YAML header the Hugging Face Hub reads (configs with the data files of each
split, languages, size category, task categories; the licence is left for the user, who knows
the images' terms), then gives the run's figures from the manifest: counts per split and
language, the books, dead letters, models and filters. With it the folder can be pushed to
the Hub as it is, and `datasets.load_dataset(OUTPUT)` reads the splits it declares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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
    lines += ["", "## Captions per language", "", "| language | captions |", "|---|---:|"]
    lines += [f"| {lang} | {n} |" for lang, n in sorted(languages.items())]
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
    config = manifest.get("config", {})
    lines += ["", "## Filters", "", "```json", json.dumps(config.get("text", {}), indent=1)]
    if config.get("clip"):
        clip = {k: v for k, v in config["clip"].items() if k not in ("device", "batch_size")}
        lines += [json.dumps({"clip": clip}, indent=1)]
    lines += ["```", ""]
    drops = manifest.get("dead_letters", {})
    if drops:
        lines += ["## Dead letters", "", "| stage/kind | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(drops.items())] + [""]
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

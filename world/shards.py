"""Shards from a built world's gold captions (origin "gold") and English alt-text ("source").

Used to train the world's base CLIP (English only), the oracle (gold target-language captions)
and tests, before / besides the augmentation pipeline. Translations of the gold captions link to
the English caption they translate (`source_index`), exactly like machine translations do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from babelcap.core import schema
from babelcap.core.shards import write_shard
from babelcap.world.load import load_gold, load_manifest


def world_rows(
    world_dir: str | Path,
    languages: Sequence[str] = ("en",),
    split: str | None = "train",
    with_alt_text: bool = False,
    embed_bytes: bool = True,
) -> list[dict]:
    """One shard row per world image with its gold captions in `languages`."""
    world_dir = Path(world_dir)
    gold = {
        lang: {r["image_path"]: r["captions"] for r in load_gold(world_dir, lang, split)}
        for lang in dict.fromkeys(["en", *languages])
    }
    alt = (
        {r["image_path"]: r["caption"] for r in load_manifest(world_dir, split)}
        if with_alt_text
        else {}
    )
    # Each row keeps its own split (a `split=None` export holds every split, labelled).
    splits = {r["image_path"]: r["split"] for r in load_gold(world_dir, "en", split)}
    rows = []
    for image_path, en_caps in gold["en"].items():
        data = (world_dir / image_path).read_bytes()
        caps: list[dict] = []
        if image_path in alt:
            caps.append(schema.caption(alt[image_path], "en", schema.ORIGIN_SOURCE))
        en_start = len(caps)
        if "en" in languages:
            caps.extend(schema.caption(t, "en", schema.ORIGIN_GOLD) for t in en_caps)
        for lang in languages:
            if lang == "en":
                continue
            for k, text in enumerate(gold[lang][image_path]):
                # The gold files are parallel: caption k translates English caption k.
                src = en_start + k if "en" in languages else None
                caps.append(schema.caption(text, lang, schema.ORIGIN_GOLD, source_index=src))
        rows.append(
            {
                "image_id": schema.image_id_for(data),
                "source_uri": image_path,
                "split": splits[image_path],
                "image": {"bytes": data if embed_bytes else None, "path": image_path},
                "width": None,
                "height": None,
                "captions": caps,
            }
        )
    return rows


def write_world_shards(
    world_dir: str | Path,
    out_dir: str | Path,
    languages: Sequence[str] = ("en",),
    split: str | None = "train",
    with_alt_text: bool = False,
    rows_per_shard: int = 256,
    row_group_size: int = 64,
) -> list[Path]:
    """Write `world_rows` as babelcap shards (`shard-00000.parquet`, ...); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = world_rows(world_dir, languages, split, with_alt_text)
    paths = []
    for i in range(0, len(rows), rows_per_shard):
        path = out / f"shard-{i // rows_per_shard:05d}.parquet"
        # Several row groups per file so the reader has units to shuffle and split.
        write_shard(
            path,
            rows[i : i + rows_per_shard],
            config={"source": "world-gold", "split": split, "languages": list(languages)},
            row_group_size=row_group_size,
        )
        paths.append(path)
    return paths

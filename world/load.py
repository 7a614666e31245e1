"""Read a built world back: manifest, gold captions, scenes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from babelcap.world.scene import Scene


def _read_jsonl(path: Path, split: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; build a world with `babelcap world build`")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if split is None else [r for r in rows if r["split"] == split]


def load_manifest(world_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows {"image_path", "caption", "language", "split"}; image_path is relative to world_dir."""
    return _read_jsonl(Path(world_dir) / "manifest.jsonl", split)


def load_gold(world_dir: str | Path, lang: str, split: str | None = None) -> list[dict[str, Any]]:
    """Rows {"image_path", "split", "captions": [K parallel paraphrases]} for one language."""
    return _read_jsonl(Path(world_dir) / "gold" / f"{lang}.jsonl", split)


def load_scenes(world_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows {"image_path", "split", "scene": Scene}."""
    rows = _read_jsonl(Path(world_dir) / "scenes.jsonl", split)
    return [{**r, "scene": Scene.from_dict(r["scene"])} for r in rows]

"""Shared fixtures: one small built world (and its models) per test session.

The world and its models are cached under `.cache/test-world` (keyed by the world's
parameters, and per model by configuration through the models' build stamps), so a second
`make test` reuses them; a fresh clone builds them once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _cache_root() -> Path:
    return Path(os.environ.get("BABELCAP_TEST_CACHE", REPO / ".cache"))


@pytest.fixture(scope="session")
def world_dir() -> Path:
    """A small built world (same parameters every session, rebuilt only when they change)."""
    from babelcap.world.build import TEST_WORLD, ensure_world

    return ensure_world(_cache_root() / "test-world", **TEST_WORLD)


@pytest.fixture(scope="session")
def world_models(world_dir: Path):
    """Build (or reuse) the world's models; call with the names a test needs."""
    from babelcap.world.models import build_models, model_dir

    def build(*names: str) -> dict[str, Path]:
        build_models(world_dir, only=list(names))
        return {name: model_dir(world_dir, name) for name in names}

    return build

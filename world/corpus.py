"""Text corpora from freshly sampled scenes (never the images of a built world): parallel
sentence pairs for training translators, monolingual text for tokenizers and language models."""

from __future__ import annotations

import random

from babelcap.world.grammar import LANGUAGES, NUM_VARIANTS, describe_all
from babelcap.world.scene import sample_scene


def _scene_rng(seed: int, index: int) -> random.Random:
    # A stream of its own, apart from build_world's, so corpora and worlds do not share scenes.
    return random.Random(f"babelcap-corpus:{seed}:{index}")


def _check(*langs: str) -> None:
    for lang in langs:
        if lang not in LANGUAGES:
            raise ValueError(f"unknown language {lang!r}; known: {', '.join(LANGUAGES)}")


def parallel_pairs(
    n: int, seed: int, src: str, tgt: str, all_variants: bool = False
) -> list[tuple[str, str]]:
    """(source, target) translation pairs of n fresh scenes: one random paraphrase each, or,
    with all_variants, all NUM_VARIANTS parallel paraphrases of each scene (n * K pairs)."""
    _check(src, tgt)
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        rng = _scene_rng(seed, i)
        scene = sample_scene(rng)
        source, target = describe_all(scene, src), describe_all(scene, tgt)
        ks = range(NUM_VARIANTS) if all_variants else [rng.randrange(NUM_VARIANTS)]
        pairs.extend((source[k], target[k]) for k in ks)
    return pairs


def monolingual(n: int, seed: int, lang: str) -> list[str]:
    """n sentences in one language, one random paraphrase of a fresh scene each."""
    _check(lang)
    out = []
    for i in range(n):
        rng = _scene_rng(seed, i)
        scene = sample_scene(rng)
        out.append(describe_all(scene, lang)[rng.randrange(NUM_VARIANTS)])
    return out

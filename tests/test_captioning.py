"""Captioning stage: BLIP's image features (and its decoder's cross-attention keys/values over
them) are computed once per batch, and the captions are the ones `BlipForConditionalGeneration.generate` writes (greedy and seeded sampling, with and
without a prompt). Real tiny BLIP, no mocks."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "data"))
import pipeline_testkit as kit


def _png(color, size=(50, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> str:
    return str(kit.tiny_blip(tmp_path_factory.mktemp("blip") / "blip"))


@pytest.mark.parametrize("sampling", [False, True])
def test_blip_captions_equal_generate_with_one_vision_pass(blip, sampling):
    from babelcap.core.images import decode_rgb
    from babelcap.pipelines.captioning import CaptionModelHandler
    from babelcap.pipelines.options import CaptionerConfig

    prompts = ("a photo of", "", "a drawing of")
    cfg = CaptionerConfig(
        model=blip, prompts=prompts, num_captions=3, sampling=sampling, max_new_tokens=6
    )
    handler = CaptionModelHandler(cfg, seed=5)
    model = handler.load_model()
    recs = [
        {"image_id": f"id{i}", "data": _png((70 * i, 30, 200 - 60 * i)), "captions": []}
        for i in range(3)
    ]
    calls = {"vision": 0, "cross_keys": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    cross_key = model.net.text_decoder.bert.encoder.layer[0].crossattention.self.key
    hooks = [
        model.net.vision_model.register_forward_hook(count("vision")),
        cross_key.register_forward_hook(count("cross_keys")),
    ]
    try:
        got = [[c["text"] for c in r["captions"]] for r in handler.run_inference(recs, model)]
    finally:
        for hook in hooks:
            hook.remove()
    # One vision pass and one cross-attention key projection of the image tokens per batch,
    # not one per prompt (nor per image when sampling).
    assert calls == {"vision": 1, "cross_keys": 1}

    # Reference: the model's own generate, one call per prompt (per image when sampling).
    images = [decode_rgb(r["data"]) for r in recs]
    want: list[list[str]] = [[] for _ in recs]
    for k, prompt in enumerate(prompts):
        seeds = handler._seeds(recs, k)
        texts = model._generate(images, prompt, seeds)
        for i, text in enumerate(texts):
            text = " ".join(text.split())
            if prompt and not text.lower().startswith(prompt):
                text = f"{prompt} {text}".strip()
            want[i].append(text)
    assert got == want
    assert any(t.split() != p.split() for row in got for t, p in zip(row, prompts, strict=True))

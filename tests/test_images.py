"""One image decoder: an RGBA image with partial transparency and a 16-bit greyscale PNG reach
the model as the same pixel tensor in the pipeline's CLIP path, the trainer's input path, the
evaluator's paths and the embedding precomputation.

The tensors are taken where each path hands them to the model (`encode_image`'s argument, or
the trainer's batch), and compared with `preprocess(decode_rgb(bytes))`. The test also checks
that a plain `Image.open(...).convert("RGB")` gives different pixels for both images, so it
would notice a path that decodes on its own.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from babelcap.core import schema
from babelcap.core.images import decode_rgb
from babelcap.core.shards import find_shards, write_shard
from babelcap.models.clip import load_clip

# A tiny open_clip model (random weights): the transforms are the model's real ones.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _rgba() -> bytes:
    """Colour under every pixel, alpha from transparent (left) to opaque (right)."""
    h, w = 40, 56
    y, x = np.mgrid[0:h, 0:w]
    rgba = np.stack(
        [
            (x * 255 // (w - 1)),
            (y * 255 // (h - 1)),
            np.full_like(x, 40),
            (x * 255 // (w - 1)),
        ],
        axis=-1,
    ).astype(np.uint8)
    return _png(Image.fromarray(rgba, mode="RGBA"))


def _grey16() -> bytes:
    """16-bit greyscale over the whole range (a plain 8-bit conversion clips most of it)."""
    h, w = 48, 36
    values = (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 65535 // (h * w - 1)).astype(
        np.uint16
    )
    im = Image.fromarray(values)  # mode I;16
    assert im.mode.startswith("I;16"), im.mode
    data = _png(im)
    assert Image.open(io.BytesIO(data)).mode.startswith("I"), "PNG lost its 16 bits"
    return data


IMAGES = {"rgba": _rgba, "grey16": _grey16}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[bytes, Path]]:
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, make in IMAGES.items():
        data = make()
        path = root / f"{name}.png"
        path.write_bytes(data)
        out[name] = (data, path)
    return out


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-clip") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def bundle(model_config):
    return load_clip(str(model_config))


@pytest.fixture(scope="module")
def expected(bundle, images) -> dict[str, torch.Tensor]:
    return {name: bundle.preprocess_val(decode_rgb(data)) for name, (data, _) in images.items()}


@pytest.fixture(scope="module")
def shard(tmp_path_factory, images) -> Path:
    """One shard: each image once with its bytes and once by path only."""
    rows = []
    for name, (data, path) in images.items():
        for how, image in (("bytes", {"bytes": data, "path": None}), ("path", None)):
            rows.append(
                {
                    "image_id": f"{name}-{how}",
                    "source_uri": str(path),
                    "split": None,  # read by the trainer and the evaluator alike
                    "image": image or {"bytes": None, "path": str(path)},
                    "width": None,
                    "height": None,
                    "captions": [schema.caption(f"{name} {how}", "pt", schema.ORIGIN_GOLD)],
                    "embedding": None,
                    "embedding_model": None,
                }
            )
    out = tmp_path_factory.mktemp("shards") / "part-00000.parquet"
    write_shard(out, rows)
    return out


class Recorder:
    """Wraps a model's `encode_image` and keeps every pixel tensor handed to it."""

    def __init__(self, model, monkeypatch):
        self.seen: list[torch.Tensor] = []
        original = model.encode_image

        def encode_image(x, *args, **kwargs):
            self.seen.extend(t.detach().cpu().clone() for t in x)
            return original(x, *args, **kwargs)

        monkeypatch.setattr(model, "encode_image", encode_image)


def _same(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert torch.equal(got, want), f"{where}: pixels differ from decode_rgb (max |diff| {diff})"


def test_a_plain_conversion_gives_other_pixels(bundle, images, expected):
    """What the shared decoder fixes: without it the test images really do come out different."""
    for name, (data, _) in images.items():
        plain = bundle.preprocess_val(Image.open(io.BytesIO(data)).convert("RGB"))
        assert not torch.equal(plain, expected[name]), name
        assert (plain - expected[name]).abs().max() > 0.5, name
    # open_clip's own transform on the undecoded image is the same mistake.
    raw = bundle.preprocess_val(Image.open(io.BytesIO(images["rgba"][0])))
    assert not torch.equal(raw, expected["rgba"])


def test_pipeline_clip_path(model_config, images, expected, monkeypatch):
    from babelcap.pipelines.clipscore import ClipModelHandler
    from babelcap.pipelines.options import ClipConfig

    handler = ClipModelHandler(
        ClipConfig(model=str(model_config), score=False, embed_images=True, device="cpu")
    )
    loaded = handler.load_model()
    recorder = Recorder(loaded.net, monkeypatch)
    names = list(images)
    records = [{"data": images[n][0], "captions": []} for n in names]
    out = list(handler.run_inference(records, loaded))
    assert all(len(r["embedding"]) == TINY_CLIP["embed_dim"] for r in out)
    assert len(recorder.seen) == len(names)
    for name, got in zip(names, recorder.seen, strict=True):
        _same(got, expected[name], f"pipeline CLIP ({name})")


def test_trainer_input_path(bundle, shard, expected):
    from babelcap.training.data import CaptionSelection, ShardStream, StreamConfig

    stream = ShardStream(
        find_shards(str(shard)),
        CaptionSelection(languages=("pt",), origins=(schema.ORIGIN_GOLD,)),
        StreamConfig(batch_size=4, shuffle_buffer=1, drop_last=False),
        None,
        bundle.preprocess_val,
    )
    (batch,) = list(stream)
    assert sorted(batch["image_ids"]) == sorted(
        f"{n}-{how}" for n in IMAGES for how in ("bytes", "path")
    )
    for image_id, got in zip(batch["image_ids"], batch["images"], strict=True):
        _same(got, expected[image_id.split("-")[0]], f"trainer ({image_id})")


def test_evaluator_paths(bundle, images, shard, expected, monkeypatch):
    from babelcap.training.eval_data import load_eval_data
    from babelcap.training.evaluate import encode_images

    recorder = Recorder(bundle.model, monkeypatch)
    names = list(images)
    cases = [
        ("files", [images[n][1] for n in names]),
        ("str paths", [str(images[n][1]) for n in names]),
        ("undecoded PIL images", [Image.open(images[n][1]) for n in names]),
    ]
    for where, inputs in cases:
        recorder.seen.clear()
        encode_images(bundle, inputs)
        for name, got in zip(names, recorder.seen, strict=True):
            _same(got, expected[name], f"evaluator, {where} ({name})")

    # The evaluation data reader (shards) -> encode_images, as `babelcap eval` runs it.
    data = load_eval_data(str(shard), ["pt"], split=None)
    rows = {
        text.split()[0]: i
        for i, text in zip(data.text_to_image["pt"], data.texts["pt"], strict=True)
    }
    assert set(rows) == set(names), data.texts
    recorder.seen.clear()
    encode_images(bundle, data.images)
    for name, i in rows.items():
        _same(recorder.seen[i], expected[name], f"evaluator, shard reader ({name})")


def test_embedding_precomputation(bundle, shard, expected, tmp_path, monkeypatch):
    from babelcap.training.embeddings import embed_shards

    # embed_shards needs image bytes in every row: a shard of the rows that carry them.
    with_bytes = tmp_path / "in" / "part-00000.parquet"
    with_bytes.parent.mkdir()
    rows = [r for r in pq.read_table(shard).to_pylist() if (r["image"] or {}).get("bytes")]
    write_shard(with_bytes, rows)
    recorder = Recorder(bundle.model, monkeypatch)
    (written,) = embed_shards(bundle, [with_bytes], tmp_path / "out")
    assert written.exists()
    assert len(recorder.seen) == len(rows)
    for row, got in zip(rows, recorder.seen, strict=True):
        _same(got, expected[row["image_id"].split("-")[0]], f"embeddings ({row['image_id']})")

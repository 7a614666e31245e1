"""Test kit for the pipeline tests: tiny real models and a bad-input corpus, generated, not stored.

- `tiny_blip(dir)`: a randomly initialised BlipForConditionalGeneration + BlipProcessor (BERT
  WordPiece tokenizer over a small vocabulary), saved with save_pretrained; the stand-in until
  the world's captioner is available.
- `tiny_translator(dir)`: a randomly initialised multilingual Marian model (`>>pt<<`-style
  target tokens) converted to CTranslate2 by the translators package.
- `tiny_clip(dir)`: a small open_clip model folder (open_clip_config.json + safetensors).
- `bad_corpus(dir, good_images)`: every bad input of the issue, plus a manifest pointing at them.

Run `python tests/data/pipeline_testkit.py OUT` to write the bad corpus for inspection.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = [
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "image",
    "photograph",
    "illustration",
    "rendering",
    "snapshot",
    "close-up",
    "drawing",
    "painting",
    "of",
    "red",
    "green",
    "blue",
    "yellow",
    "small",
    "big",
    "circle",
    "square",
    "triangle",
    "star",
    "on",
    "left",
    "right",
]


def tiny_blip(out: Path) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = specials + sorted(set(WORDS) | set("abcdefghijklmnopqrstuvwxyz-"))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    cfg = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": vocab.index("[DEC]"),
            "pad_token_id": 0,
            "sep_token_id": vocab.index("[SEP]"),
        },
        projection_dim=32,
    )
    import torch

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    proc = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def tiny_translator(out: Path, languages=("pt", "es"), seed: int = 0) -> Path:
    """Random multilingual Marian (en -> languages), converted with translators.convert_model
    (another seed: other weights, so other translations)."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    hf = out.parent / (out.name + "-hf")
    hf.mkdir(parents=True, exist_ok=True)
    pieces = _write_spm(hf / "source.spm", WORDS)
    _write_spm(hf / "target.spm", WORDS)
    # Marian convention (opus-mt): <pad> is the last id; CTranslate2's converter relies on it.
    vocab = [
        "</s>",
        "<unk>",
        *[f">>{c}<<" for c in languages],
        *[p for p in pieces if p not in ("</s>", "<unk>", "<pad>")],
        "<pad>",
    ]
    vocab_json = {w: i for i, w in enumerate(vocab)}
    (hf / "vocab.json").write_text(json.dumps(vocab_json))
    (hf / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "MarianTokenizer",
                "source_lang": "en",
                "target_lang": "+".join(languages),
                "model_max_length": 64,
            }
        )
    )
    cfg = MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=len(vocab) - 1,
        eos_token_id=0,
        decoder_start_token_id=len(vocab) - 1,
        forced_eos_token_id=0,
    )
    torch.manual_seed(seed)
    MarianMTModel(cfg).save_pretrained(hf)
    from babelcap.translators import convert_model

    convert_model(hf, out, languages={"source": ["en"], "target": list(languages)}, force=True)
    return out


def _write_spm(path: Path, words) -> list[str]:
    import sentencepiece as spm

    text = io.StringIO("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=text,
        model_writer=buf,
        vocab_size=len(set(words)) + 3,
        model_type="word",
        character_coverage=1.0,
        unk_id=1,
        bos_id=-1,
        eos_id=0,
        pad_id=2,
        unk_piece="<unk>",
        eos_piece="</s>",
        pad_piece="<pad>",
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    proc = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return [proc.id_to_piece(i) for i in range(proc.get_piece_size())]


def tiny_clip(out: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    cfg_path = out / "tiny-clip.json"
    cfg_path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "open_clip_model.safetensors"),
    )
    cfg_path.unlink()
    return out


# --- bad inputs --------------------------------------------------------------------------
def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (1-bit), compressed to a few KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = (b"\x00" + b"\x00" * ((width + 7) // 8)) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def bad_corpus(out: Path, good: list[Path]) -> dict[str, dict]:
    """Write the bad-input corpus under `out`; returns {name: expectation} and writes
    `manifest.jsonl` (with the good images too, their captions and a few bad captions)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), "RGB")
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG", quality=90)
    files: dict[str, bytes] = {
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is a text file, not an image\n",
        "bomb.png": _bomb_png(12000, 12000),
    }
    cmyk = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "CMYK").save(
        cmyk, format="JPEG"
    )
    files["cmyk.jpg"] = cmyk.getvalue()
    grad = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    files["gray16.png"] = _png_bytes(Image.fromarray(grad))
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (10, 10, 30, 30))
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    files["palette_transparent.png"] = buf.getvalue()
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated.gif"] = buf.getvalue()
    for name, data in files.items():
        (out / name).write_bytes(data)
    expect = {
        "truncated.jpg": {"dead": "decode/truncated_image"},
        "zero.jpg": {"dead": "decode/empty_file"},
        "text.jpg": {"dead": "decode/not_an_image"},
        "bomb.png": {"dead": "decode/decompression_bomb"},
        "cmyk.jpg": {"row": True},
        "gray16.png": {"row": True},
        "palette_transparent.png": {"row": True},
        "animated.gif": {"row": True},
        "missing.png": {"dead": "read/missing_file"},
    }
    # Manifest: bytes, because one caption is deliberately not valid UTF-8.
    lines: list[bytes] = []
    for name in files:
        lines.append(json.dumps({"image_path": name, "caption": "a small red square"}).encode())
    lines.append(json.dumps({"image_path": "missing.png", "caption": "gone"}).encode())
    good_names = []
    for i, src in enumerate(good):
        name = f"good_{i:02d}{src.suffix}"
        (out / name).write_bytes(src.read_bytes())
        good_names.append(name)
    # invalid UTF-8 caption, empty caption, 10,000-character caption, the same image twice
    lines.append(b'{"image_path": "%s", "caption": "bad \xff\xfe utf8"}' % good_names[0].encode())
    lines.append(json.dumps({"image_path": good_names[1], "caption": "   "}).encode())
    lines.append(json.dumps({"image_path": good_names[2], "caption": "x" * 10_000}).encode())
    lines.append(json.dumps({"image_path": good_names[3], "caption": "a blue circle"}).encode())
    lines.append(json.dumps({"image_path": good_names[3], "caption": "the same image"}).encode())
    for name in good_names[4:]:
        lines.append(json.dumps({"image_path": name, "caption": "a green star"}).encode())
    lines.append(b"{not json")
    (out / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expect.update(
        {
            "caption_drops": {"source.invalid_utf8": 1, "source.empty": 1, "source.too_long": 1},
            "duplicate": good_names[3],
            "good": good_names,
        }
    )
    return expect


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "bad-corpus")
    tmp_good = target / "_good_src"
    tmp_good.mkdir(parents=True, exist_ok=True)
    good = []
    for i in range(6):
        p = tmp_good / f"{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(p)
        good.append(p)
    print(json.dumps(bad_corpus(target, good), indent=1))
    os.sys.exit(0)


def expand_input(cfg) -> tuple[list[dict], list[dict]]:
    """Run the source's ExpandInput directly (a DoFn is a plain object) for precise assertions:
    (input records, dead-letter rows)."""
    import apache_beam as beam

    from babelcap.pipelines.sources import ExpandInput

    recs, dead = [], []
    for item in ExpandInput(cfg).process(cfg.input):
        if isinstance(item, beam.pvalue.TaggedOutput):
            dead.append(item.value["row"])
        else:
            recs.append(item)
    return recs, dead

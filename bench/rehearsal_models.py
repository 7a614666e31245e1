"""Full-size models with random weights, built locally (nothing is downloaded), for the rehearsal.

The architectures and vocabulary sizes are the published ones, so compute and memory are real;
the weights are random and the tokenizers are generated, so the text they produce is nonsense:

- `captioner`: BLIP-base (`BlipConfig()` defaults: ViT-B/16 at 384 px, BERT-base text decoder
  with a 30,524-entry WordPiece vocabulary, [DEC] = 30522 as in Salesforce/blip-*-base),
  `BlipProcessor` with a 384 px `BlipImageProcessor`.
- `nllb-hf` -> `translator`: NLLB-200-distilled-600M's shape (M2M100, d_model 1024, 12 + 12
  layers, FFN 4096, 16 heads, 256,206 embeddings) with an `NllbTokenizer` of 256,204 entries
  (a BPE vocabulary over a generated lexicon, padded with unreachable pieces, + the 202
  language codes + <mask>, as the real one), converted to CTranslate2 int8 by babelcap's own
  converter (`babelcap.translators.convert_model`).
- `clip`: open_clip `xlm-roberta-base-ViT-B-32` (ViT-B/32 224 px + xlm-roberta-base's shape, a
  250,002-entry Unigram tokenizer) as an open_clip model folder (`open_clip_config.json` with
  `hf_model_name: "text"`, the text tower's config and tokenizer in `text/`, the weights in
  `open_clip_model.safetensors`), so babelcap's model layer loads it like any local CLIP.

    python bench/rehearsal_models.py [--root .cache/rehearsal/models] [--only captioner,clip]

Each model is built once (a `.complete` marker), in its own process when called from the
rehearsal, so the builder's memory is returned before the pipeline runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / ".cache" / "rehearsal" / "models"
MODELS = ("captioner", "translator", "clip")
DONE = ".complete"

BLIP_VOCAB = 30524  # bert-base-uncased (30522) + [DEC] + [ENC]
NLLB_EMBEDDINGS = 256206  # facebook/nllb-200-distilled-600M config.vocab_size
NLLB_TOKENIZER = 256204  # len(its tokenizer): pieces + 202 language codes + <mask>
XLMR_VOCAB = 250002

# Words the prompts and filters use, then a deterministic pseudo-English lexicon.
BASE_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "to",
    "at",
    "by",
    "photo",
    "picture",
    "image",
    "photograph",
    "illustration",
    "rendering",
    "snapshot",
    "close-up",
    "close",
    "up",
    "drawing",
    "painting",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "small",
    "big",
    "large",
    "man",
    "woman",
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "street",
    "people",
    "table",
    "room",
    "city",
]


def lexicon(n: int = 20000, seed: int = 0) -> list[str]:
    """`n` distinct lowercase pseudo-words (BASE_WORDS first), the same on every machine."""
    syllables = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
    words = list(dict.fromkeys(BASE_WORDS))
    seen = set(words)
    pool = ["".join(p) for k in (1, 2) for p in itertools.product(syllables, repeat=k)]
    pool += ["".join(p) for p in itertools.islice(itertools.product(syllables, repeat=3), n)]
    random.Random(seed).shuffle(pool)
    for w in pool:
        if len(words) >= n:
            break
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _done(path: Path) -> bool:
    return (path / DONE).exists()


def _mark(path: Path) -> Path:
    (path / DONE).write_text("ok\n")
    return path


def build_captioner(out: Path) -> Path:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = BlipConfig()  # BLIP-base: vision 384 px / patch 16 / 768 x 12; text vocab 30524
    assert cfg.vision_config.image_size == 384 and cfg.text_config.vocab_size == BLIP_VOCAB
    # bert-base-uncased's layout: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103,
    # BLIP's [DEC]=30522 (text_config.bos_token_id) and [ENC]=30523.
    vocab = [f"[unused{i}]" for i in range(BLIP_VOCAB)]
    for i, tok in ((0, "[PAD]"), (100, "[UNK]"), (101, "[CLS]"), (102, "[SEP]"), (103, "[MASK]")):
        vocab[i] = tok
    vocab[cfg.text_config.bos_token_id], vocab[BLIP_VOCAB - 1] = "[DEC]", "[ENC]"
    fill = dict.fromkeys(
        [*list("abcdefghijklmnopqrstuvwxyz-"), *[f"##{c}" for c in "aeiou"], *lexicon(22000)]
    )
    free = [i for i in range(104, BLIP_VOCAB - 2)]
    for i, tok in zip(free, fill, strict=False):
        vocab[i] = tok
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]")
    assert len(tok) == BLIP_VOCAB, len(tok)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    model.save_pretrained(out)
    BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), tok).save_pretrained(out)
    return _mark(out)


def _nllb_tokenizer(out: Path):
    """An NllbTokenizer of NLLB's size: BPE over the lexicon (prefix-chain merges, so words are
    one piece each), padded with unreachable pieces to NLLB's count."""
    from transformers import NllbTokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    vocab: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    merges: list[tuple[str, str]] = []
    seen_merges = set()
    for c in "▁abcdefghijklmnopqrstuvwxyz-0123456789.,'":
        vocab.setdefault(c, len(vocab))
    for word in lexicon(40000, seed=1):
        piece = "▁"
        for ch in word:
            merged = piece + ch
            if (piece, ch) not in seen_merges:
                seen_merges.add((piece, ch))
                merges.append((piece, ch))
            vocab.setdefault(merged, len(vocab))
            piece = merged
    size = NLLB_TOKENIZER - len(FAIRSEQ_LANGUAGE_CODES) - 1  # room for codes + <mask>
    i = 0
    while len(vocab) < size:
        vocab.setdefault(f"▁⟨{i}⟩", len(vocab))
        i += 1
    tok = NllbTokenizer(vocab=vocab, merges=merges, src_lang="eng_Latn", tgt_lang="por_Latn")
    assert len(tok) == NLLB_TOKENIZER, len(tok)
    tok.save_pretrained(out)
    return tok


def build_translator(out: Path, hf_dir: Path | None = None) -> Path:
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    from babelcap.translators import convert_model

    if _done(out):
        return out
    hf = hf_dir or out.parent / "nllb-hf"
    if not _done(hf):
        hf.mkdir(parents=True, exist_ok=True)
        _nllb_tokenizer(hf)
        cfg = M2M100Config(  # facebook/nllb-200-distilled-600M's config.json
            vocab_size=NLLB_EMBEDDINGS,
            d_model=1024,
            encoder_layers=12,
            decoder_layers=12,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=4096,
            decoder_ffn_dim=4096,
            max_position_embeddings=1024,
            scale_embedding=True,
            activation_function="relu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            tokenizer_class="NllbTokenizer",
        )
        torch.manual_seed(0)
        model = M2M100ForConditionalGeneration(cfg)
        model.save_pretrained(hf)
        del model
        _mark(hf)
    convert_model(hf, out, quantization="int8", force=True)
    return _mark(out)


def _xlmr_text_tower(out: Path) -> None:
    from transformers import XLMRobertaConfig, XLMRobertaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    # xlm-roberta-base's config.json (XLMRobertaConfig's bare defaults are BERT-sized).
    XLMRobertaConfig(
        vocab_size=XLMR_VOCAB,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    ).save_pretrained(out)
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -12.0) for c in "▁abcdefghijklmnopqrstuvwxyz-0123456789.,'"]
    pieces += [(f"▁{w}", -8.0) for w in lexicon(60000, seed=2)]
    i = 0
    while len(pieces) < XLMR_VOCAB - 1:
        pieces.append((f"▁⟨{i}⟩", -20.0))
        i += 1
    pieces.append(("<mask>", 0.0))
    tok = XLMRobertaTokenizer(vocab=pieces)
    assert len(tok) == XLMR_VOCAB, len(tok)
    tok.save_pretrained(out)


def build_clip(out: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from babelcap.models.clip import OPEN_CLIP_CONFIG, load_clip

    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    _xlmr_text_tower(out / "text")
    model_cfg = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")
    model_cfg["text_cfg"]["hf_model_name"] = "text"  # relative: resolved against the folder
    model_cfg["text_cfg"]["hf_tokenizer_name"] = "text"
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}, indent=2))
    torch.manual_seed(0)
    bundle = load_clip(str(out), pretrained_text=False, with_tokenizer=False)
    state = {k: v.contiguous() for k, v in bundle.model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return _mark(out)


BUILDERS = {"captioner": build_captioner, "translator": build_translator, "clip": build_clip}


def build(root: Path = DEFAULT_ROOT, only: list[str] | None = None) -> dict[str, str]:
    """Build (once) and return {model: folder}."""
    out = {}
    for name in only or MODELS:
        out[name] = str(BUILDERS[name](root / name))
    return out


def model_dirs(root: Path = DEFAULT_ROOT) -> dict[str, str]:
    return {name: str(root / name) for name in MODELS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--only", default=None, help="comma-separated: " + ",".join(MODELS))
    args = parser.parse_args()
    from babelcap.core.lists import parse_list

    print(json.dumps(build(Path(args.root), parse_list(args.only) or None), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

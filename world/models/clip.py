"""The world's base CLIP: a small open_clip model with a Hugging Face XLM-R text tower, trained on
English captions only with babelcap's own trainer (full-training mode).

Like a real multilingual CLIP before language adaptation, its tokenizer covers every world
language (a sentencepiece vocabulary trained on all of them, in XLM-R's layout) but its
weights only ever saw English: good in English, poor elsewhere.

Written into the model folder (`DIR/models/clip-base/`):

    text/                          HF XLMRobertaConfig + tokenizer (+ the initial weights)
    world-clip.json                open_clip model config ("hf_model_name": "text", relative)
    open_clip_config.json          open_clip local-dir config (the same relative "text")
    open_clip_model.safetensors    the trained weights
    eval.json                      per-language retrieval on the world's test split

The folder moves as a whole (no path of the machine that built it). Load with
`babelcap.models.clip.load_clip(DIR/models/clip-base)` (resolves "text" against the folder) or
plain open_clip from inside the folder, as for any babelcap export
(`training/export.py`): `open_clip.create_model_and_transforms("local-dir:.")`;
`open_clip.get_tokenizer("local-dir:DIR/models/clip-base")` works from anywhere.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from babelcap.world.models import ModelSpec, register

log = logging.getLogger(__name__)

MODEL_CONFIG = "world-clip.json"

DEFAULT_CONFIG: dict[str, Any] = {
    "vocab_size": 1000,
    "text_width": 128,
    "text_layers": 2,
    "text_heads": 4,
    "context_length": 24,
    "embed_dim": 128,
    "vision_width": 128,
    "vision_layers": 3,
    "vision_patch": 16,
    "vision_head_width": 32,
    "steps": 200,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup": 40,
    "seed": 0,
}


def train_tokenizer(world_dir: Path, out_dir: Path, vocab_size: int) -> Any:
    """An XLM-R tokenizer whose sentencepiece vocabulary covers all world languages."""
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    from babelcap.world.grammar import LANGUAGES
    from babelcap.world.load import load_gold

    texts = [
        c
        for lang in LANGUAGES
        for row in load_gold(world_dir, lang, "train")
        for c in row["captions"]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            hard_vocab_limit=False,
            normalization_rule_name="nmt_nfkc",
            minloglevel=2,
            num_threads=1,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        # XLM-R's layout: <s> <pad> </s> <unk> first, sentencepiece pieces after, <mask> last.
        # Equal piece scores make the unigram (Viterbi) segmentation use the fewest pieces, so
        # the learnt BPE pieces (mostly whole words here) are used whole.
        vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        vocab += [
            (sp.id_to_piece(i), -1.0)
            for i in range(sp.get_piece_size())
            if not sp.is_control(i) and not sp.is_unknown(i)
        ]
        vocab.append(("<mask>", 0.0))
    tokenizer = XLMRobertaTokenizer(vocab=vocab)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def write_text_tower(out_dir: Path, vocab_size: int, config: dict[str, Any]) -> None:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    hf_config = XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=config["text_width"],
        num_hidden_layers=config["text_layers"],
        num_attention_heads=config["text_heads"],
        intermediate_size=config["text_width"] * 4,
        max_position_embeddings=config["context_length"] + 2,  # RoBERTa offsets positions by 2
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(config["seed"])
    XLMRobertaModel(hf_config, add_pooling_layer=False).save_pretrained(out_dir)


def model_config(config: dict[str, Any], text_dir: str) -> dict[str, Any]:
    return {
        "embed_dim": config["embed_dim"],
        "vision_cfg": {
            "image_size": 64,
            "layers": config["vision_layers"],
            "width": config["vision_width"],
            "head_width": config["vision_head_width"],
            "patch_size": config["vision_patch"],
        },
        "text_cfg": {
            "hf_model_name": text_dir,
            "hf_tokenizer_name": text_dir,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": config["context_length"],
        },
    }


def build(world_dir: Path, out_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    from babelcap.models.clip import load_clip
    from babelcap.training.config import TrainConfig
    from babelcap.training.contamination import INDEX_FILE
    from babelcap.training.evaluate import evaluate
    from babelcap.training.export import export_open_clip
    from babelcap.training.trainer import train
    from babelcap.world.eval_data import load as world_eval_data
    from babelcap.world.grammar import LANGUAGES
    from babelcap.world.shards import write_world_shards

    config = {**DEFAULT_CONFIG, **config}
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    text_dir = out_dir / "text"
    tokenizer = train_tokenizer(world_dir, text_dir, config["vocab_size"])
    write_text_tower(text_dir, len(tokenizer), config)
    (out_dir / MODEL_CONFIG).write_text(json.dumps(model_config(config, "text"), indent=2))

    with tempfile.TemporaryDirectory(prefix="babelcap-clip-base-") as tmp:
        # Gold captions only: the world's alt-text is noisy on purpose (see world.build).
        shards = write_world_shards(world_dir, Path(tmp) / "shards", ["en"], split="train")
        cfg = TrainConfig.from_dict(
            {
                "model": {"name": str(out_dir / MODEL_CONFIG)},
                "data": {
                    "train": [str(p) for p in shards],
                    "languages": ["en"],
                    "origins": ["gold"],
                    "batch_size": config["batch_size"],
                    "shuffle_buffer": 1024,
                    "embeddings": "never",
                },
                "method": {"image_tower": "trainable", "text_tower": "full"},
                "optim": {
                    "lr": config["lr"],
                    "warmup_steps": config["warmup"],
                    "max_steps": config["steps"],
                    "weight_decay": 0.1,
                },
                "run": {
                    "output_dir": str(Path(tmp) / "run"),
                    "seed": config["seed"],
                    "grad_checkpointing": False,
                    "log_every": 25,
                    "progress": False,
                    "plot": False,
                    "export": False,
                    "resume": False,
                },
            }
        )
        bundle = load_clip(str(out_dir / MODEL_CONFIG))
        summary = train(cfg, bundle=bundle)
        shutil.copy(Path(tmp) / "run" / "metrics.jsonl", out_dir / "train_metrics.jsonl")
        # What the base CLIP trained on travels with it: evaluations check against it.
        shutil.copy(Path(tmp) / "run" / INDEX_FILE, out_dir / INDEX_FILE)
    export_open_clip(bundle, out_dir, name="world-clip")  # text tower paths: "text", relative

    reloaded = load_clip(str(out_dir))
    results = evaluate(reloaded, world_eval_data(world_dir, LANGUAGES, "test"), name="clip-base")
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    mean_recall = {lang: round(m["mean_recall"], 2) for lang, m in results["languages"].items()}
    log.info("clip-base mean recall on test: %s", mean_recall)
    return {
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "parameters": summary["parameters"]["total"],
        "test_mean_recall": mean_recall,
    }


register(ModelSpec("clip-base", "babelcap.world.models.clip:build", DEFAULT_CONFIG))

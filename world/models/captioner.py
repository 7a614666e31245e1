"""The world's image captioner: a tiny BLIP trained on the world's English captions.

`build` trains `BlipForConditionalGeneration` (the architecture of
`Salesforce/blip-image-captioning-base`, at toy size) with a `BlipProcessor` (BLIP image
processor + a BERT WordPiece tokenizer over the world's English vocabulary) and saves both with
`save_pretrained`, so the same loading code that serves the real BLIP serves this one:
`AutoProcessor.from_pretrained(dir)` + `AutoModelForImageTextToText.from_pretrained(dir)`.

Training sometimes prepends a CAPIVARA-style prompt prefix ("a photo of", ...) to the caption
(the prefix itself is not a target), so conditional captioning with `text=prompt` continues the
prompt with a world caption, as BLIP does.
"""

from __future__ import annotations

import json
import logging
import math
import random
import string
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from babelcap.world.models import ModelSpec, register

log = logging.getLogger(__name__)

# Prompt prefixes used in training (CAPIVARA-style); any other ASCII prompt still tokenises
# (single characters and ##-pieces are in the vocabulary) but was never seen in training.
PROMPTS: tuple[str, ...] = (
    "a photo of",
    "a picture of",
    "an image of",
    "a photography of",
    "a drawing of",
    "a rendering of",
    "an illustration of",
    "a close-up of",
    "this is",
    "there is",
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DECODER_BOS = "[DEC]"  # BLIP's decoder start token (replaces [CLS] at position 0)

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "patch_size": 16,  # 16 patches of 64 px: colours learned at ~60% of patch 8's time
    "vision_hidden": 128,
    "vision_layers": 3,
    "text_hidden": 128,
    "text_layers": 2,
    "heads": 4,
    "max_tokens": 40,  # caption length limit (prompt included), in tokens
    "fresh_scenes": 3000,  # freshly sampled scenes added to the train split
    "prompt_rate": 0.3,  # share of training captions given a prompt prefix
    "steps": 900,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 60,
    "weight_decay": 0.01,
    "threads": None,  # torch threads; None: the process's (its share of the cores when parallel)
    "eval_images": 200,  # test-split images captioned for the summary metrics
    "eval_prompt": "a photo of",
}


# ---------------------------------------------------------------- data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _image_size(world_dir: Path) -> int:
    info = json.loads((world_dir / "world.json").read_text())
    return int(info.get("image_size", 64))


def _world_examples(world_dir: Path, split: str) -> list[tuple[Path, list[str]]]:
    """(image path, its K English gold captions) for one split of a built world."""
    rows = _read_jsonl(world_dir / "gold" / "en.jsonl")
    return [(world_dir / r["image_path"], list(r["captions"])) for r in rows if r["split"] == split]


def _fresh_examples(n: int, seed: int, size: int) -> list[tuple[Any, list[str]]]:
    """`n` newly sampled scenes (rendered image, all English paraphrases): more training data."""
    from babelcap.world.grammar import NUM_VARIANTS, describe
    from babelcap.world.scene import render, sample_scene

    rng = random.Random(f"captioner-fresh-{seed}")
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        captions = [describe(scene, "en", v) for v in range(NUM_VARIANTS)]
        out.append((render(scene, size), captions))
    return out


def build_vocab(words: Sequence[str]) -> list[str]:
    """WordPiece vocabulary: specials, [DEC], the world's words, and character pieces."""
    chars = string.ascii_lowercase + string.digits
    pieces = set(words) | set(chars) | set(string.punctuation)
    vocab = [*SPECIAL_TOKENS, DECODER_BOS]
    vocab += sorted(w for w in pieces if w not in vocab)
    vocab += ["##" + c for c in chars]
    return vocab


def _english_words(captions: Sequence[str]) -> list[str]:
    """The world's English vocabulary (the grammar's words), plus caption and prompt words."""
    from transformers.models.bert.tokenization_bert import BertTokenizer

    from babelcap.world.grammar import vocabulary_words

    words = {w.lower() for w in vocabulary_words("en")}
    # Split exactly as the tokenizer will, so every caption word becomes one whole token.
    pre = BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)})._tokenizer
    for caption in captions:
        normalized = pre.normalizer.normalize_str(caption)
        words |= {w for w, _ in pre.pre_tokenizer.pre_tokenize_str(normalized)}
    for prompt in PROMPTS:
        words |= set(prompt.split())
    return sorted(words)


# ---------------------------------------------------------------- model


def make_processor(vocab: Sequence[str], image_size: int, max_tokens: int):
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    tokenizer = BertTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=max_tokens,
        extra_special_tokens=[DECODER_BOS],
    )
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor, tokenizer)


def make_model(config: dict[str, Any], vocab: Sequence[str], image_size: int):
    """A fresh (randomly initialised) tiny BLIP captioner for this vocabulary."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    sep = vocab.index("[SEP]")
    heads = config["heads"]
    blip_config = BlipConfig(
        vision_config={
            "hidden_size": config["vision_hidden"],
            "intermediate_size": 4 * config["vision_hidden"],
            "num_hidden_layers": config["vision_layers"],
            "num_attention_heads": heads,
            "image_size": image_size,
            "patch_size": config["patch_size"],
            # BLIP's default (1e-10) suits fine-tuning a pre-trained tower only: a tower trained
            # from scratch must start from a normal random init, or it barely learns shapes.
            "initializer_range": 0.02,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": config["text_hidden"],
            "intermediate_size": 4 * config["text_hidden"],
            "num_hidden_layers": config["text_layers"],
            "num_attention_heads": heads,
            "encoder_hidden_size": config["vision_hidden"],
            "max_position_embeddings": config["max_tokens"] + 8,
            "bos_token_id": vocab.index(DECODER_BOS),
            "eos_token_id": sep,
            "sep_token_id": sep,
            "pad_token_id": vocab.index("[PAD]"),
        },
    )
    model = BlipForConditionalGeneration(blip_config)
    # Generation defaults that fit the world's captions (a caller may still override them).
    model.generation_config.max_length = config["max_tokens"]
    return model


def _prompt_for(caption: str, rng: random.Random, rate: float) -> str:
    """A random prompt prefix for this caption, or "" (none; or it already starts with one)."""
    if rng.random() >= rate or any(caption.lower().startswith(p + " ") for p in PROMPTS):
        return ""
    return rng.choice(PROMPTS)


def _batch(processor, pixels, captions: list[str], prompts: list[str], bos_id: int):
    """Token ids and labels as BLIP trains them: [DEC] caption [SEP]; prompt tokens unscored."""

    texts = [f"{p} {c}" if p else c for p, c in zip(prompts, captions, strict=True)]
    enc = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    input_ids = enc["input_ids"].clone()
    input_ids[:, 0] = bos_id
    labels = input_ids.masked_fill(enc["attention_mask"] == 0, -100)
    for i, prompt in enumerate(prompts):
        if prompt:  # the prompt is given, not predicted: leave it out of the loss
            n = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            labels[i, 1 : 1 + n] = -100
    return {
        "pixel_values": pixels,
        "input_ids": input_ids,
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


def train(
    model,
    processor,
    images: Sequence[Any],
    captions: Sequence[Sequence[str]],
    config: dict[str, Any],
    callback: Callable[[int, Any], None] | None = None,
) -> list[float]:
    """Train the captioner on (image, K paraphrases) examples; returns the loss curve.

    `callback(step, model)`, when given, runs every `config["log_every"]` steps (evaluation).
    """
    import torch
    from tqdm import tqdm

    torch.manual_seed(config["seed"])
    rng = random.Random(config["seed"])
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    bos_id = model.config.text_config.bos_token_id
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    steps, warmup = config["steps"], config["warmup_steps"]

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    for step in tqdm(range(steps), desc="captioner", mininterval=10, disable=None):
        if len(order) < config["batch_size"]:  # deterministic epochs of shuffled examples
            epoch = list(range(len(images)))
            rng.shuffle(epoch)
            order += epoch
        idx, order = order[: config["batch_size"]], order[config["batch_size"] :]
        texts = [rng.choice(captions[i]) for i in idx]
        prompts = [_prompt_for(t, rng, config["prompt_rate"]) for t in texts]
        batch = _batch(processor, pixels[idx], texts, prompts, bos_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if callback and (step + 1) % config.get("log_every", 100) == 0:
            model.eval()
            callback(step + 1, model)
            model.train()
    model.eval()
    return losses


# ---------------------------------------------------------------- generation


def generate_captions(
    model,
    processor,
    images: Sequence[Any],
    prompts: Sequence[str] | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[list[str]]:
    """One caption per prompt (or one unprompted caption) for each image.

    Images are batched per prompt, so every row of a batch has the same prompt length (BLIP's
    `generate` drops the prompt's trailing [SEP] by position).
    """
    import torch

    images = list(images)
    out: list[list[str]] = [[] for _ in images]
    for prompt in list(prompts) if prompts else [None]:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            text = [prompt] * len(chunk) if prompt else None
            inputs = processor(images=chunk, text=text, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens)
            for i, caption in enumerate(processor.batch_decode(ids, skip_special_tokens=True)):
                out[start + i].append(caption.strip())
    return out


def caption_images(
    model_dir: str | Path,
    images: Sequence[Any],
    prompts: Sequence[str] | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 32,
) -> list[list[str]]:
    """Caption PIL images with any Hugging Face image-to-text model saved in `model_dir`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    return generate_captions(model, processor, images, prompts, num_beams, max_new_tokens)


# ---------------------------------------------------------------- evaluation


_EN_COUNTS = {"two": 2, "three": 3}  # the English grammar's number words ("a"/"an" = 1)


def parse_objects(caption: str) -> list[tuple[str | None, str]]:
    """(colour, shape) of each object a caption names, read with the grammar's English words.

    English noun groups are "<number> <size> <colour> <shape>": a colour (and a count) binds to
    the next shape word; "two small red circles" names two red circles.
    """
    from babelcap.world.grammar import tokens, word_forms

    forms = word_forms("en")
    shape_of = {w: k for k, ws in forms["shape"].items() for w in ws}
    colour_of = {w: k for k, ws in forms["colour"].items() for w in ws}
    found: list[tuple[str | None, str]] = []
    colour, count = None, 1
    for word in tokens(caption.lower()):
        if word in _EN_COUNTS:
            count = _EN_COUNTS[word]
        elif word in colour_of:
            colour = colour_of[word]
        elif word in shape_of:
            found += [(colour, shape_of[word])] * count
            colour, count = None, 1
    return found


def gold_objects(scene: dict[str, Any]) -> list[tuple[str, str]]:
    return [(o["colour"], o["shape"]) for o in scene["objects"]]


def object_scores(captions: Sequence[str], scenes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How often captions name each object's shape and colour, and the exact object set."""
    shape_hits = colour_hits = pair_hits = total = exact = 0
    for caption, scene in zip(captions, scenes, strict=True):
        gold = gold_objects(scene)
        found = parse_objects(caption)
        total += len(gold)
        shape_hits += sum((Counter(s for _, s in gold) & Counter(s for _, s in found)).values())
        colour_hits += sum((Counter(c for c, _ in gold) & Counter(c for c, _ in found)).values())
        pair_hits += sum((Counter(gold) & Counter(found)).values())
        exact += Counter(gold) == Counter(found)
    n = max(1, total)
    return {
        "shape_accuracy": shape_hits / n,
        "colour_accuracy": colour_hits / n,
        "object_accuracy": pair_hits / n,
        "exact_set_match": exact / max(1, len(captions)),
    }


def evaluate(model, processor, world_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Metrics on the world's test split, unprompted and with the evaluation prompt."""
    rows = [r for r in _read_jsonl(world_dir / "scenes.jsonl") if r["split"] == "test"]
    rows = rows[: config["eval_images"]]
    images = [_load_rgb(world_dir / r["image_path"]) for r in rows]
    scenes = [r["scene"] for r in rows]
    prompt = config["eval_prompt"]
    both = generate_captions(model, processor, images, [prompt] if prompt else None)
    plain = generate_captions(model, processor, images)
    result: dict[str, Any] = {"test_images": len(rows)}
    result["unprompted"] = object_scores([c[0] for c in plain], scenes)
    if prompt:
        prompted = [c[0] for c in both]
        result["prompted"] = object_scores(prompted, scenes)
        result["prompted"]["starts_with_prompt"] = sum(
            c.startswith(prompt) for c in prompted
        ) / max(1, len(prompted))
    result["examples"] = [c[0] for c in plain[:3]]
    return result


# ---------------------------------------------------------------- build


def build(world_dir: Path, out_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Train the world's captioner into `out_dir` (model + processor); return test metrics."""
    import torch

    config = {**DEFAULT_CONFIG, **config}
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"] or threads)
    try:
        return _build(world_dir, out_dir, config)
    finally:
        torch.set_num_threads(threads)


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _build(world_dir: Path, out_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    size = _image_size(world_dir)
    examples: list[tuple[Any, list[str]]] = [
        (_load_rgb(p), caps) for p, caps in _world_examples(world_dir, "train")
    ]
    examples += _fresh_examples(config["fresh_scenes"], config["seed"], size)
    images = [im for im, _ in examples]
    captions = [caps for _, caps in examples]

    vocab = build_vocab(_english_words([c for caps in captions for c in caps]))
    processor = make_processor(vocab, size, config["max_tokens"])
    torch.manual_seed(config["seed"])
    model = make_model(config, vocab, size)
    losses = train(model, processor, images, captions, config)

    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    summary = {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(vocab),
        "train_examples": len(examples),
        "loss_first": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
        "loss_last": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
    }
    summary.update(evaluate(model, processor, world_dir, config))
    log.info("captioner: %s", summary)
    return summary


register(ModelSpec("captioner", "babelcap.world.models.captioner:build", DEFAULT_CONFIG))

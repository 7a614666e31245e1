"""A new language's vocabulary: sentencepiece pieces trained on its captions, added to the
tokenizer's unigram model, and which token ids the language uses."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def train_vocabulary(texts: Sequence[str], vocab_size: int) -> list[tuple[str, float]]:
    """A sentencepiece unigram vocabulary of `texts`: [(piece, log-prob score)] (no specials)."""
    import sentencepiece as spm

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no captions to train a vocabulary on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
        num_threads=1,  # 1 thread: deterministic
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return [
        (sp.id_to_piece(i), sp.get_score(i))
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
    ]


def extend_tokenizer(
    tokenizer: Any, pieces: Iterable[tuple[str, float]], out_dir: str | Path
) -> tuple[Any, list[int]]:
    """Add the pieces the tokenizer lacks to its unigram model; save to `out_dir` and reload.

    The pieces join the sentencepiece (unigram) vocabulary with their scores (raised where needed
    to beat the old segmentation of the same text), so the tokenizer's own segmentation picks
    them up; returns (reloaded tokenizer, ids of the added pieces).
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("extending the vocabulary needs a fast (tokenizers) HF tokenizer")
    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") != "Unigram":
        raise ValueError(
            f"extending the vocabulary needs a sentencepiece unigram tokenizer "
            f"(XLM-R style), got a {model.get('type')} model"
        )
    size = len(model["vocab"])
    if any(t["id"] >= size for t in data.get("added_tokens", [])):
        raise ValueError(
            "the tokenizer has added tokens beyond its unigram vocabulary; "
            "cannot append pieces without moving their ids"
        )
    known = {piece for piece, _ in model["vocab"]}
    scores = [float(score) for _, score in model["vocab"]]
    new = []
    for piece, score in pieces:
        if piece not in known:
            known.add(piece)
            # The language's own score, but at least enough to beat the old segmentation of the
            # same text: otherwise the unigram Viterbi would keep splitting it the old way.
            old = sum(scores[t.id] for t in backend.model.tokenize(piece))
            new.append([piece, max(float(score), old + 1.0)])
    model["vocab"].extend(new)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    tokenizer.save_pretrained(str(out))
    Tokenizer.from_str(json.dumps(data)).save(str(out / "tokenizer.json"))
    # Files of a slow (sentencepiece) tokenizer would disagree with tokenizer.json: drop them.
    for stale in ("sentencepiece.bpe.model", "spiece.model"):
        (out / stale).unlink(missing_ok=True)
    grown = AutoTokenizer.from_pretrained(str(out))
    return grown, list(range(size, size + len(new)))


def token_usage(tokenizer: Any, texts: Iterable[str]) -> set[int]:
    """Ids of the (non-special) tokens that occur when tokenizing `texts`."""
    special = set(tokenizer.all_special_ids)
    used: set[int] = set()
    texts = list(texts)
    for i in range(0, len(texts), 1024):
        for ids in tokenizer(texts[i : i + 1024], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    return used - special

"""What a CTranslate2 model directory is: its family, languages, input limit and identity,
read from the model's own files (never guessed from its name).

Sources, most authoritative first: `babelcap-translator.json` (written by `convert_model`),
the copied Hugging Face `tokenizer_config.json` (`tokenizer_class`, `source_lang`/`target_lang`),
then the files and vocabulary themselves (`source.spm` + `target.spm` is Marian, `por_Latn`
tokens are NLLB, `__pt__` tokens are M2M100).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA = "babelcap-translator.json"
FAMILIES = ("marian", "m2m100", "nllb")
DEFAULT_MAX_INPUT_LENGTH = 512

_TOKENIZER_CLASSES = {
    "mariantokenizer": "marian",
    "m2m100tokenizer": "m2m100",
    "nllbtokenizer": "nllb",
    "nllbtokenizerfast": "nllb",
}
_M2M_TOKEN = re.compile(r"^__([a-z]{2,3})__$")
_NLLB_TOKEN = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_MARIAN_TOKEN = re.compile(r"^>>([A-Za-z_]+)<<$")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    family: str
    model_id: str
    source_model: str | None
    # Language codes as recorded (None: not recorded, any code is passed to the model).
    source_languages: tuple[str, ...] | None
    target_languages: tuple[str, ...] | None
    max_input_length: int
    # Language tokens present in the target vocabulary (`__pt__`, `por_Latn`, `>>pt<<`).
    language_tokens: frozenset[str]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_vocabulary(model_dir: Path) -> list[str]:
    """The target-side vocabulary of a CTranslate2 model directory."""
    for name in ("shared_vocabulary", "target_vocabulary"):
        for ext in ("json", "txt"):
            path = model_dir / f"{name}.{ext}"
            if path.exists():
                if ext == "json":
                    return list(json.loads(path.read_text(encoding="utf-8")))
                return path.read_text(encoding="utf-8").splitlines()
    return []


def _language_tokens(family: str, vocab: list[str]) -> frozenset[str]:
    pattern = {"marian": _MARIAN_TOKEN, "m2m100": _M2M_TOKEN, "nllb": _NLLB_TOKEN}[family]
    return frozenset(t for t in vocab if pattern.match(t))


def detect_family(model_dir: Path, vocab: list[str] | None = None) -> str:
    meta = _read_json(model_dir / METADATA) or {}
    if meta.get("family") in FAMILIES:
        return meta["family"]
    tok_cfg = _read_json(model_dir / "tokenizer_config.json") or {}
    family = _TOKENIZER_CLASSES.get(str(tok_cfg.get("tokenizer_class", "")).lower())
    if family:
        return family
    if (model_dir / "source.spm").exists() and (model_dir / "target.spm").exists():
        return "marian"
    vocab = read_vocabulary(model_dir) if vocab is None else vocab
    if any(_NLLB_TOKEN.match(t) for t in vocab):
        return "nllb"
    if any(_M2M_TOKEN.match(t) for t in vocab):
        return "m2m100"
    raise ValueError(
        f"cannot tell the model family of {model_dir}: no {METADATA}, no known tokenizer_class "
        f"in tokenizer_config.json, no source.spm/target.spm and no language tokens; "
        f"supported families: {', '.join(FAMILIES)} (convert with `babelcap convert-translator`)"
    )


def fallback_model_id(model_dir: Path) -> str:
    """Identity of a model without metadata: its weights file's name, size and mtime."""
    weights = model_dir / "model.bin"
    stat = weights.stat() if weights.exists() else None
    key = f"{model_dir.resolve()}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_model_info(model_dir: str | Path) -> ModelInfo:
    model_dir = Path(model_dir)
    if not (model_dir / "model.bin").exists():
        raise FileNotFoundError(
            f"{model_dir} is not a CTranslate2 model directory (no model.bin); convert a "
            "Hugging Face model with `babelcap convert-translator MODEL --out DIR`"
        )
    meta = _read_json(model_dir / METADATA) or {}
    tok_cfg = _read_json(model_dir / "tokenizer_config.json") or {}
    vocab = read_vocabulary(model_dir)
    family = detect_family(model_dir, vocab)
    langs = meta.get("languages") or {}
    src = langs.get("source")
    tgt = langs.get("target")
    if family == "marian":
        # HF Marian tokenizers record their pair; multi-target groups ("ROMANCE") are not codes.
        src = src or ([tok_cfg["source_lang"]] if tok_cfg.get("source_lang") else None)
        tgt = tgt or ([tok_cfg["target_lang"]] if tok_cfg.get("target_lang") else None)
    return ModelInfo(
        path=model_dir,
        family=family,
        model_id=meta.get("model_id") or fallback_model_id(model_dir),
        source_model=meta.get("source_model"),
        source_languages=tuple(src) if src else None,
        target_languages=tuple(tgt) if tgt else None,
        max_input_length=int(meta.get("max_input_length") or DEFAULT_MAX_INPUT_LENGTH),
        language_tokens=_language_tokens(family, vocab),
    )

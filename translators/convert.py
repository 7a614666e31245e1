"""Convert a Hugging Face translation model (Marian, M2M100, NLLB) to CTranslate2.

Wraps `ctranslate2.converters.TransformersConverter`, copies the tokenizer files next to the
weights so the directory is self-contained, and writes `babelcap-translator.json` (source
model, family, languages, input limit, a content id for the translation memory) that the
engine reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from babelcap.translators.model_info import DEFAULT_MAX_INPUT_LENGTH, METADATA

log = logging.getLogger(__name__)

# Tokenizer files worth carrying (whichever the model has); config.json is not among them:
# the converter writes CTranslate2's own config.json.
TOKENIZER_FILES = (
    "source.spm",
    "target.spm",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
# What CTranslate2's converter writes: with TOKENIZER_FILES and METADATA, the files of a
# conversion whose METADATA predates its "files" list.
CONVERTER_FILES = (
    "model.bin",
    "config.json",
    "shared_vocabulary.json",
    "shared_vocabulary.txt",
    "source_vocabulary.json",
    "source_vocabulary.txt",
    "target_vocabulary.json",
    "target_vocabulary.txt",
    "vocabulary.json",
    "vocabulary.txt",
)
QUANTIZATIONS = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


def _family(model_type: str, tokenizer_class: str) -> str:
    if model_type == "marian":
        return "marian"
    if model_type == "m2m_100":
        return "nllb" if tokenizer_class.lower().startswith("nllb") else "m2m100"
    raise ValueError(
        f"unsupported translation model type {model_type!r}; babelcap's engine handles "
        "marian (opus-mt), m2m_100 (M2M100) and m2m_100 with an NLLB tokenizer (NLLB-200)"
    )


def _files_to_copy(model: str) -> list[str]:
    if os.path.isdir(model):
        return [f for f in TOKENIZER_FILES if (Path(model) / f).exists()]
    try:  # a hub id: ask the hub which of the files exist
        from huggingface_hub import list_repo_files

        present = set(list_repo_files(model))
    except Exception as exc:  # offline or private: the converter will say what is missing
        log.warning("cannot list files of %s (%s); copying the Marian/NLLB defaults", model, exc)
        present = {"source.spm", "target.spm", "sentencepiece.bpe.model", "tokenizer_config.json"}
    return [f for f in TOKENIZER_FILES if f in present]


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
    )


def _own_files(out: Path) -> set[str] | None:
    """The names of an earlier conversion's files in `out` (as its METADATA records them, or
    the converter's and tokenizer names for a METADATA without a list), or None when `out`
    holds no METADATA that `convert_model` wrote (then nothing in it is ours)."""
    path = out / METADATA
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
            return None
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not (
        isinstance(meta, dict)
        and meta.get("format") == 1
        and isinstance(meta.get("family"), str)
        and isinstance(meta.get("model_id"), str)
    ):
        return None
    files = meta.get("files")
    if isinstance(files, list) and all(_plain_name(f) for f in files):
        return {*files, METADATA}
    return {*CONVERTER_FILES, *TOKENIZER_FILES, METADATA}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _converter_class():
    from ctranslate2.converters import TransformersConverter

    class _Converter(TransformersConverter):
        """Keeps the loaded tokenizer and config, and repairs M2M100's vocabulary."""

        tokenizer: Any = None

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            tok = super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
            lang_ids = getattr(tok, "lang_token_to_id", None)
            if lang_ids and not set(lang_ids) <= set(tok.get_vocab()):
                # transformers 5 no longer lists M2M100's `__xx__` language tokens among the
                # added tokens, so CTranslate2 would drop them from the vocabulary (every
                # language token would map to <unk>); give get_vocab them back.
                base = tok.get_vocab

                def get_vocab() -> dict[str, int]:
                    return {**base(), **lang_ids}

                tok.get_vocab = get_vocab
            type(self).tokenizer = tok
            return tok

    return _Converter


def convert_model(
    model_name_or_path: str | Path,
    out_dir: str | Path,
    quantization: str | None = None,
    languages: Sequence[str] | dict[str, Sequence[str]] | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Convert `model_name_or_path` (hub id or local directory) into `out_dir`.

    `languages`: codes the model serves (a list for both sides, or {"source": [...],
    "target": [...]}); by default Marian's tokenizer pair, and for multilingual models their
    language tokens. Returns `out_dir`.
    """
    from transformers import AutoConfig

    model = str(model_name_or_path)
    out = Path(out_dir)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {quantization!r}; one of {', '.join(QUANTIZATIONS)}"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (pass force=True / --force)")
        if _own_files(out) is None:
            # --force replaces an earlier conversion, never a folder of the user's.
            raise FileExistsError(
                f"{out} is not empty and is not a converted translator (no {METADATA} written "
                "by convert-translator): refusing to replace it, even with --force"
            )
    hf_config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    tok_cfg_path = Path(model) / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    tokenizer_class = str(
        tok_cfg.get("tokenizer_class") or getattr(hf_config, "tokenizer_class", "") or ""
    )
    _family(hf_config.model_type, tokenizer_class)  # fail before the slow part

    converter = _converter_class()(
        model,
        copy_files=_files_to_copy(model),
        load_as_float16=False,
        trust_remote_code=trust_remote_code,
    )
    # CTranslate2's force=True deletes its target folder: convert into a fresh folder next to
    # `out`, then swap it in, so nothing but an earlier conversion is ever removed.
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        converter.convert(str(work / "model"), quantization=quantization, force=True)
        return _finish(
            work, out, model, hf_config, tokenizer_class, converter, languages, quantization
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish(
    work: Path,
    out: Path,
    model: str,
    hf_config: Any,
    tokenizer_class: str,
    converter: Any,
    languages: Sequence[str] | dict[str, Sequence[str]] | None,
    quantization: str | None,
) -> Path:
    """Write the metadata into the converted folder and swap it in for `out`."""
    import ctranslate2

    new = work / "model"
    tok = converter.tokenizer
    family = _family(hf_config.model_type, tokenizer_class or type(tok).__name__)

    if isinstance(languages, dict):
        langs = {"source": list(languages["source"]), "target": list(languages["target"])}
    elif languages is not None:
        langs = {"source": list(languages), "target": list(languages)}
    elif family == "marian" and getattr(tok, "source_lang", None):
        langs = {"source": [tok.source_lang], "target": [tok.target_lang]}
    else:
        langs = None  # multilingual: the vocabulary's language tokens say it

    import transformers

    meta = {
        "format": 1,
        "family": family,
        "source_model": model,
        "model_type": hf_config.model_type,
        "tokenizer_class": type(tok).__name__,
        "languages": langs,
        "max_input_length": int(
            getattr(hf_config, "max_position_embeddings", 0) or DEFAULT_MAX_INPUT_LENGTH
        ),
        "quantization": quantization,
        "model_id": _sha256(new / "model.bin"),
        "ctranslate2_version": ctranslate2.__version__,
        "transformers_version": transformers.__version__,
        # this conversion's own files: a later --force removes these and nothing else
        "files": sorted(p.name for p in new.iterdir() if p.name != METADATA),
    }
    (new / METADATA).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    _swap_in(work, new, out)
    log.info("converted %s (%s) into %s", model, family, out)
    return out


def _swap_in(work: Path, new: Path, out: Path) -> None:
    """Put the conversion in `new` at `out`. `out` is absent, empty, or an earlier conversion
    (checked by `convert_model`): holding only that conversion's own files, it is swapped out
    whole; holding anything else too (a user's notes), only the earlier conversion's own files
    are replaced, in place, METADATA last, and everything else stays."""
    if not out.exists():
        new.rename(out)
        return
    own = _own_files(out) or set()
    present = {e.name for e in os.scandir(out)}
    others = present - own
    if not others:
        out.rename(work / "old")
        new.rename(out)
        return
    incoming = {e.name for e in os.scandir(new)}
    clash = sorted(others & incoming)
    if clash:
        raise FileExistsError(
            f"{out} holds {', '.join(clash[:5])}, which this conversion writes but the earlier "
            "one did not record: refusing to overwrite; move them or choose another folder"
        )
    log.info("keeping %d file(s) in %s that are not the conversion's", len(others), out)
    for name in sorted(own - {METADATA}):
        path = out / name
        if path.is_symlink() or path.is_file():  # never a folder of the same name
            path.unlink()
    for name in sorted(incoming - {METADATA}):
        os.replace(new / name, out / name)
    os.replace(new / METADATA, out / METADATA)

"""Per-family tokenisation around CTranslate2: text -> source tokens (+ target prefix) and
target tokens -> text, with the language tokens each family expects.

- Marian (opus-mt): `source.spm` / `target.spm`; `pieces + </s>`; multi-target models
  (vocabulary with `>>pt<<` tokens) take the target token first in the source.
- M2M100: `__en__ pieces </s>`, target prefix `__pt__`.
- NLLB-200: `eng_Latn pieces </s>`, target prefix `por_Latn` (the non-legacy layout).

SentencePiece is used directly (no transformers import in Beam workers); a model directory
that only ships a `tokenizer.json` is read with the `tokenizers` library instead.
"""

from __future__ import annotations

from pathlib import Path

from babelcap.translators.languages import Language, resolve
from babelcap.translators.model_info import ModelInfo

EOS = "</s>"
_SPECIALS = frozenset({"<s>", "</s>", "<pad>"})
_SPM_NAMES = ("sentencepiece.bpe.model", "spm.model", "spiece.model", "sentencepiece.model")


class _SentencePiece:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def decode(self, pieces: list[str]) -> str:
        return self._sp.decode(pieces)


class _HFTokenizerJson:
    """Fallback for directories with only `tokenizer.json` (fast tokenizers)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, pieces: list[str]) -> str:
        ids = [i for i in (self._tok.token_to_id(p) for p in pieces) if i is not None]
        return self._tok.decode(ids, skip_special_tokens=True)


def _load_piece_model(model_dir: Path, names: tuple[str, ...]):
    for name in names:
        if (model_dir / name).exists():
            return _SentencePiece(model_dir / name)
    if (model_dir / "tokenizer.json").exists():
        return _HFTokenizerJson(model_dir / "tokenizer.json")
    raise FileNotFoundError(
        f"no tokenizer in {model_dir}: expected one of {', '.join(names)} or tokenizer.json "
        "(convert with `babelcap convert-translator`, which copies them)"
    )


def _codes(recorded: tuple[str, ...] | None) -> set[str] | None:
    if recorded is None:
        return None
    out = set()
    for code in recorded:
        try:
            out.add(resolve(code).code)
        except ValueError:
            continue  # group names such as "ROMANCE" are not languages
    return out or None


class Codec:
    """Tokenisation and language tokens for one model directory."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.family = info.family
        d = info.path
        if self.family == "marian":
            self._src = _load_piece_model(d, ("source.spm",))
            self._tgt = _load_piece_model(d, ("target.spm",))
        else:
            self._src = self._tgt = _load_piece_model(d, _SPM_NAMES)
        self._src_codes = _codes(info.source_languages)
        self._tgt_codes = _codes(info.target_languages)

    # -- languages -------------------------------------------------------------------------
    def _token(self, lang: Language) -> str | None:
        tokens = self.info.language_tokens
        if self.family == "m2m100":
            return lang.m2m_token if lang.m2m_token in tokens else None
        if self.family == "nllb":
            return lang.nllb if lang.nllb in tokens else None
        return next((t for t in lang.marian_tokens if t in tokens), None)

    def supported(self) -> tuple[list[str], list[str]]:
        """(source, target) languages this model accepts, as codes (['*'] when unrecorded)."""
        toks = sorted(self.info.language_tokens)
        if self.family == "marian":
            src = sorted(self._src_codes) if self._src_codes else ["*"]
            if toks:
                return src, toks
            return src, sorted(self._tgt_codes) if self._tgt_codes else ["*"]
        listed = [t.strip("_") for t in toks] if self.family == "m2m100" else toks
        src = sorted(self._src_codes) if self._src_codes else listed
        tgt = sorted(self._tgt_codes) if self._tgt_codes else listed
        return src, tgt

    def language_tokens(self, src: Language, tgt: Language) -> tuple[str | None, str | None]:
        """(source token, target token) for a pair; ValueError when the model cannot do it."""
        ok = True
        if self._src_codes is not None and src.code not in self._src_codes:
            ok = False
        if self._tgt_codes is not None and tgt.code not in self._tgt_codes:
            ok = False
        src_tok = tgt_tok = None
        if self.family in ("m2m100", "nllb"):
            src_tok, tgt_tok = self._token(src), self._token(tgt)
            ok = ok and src_tok is not None and tgt_tok is not None
        elif self.info.language_tokens:  # multi-target Marian
            tgt_tok = self._token(tgt)
            ok = ok and tgt_tok is not None
        if not ok:
            sources, targets = self.supported()
            raise ValueError(
                f"model {self.info.path} ({self.family}) cannot translate "
                f"{src.code}->{tgt.code}; source languages: {', '.join(sources)}; "
                f"target languages: {', '.join(targets)}"
            )
        return src_tok, tgt_tok

    # -- tokens ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[str]:
        return self._src.encode(text)

    def n_special(self, src_tok: str | None, tgt_tok: str | None) -> int:
        """How many tokens `build_source` adds around the pieces."""
        if self.family == "marian":
            return 1 + (tgt_tok is not None)
        return 2

    def build_source(self, pieces: list[str], src_tok: str | None, tgt_tok: str | None):
        if self.family == "marian":
            return ([tgt_tok] if tgt_tok else []) + pieces + [EOS]
        return [src_tok, *pieces, EOS]

    def target_prefix(self, tgt_tok: str | None) -> list[str] | None:
        return None if self.family == "marian" else [tgt_tok]

    def decode(self, tokens: list[str], tgt_tok: str | None) -> str:
        if self.family != "marian" and tokens and tokens[0] == tgt_tok:
            tokens = tokens[1:]
        drop = self.info.language_tokens
        return self._tgt.decode([t for t in tokens if t not in _SPECIALS and t not in drop]).strip()

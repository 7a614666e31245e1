"""Language codes: ISO 639-1 (`pt`), ISO 639-3 (`por`), BCP-47 (`pt-BR`, `zh-Hant`) and NLLB
(`por_Latn`) all resolve to one `Language`, which each model family turns into its own token.

The table is data (`languages.json`, next to this module), not code: add a row to support a
language. No dependency (pycountry, langcodes) is needed for a lookup this small.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

TABLE = Path(__file__).with_name("languages.json")

_NLLB = re.compile(r"^([a-z]{3})_([A-Z][a-z]{3})$")
_SCRIPT = re.compile(r"^[A-Za-z]{4}$")


@dataclass(frozen=True)
class Language:
    """One language: `code` is ISO 639-1 when it exists, else ISO 639-3 (babelcap's canonical
    code, the one written in shards); `nllb` carries the script (`por_Latn`)."""

    code: str
    iso639_3: str
    nllb: str
    name: str

    @property
    def m2m_token(self) -> str:
        return f"__{self.code}__"

    @property
    def marian_tokens(self) -> tuple[str, ...]:
        """Candidate `>>xx<<` target tokens of multi-target opus-mt models, most specific first."""
        return (f">>{self.code}<<", f">>{self.iso639_3}<<", f">>{self.nllb}<<")


@cache
def _table() -> tuple[dict[str, Language], list[Language]]:
    rows = json.loads(TABLE.read_text(encoding="utf-8"))["languages"]
    index: dict[str, Language] = {}
    languages: list[Language] = []
    for row in rows:
        lang = Language(
            code=row["iso639_1"] or row["iso639_3"],
            iso639_3=row["iso639_3"],
            nllb=row["nllb"],
            name=row["name"],
        )
        languages.append(lang)
        keys = [lang.code, lang.iso639_3, lang.nllb.lower(), lang.name.lower(), *row["aliases"]]
        for key in keys:
            index.setdefault(key.lower(), lang)
    return index, languages


def known_languages() -> list[Language]:
    """Every language in the table, in table order."""
    return list(_table()[1])


def resolve(code: str) -> Language:
    """Resolve any accepted spelling of a language code; ValueError lists what is known.

    A script given explicitly (`zh-Hant`, `zho_Hant`) is kept in the NLLB code; a region
    (`pt-BR`) is accepted and dropped, since none of the supported model families encode it.
    """
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"language code must be a non-empty string, got {code!r}")
    raw = code.strip()
    index, _ = _table()
    script: str | None = None
    match = _NLLB.match(raw)
    if match:
        base, script = match.group(1), match.group(2)
    else:
        # BCP-47: language[-Script][-REGION][-variants]; '_' is a common misspelling of '-'.
        parts = re.split(r"[-_]", raw)
        base = parts[0]
        if len(parts) > 1 and _SCRIPT.match(parts[1]):
            script = parts[1].title()
    lang = index.get(base.lower()) or index.get(raw.lower())
    if lang is None:
        raise ValueError(
            f"unknown language code {code!r}; use ISO 639-1/639-3, BCP-47 or NLLB codes. "
            f"Known: {', '.join(sorted(x.code for x in known_languages()))}"
        )
    if script and not lang.nllb.endswith("_" + script):
        lang = replace(lang, nllb=f"{lang.nllb.split('_')[0]}_{script}")
    return lang

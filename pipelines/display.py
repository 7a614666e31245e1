"""Text from files made safe to show: on a terminal (no control, bidi or separator characters
reach it raw), in a Markdown table cell, and in JSON. Used by `inspect` and its reports."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

# Format characters that are part of text (joiners in Indic and emoji sequences) stay.
_KEEP_FORMAT = {"\u200c", "\u200d"}


def _unsafe(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat in ("Cc", "Zl", "Zp", "Cs") or (cat == "Cf" and ch not in _KEEP_FORMAT)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(value: Any) -> str:
    """`value` as text that is safe on a terminal: control, format (bidi overrides), line and
    paragraph separator characters become visible escapes (`\\x1b`, `\\u202e`)."""
    text = "" if value is None else str(value)
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)


def cell(value: Any) -> str:
    """`printable(value)` for a Markdown table cell: backslashes and `|` escaped."""
    text = "" if value is None else str(value)
    return printable(text.replace("\\", "\\\\")).replace("|", "\\|")


def printable_json(data: Any) -> str:
    """JSON without raw terminal control characters in it: JSON escapes C0 itself; C1, DEL and
    format characters (bidi overrides) are written as `\\uXXXX` escapes, which JSON reads back."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)

    def esc(ch: str) -> str:
        code = ord(ch)
        if code < 0x10000:
            return f"\\u{code:04x}"
        code -= 0x10000  # a UTF-16 surrogate pair, as JSON writes characters above the BMP
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"

    return "".join(esc(ch) if ch != "\n" and _unsafe(ch) else ch for ch in text)

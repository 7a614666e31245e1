"""List options: one parser for every comma-separated flag and config value."""

from __future__ import annotations

from collections.abc import Iterable


def parse_list(value: str | Iterable[str] | None) -> list[str]:
    """'pt, es,,pt' or ['pt', ' es'] -> ['pt', 'es']: items stripped, empty ones and repeats
    dropped, order kept. None -> []."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out

"""Dead-letter plumbing shared by the stages: a tagged output carrying a schema row + stats.

A stage that rejects an input emits `reject(element, stage, kind, message)`; the builder
flattens every stage's `DEAD` output into the dead-letter sink. Stats travel along, so the
accounting sees each input exactly once, wherever it ended.
"""

from __future__ import annotations

from typing import Any

from apache_beam import pvalue

from babelcap.core import schema
from babelcap.pipelines.accounting import bump

DEAD = "dead_letter"

# Dead-letter error kinds that are not failures but dropped duplicate images.
DUPLICATE_IMAGE = "duplicate_image"


def reject(
    element: dict[str, Any], stage: str, kind: str, message: str = ""
) -> pvalue.TaggedOutput:
    """Send `element` to the dead-letter output with its stage and reason."""
    element = dict(element)
    bump(element, f"{stage}.dead.{kind}")
    row = schema.dead_letter(
        element.get("input_ref") or element.get("uri") or "?",
        stage,
        kind,
        message,
        image_id=element.get("image_id"),
    )
    return pvalue.TaggedOutput(DEAD, {"row": row, "stats": element.get("stats", {})})

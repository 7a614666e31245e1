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

# Kinds whose cause may go away by itself (an object store or network hiccup that outlived
# the reader's own retries; a planned input the reader did not come to in this run):
# re-running just these inputs can succeed (`--retry-failed`).
TRANSIENT_KINDS: frozenset[str] = frozenset({"read_error", "not_read"})

# Kinds the input itself causes: the same input fails the same way on every run, so retrying
# is pointless until the user fixes it. (Kinds not listed in either set are treated as
# permanent: an unknown kind is never retried blindly.)
PERMANENT_READ_KINDS: frozenset[str] = frozenset(
    {
        "missing_file",  # the path does not exist
        "not_a_regular_file",  # a folder, FIFO, device or socket: never opened for reading
        "permission_denied",
        "unreadable",  # any other permanent read failure
        "file_too_large",  # over --max-file-bytes (a file, a tar member or embedded bytes)
        "path_outside_manifest",  # relative path climbing out of the manifest's folder
        "bad_manifest_row",  # unparsable row, wrong types, too long, no image column
        "bad_manifest",  # the manifest file itself is unreadable from some line on
        "unknown_input",  # --input is a file whose format is not known
        "bad_tar",  # not a tar of the compression its name says, or corrupt from here on
        "unsafe_member",  # sparse, link, device or FIFO member inside a tar
        "bad_sample",  # tar sample: bad .json metadata, duplicate member
        "split_sample",  # a member arriving after its sample was emitted (interleaved tar)
        "no_image_in_sample",
    }
)


# Longest dead-letter message: messages quote input (a path, a value, a parser's error), and a
# 1 MiB row must not become a 1 MiB message. Longer ones are cut, saying how long they were.
MAX_MESSAGE_CHARS = 500


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters, with an ellipsis and its original length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def printable(text: str) -> str:
    """`text` as valid UTF-8 for a Parquet string: bytes that were not UTF-8 (kept by
    surrogateescape in file names, manifest lines, tar member names) become `\\xNN`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")


def is_transient(kind: str) -> bool:
    """True when a dead letter of this kind may succeed if simply run again."""
    return kind in TRANSIENT_KINDS


def reject(
    element: dict[str, Any], stage: str, kind: str, message: str = ""
) -> pvalue.TaggedOutput:
    """Send `element` to the dead-letter output with its stage and reason."""
    element = dict(element)
    bump(element, f"{stage}.dead.{kind}")
    row = schema.dead_letter(
        printable(element.get("input_ref") or element.get("uri") or "?"),
        stage,
        kind,
        clip(printable(message)),
        image_id=element.get("image_id"),
    )
    return pvalue.TaggedOutput(DEAD, {"row": row, "stats": element.get("stats", {})})

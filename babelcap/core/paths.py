"""Small path helpers shared by the jobs (no I/O beyond an `isdir` check)."""

from __future__ import annotations

import os
import posixpath

# Last components that say nothing by themselves (`.../opus-mt-en-pt/ct2`, `.../clip/text`):
# such a folder keeps its parent too.
GENERIC_NAMES = frozenset(
    {
        "ct2",
        "ctranslate2",
        "text",
        "vision",
        "image",
        "model",
        "models",
        "hf",
        "onnx",
        "checkpoint",
        "checkpoints",
        "final",
        "best",
        "last",
        "latest",
        "adapter",
        "adapters",
        "weights",
        "export",
        "out",
        "output",
    }
)


def portable_ref(ref: str) -> str:
    """A reference to a file, folder or model without this machine's folder layout, for
    anything that travels with the data (shard metadata, caption `model` fields, export
    records).

    - URIs (`gs://b/x`, `hf://...`, `https://...`) and relative paths, Hugging Face Hub ids
      (`org/name`) included, are returned as they are;
    - a `file://` URI is a local path and is treated like one;
    - an absolute local path (or `~/...`) becomes its last two components
      (`/home/me/data/in/part-0.parquet` -> `in/part-0.parquet`); a folder (an existing one,
      one written with a trailing `/`, or a last component without a `.suffix`) becomes its
      name (`/home/me/models/blip-base` -> `blip-base`), or its last two components when the
      name is generic (`/srv/opus-mt-en-pt/ct2` -> `opus-mt-en-pt/ct2`, see GENERIC_NAMES);
    - a Hugging Face cache snapshot (`.../models--org--name/snapshots/<rev>`) becomes `org/name`.

    Deterministic for a given string (apart from the `isdir` check for a folder whose name has
    a dot); never raises for a string.
    """
    if not isinstance(ref, str):
        ref = str(ref)
    text = ref
    if text.startswith("file://"):
        text = text[len("file://") :]
        if not text.startswith("/"):  # file://host/path: drop the host
            text = "/" + text.split("/", 1)[1] if "/" in text else "/"
    elif "://" in text:
        return ref
    if text.startswith("~"):
        text = "/" + text.lstrip("~").lstrip("/")
    if not posixpath.isabs(text):
        return ref
    trailing = text.endswith("/")
    parts = [p for p in posixpath.normpath(text).split("/") if p]
    if not parts:
        return "/"
    for i, part in enumerate(parts):  # a Hugging Face hub cache folder
        if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/")
    name = parts[-1]
    folder = trailing or "." not in name.lstrip(".")
    if not folder:
        try:
            folder = os.path.isdir(text)
        except (OSError, ValueError):
            folder = False
    if folder and name.lower() not in GENERIC_NAMES:
        return name
    return "/".join(parts[-2:])

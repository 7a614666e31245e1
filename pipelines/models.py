"""Where models come from on a worker: remote model folders, copied once per process.

A model given as a remote folder (`gs://bucket/models/captioner`) is copied once per worker
process into a local cache directory (Beam's FileSystems, so any registered filesystem works)
and then loaded by the libraries' normal local loaders. Hub names and local paths pass through.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile

log = logging.getLogger(__name__)

_COPIED: dict[str, str] = {}


def local_model_path(path: str) -> str:
    """A local folder for `path`: remote folders (scheme://) are copied once per process."""
    if "://" not in path:
        return path
    if path in _COPIED:
        return _COPIED[path]
    from apache_beam.io.filesystems import FileSystems

    root = os.environ.get("BABELCAP_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "babelcap"))
    dest = os.path.join(root, hashlib.sha256(path.encode()).hexdigest()[:16])
    prefix = path.rstrip("/") + "/"
    done = os.path.join(dest, ".complete")
    if not os.path.exists(done):
        log.info("copying model %s -> %s", path, dest)
        tmp = dest + f".tmp{os.getpid()}"
        for meta in FileSystems.match([prefix + "**"])[0].metadata_list:
            rel = meta.path[len(prefix) :]
            if not rel or rel.endswith("/"):
                continue
            target = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with (
                FileSystems.open(meta.path, compression_type="uncompressed") as src,
                open(target, "wb") as dst,
            ):
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        os.makedirs(tmp, exist_ok=True)
        open(os.path.join(tmp, ".complete"), "w").close()
        with contextlib.suppress(OSError):  # another process of this worker won the race
            os.rename(tmp, dest)
    _COPIED[path] = dest
    return dest


class Loaded:
    """What a model handler's `load_model` returns: a weak-referenceable bundle (Beam's
    shared-handle cache keeps weak references, which plain tuples do not allow)."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

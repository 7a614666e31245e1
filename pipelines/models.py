"""Models on a worker: where they come from, how they are held, how many threads they use.

A model given as a remote folder (`gs://bucket/models/captioner`) is copied once per worker
process into a local cache directory (Beam's FileSystems, so any registered filesystem works)
and then loaded by the libraries' normal local loaders. Hub names and local paths pass through.

What a model handler's `load_model` returns is a `ServedModel`: one loaded model whose public
methods each do a whole batch's model work from plain picklable data and return plain data.
That is what lets Beam share it between the worker processes of a machine
(`AugmentConfig.model_copies`, `ModelSharing`): the copy then lives in one process and the
others reach it through a proxy that forwards public method calls only, pickling arguments and
results. The handlers call it the same way whether it is shared or their own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from babelcap.core.devices import available_cores, limit_torch_threads, worker_threads

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


class ServedModel:
    """Base of the loaded models the handlers hand to RunInference.

    Public methods only take and return plain data (bytes, str, numbers, lists, dicts, numpy
    arrays): a shared copy is reached through Beam's proxy (`multi_process_shared`), which
    forwards method calls (never attribute reads) and pickles what crosses. Each method holds
    `_lock` while it runs the model: a shared copy is called from several processes at once
    (one server thread per caller), and the model work uses process-wide state (torch's seed
    for sampled captions, the translator's counters and memory). Work that needs no model state
    (decoding images) may run outside it. What they raise must pickle too (`served_method`).
    (A class instance, not a tuple: Beam's per-process model cache keeps weak references.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def process_id(self) -> int:
        """The process holding this copy (the same for every worker when it is shared)."""
        return os.getpid()


def portable(exc: Exception) -> Exception:
    """`exc`, picklable: a shared copy's failure is pickled back to the caller, where it becomes
    the batch's dead letters with its type and message as the reason. babelcap's own errors
    pickle whole (`core.images.ImageError` keeps its kind); others that cannot cross are told
    by type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


Method = TypeVar("Method", bound=Callable[..., Any])


def served_method(method: Method) -> Method:
    """Decorate a `ServedModel`'s public method: what it raises can cross to the caller
    (`portable`)."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            crossing = portable(exc)
            if crossing is exc:
                raise
            raise crossing from exc

    return call  # type: ignore[return-value]


class ModelSharing:
    """Mixin for a Beam `ModelHandler`: `copies` >= 1 shares that many copies of the model per
    machine between all its worker processes (Beam's `share_model_across_processes` /
    `model_copies`); 0 lets every worker process load its own (Beam's default)."""

    copies: int = 0

    def share_model_across_processes(self) -> bool:
        return self.copies >= 1

    def model_copies(self) -> int:
        return max(1, self.copies)


def model_threads(copies: int) -> int | None:
    """CPU threads for one copy of a model: where the local runner split the cores between its
    worker processes (`worker_threads`), a worker's share; a copy shared by every worker
    (`copies` >= 1) runs one batch at a time for all of them (`ServedModel._lock`), so it gets
    the cores all the workers had, divided between the copies. None elsewhere: the libraries'
    defaults."""
    threads = worker_threads()
    if threads is None or copies < 1:
        return threads
    return max(1, available_cores() // copies)


def limit_model_threads(copies: int) -> None:
    """Set torch's threads for a model loaded in this process (see `model_threads`)."""
    if copies < 1:
        limit_torch_threads()
        return
    if threads := model_threads(copies):
        import torch

        torch.set_num_threads(threads)

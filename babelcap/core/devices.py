"""Where models run: one rule for "auto" and for how many CPU threads a worker may use."""

from __future__ import annotations

import os
from collections.abc import Callable

# Set for local multi-process Beam workers (pipelines.runner), which share the machine's cores.
THREADS_ENV = "BABELCAP_TORCH_THREADS"


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(
    device: str = "auto",
    *,
    local_rank: int | None = None,
    cuda_available: Callable[[], bool] = _torch_cuda,
) -> str:
    """ "auto" -> "cuda" (or "cuda:<local_rank>" under torchrun) when CUDA is there, else "cpu";
    any other name passes through. `cuda_available` lets an engine with its own CUDA runtime
    (CTranslate2) answer for itself."""
    if device != "auto":
        return device
    if not cuda_available():
        return "cpu"
    return "cuda" if local_rank is None else f"cuda:{local_rank}"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it: a container's or
    taskset's share, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_threads() -> int | None:
    """This worker's share of the CPU cores when a local multi-process run split them
    ($BABELCAP_TORCH_THREADS, set by the local runner for its workers only), else None."""
    threads = os.environ.get(THREADS_ENV)
    return max(1, int(threads)) if threads else None


def limit_torch_threads() -> None:
    """Torch uses this worker's share of the cores (`worker_threads`); elsewhere it keeps its
    default."""
    threads = worker_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)

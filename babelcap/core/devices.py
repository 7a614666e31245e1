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


def limit_torch_threads() -> None:
    """Local multi-process runs split the CPU cores between workers ($BABELCAP_TORCH_THREADS,
    set by the local runner for its workers only); elsewhere torch keeps its default."""
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))

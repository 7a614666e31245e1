"""Shared plumbing for benchmark scripts: machine facts and one results-file format."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(name: str, title: str, data: dict[str, Any], markdown: str) -> Path:
    """Write `bench/results/<name>.json` with the figures, the Markdown table and the command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {
        "title": title,
        "date": _dt.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": machine(),
        "markdown": markdown,
        **data,
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(markdown)
    return out

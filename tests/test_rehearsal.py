"""The rehearsal's memory probe sees worker processes: a child that allocates 300 MB shows up as
a worker with that peak, apart from the driver (real subprocess, real RSS)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_tree_memory_reports_each_worker_process():
    from bench_rehearsal import TreeMemory

    code = "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    with TreeMemory(interval=0.05) as mem:
        subprocess.run([sys.executable, "-c", code], check=True)
    report = mem.report(workers=2)
    assert len(report["worker_peak_mb"]) == 1  # one child process ran
    assert report["worker_peak_mb"][0] >= 300
    assert report["tree_peak_mb"] > report["worker_peak_mb"][0]  # the driver's share on top
    assert mem.report(workers=1)["worker_peak_mb"] == [report["driver_peak_mb"]]

"""The rehearsal's memory probe sees worker processes: a child that allocates 300 MB shows up as
a worker with that peak, apart from the driver (real subprocess, real RSS).

The probe runs in a fresh process of its own: pytest's process may have other children (the
background build of the test world's models), which the probe would rightly count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

PROBE = f"""
import json, subprocess, sys
sys.path.insert(0, {str(BENCH)!r})
from bench_rehearsal import TreeMemory

code = "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
with TreeMemory(interval=0.05) as mem:
    subprocess.run([sys.executable, "-c", code], check=True)
print(json.dumps({{"two": mem.report(workers=2), "one": mem.report(workers=1)}}))
"""


def test_tree_memory_reports_each_worker_process():
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True)
    reports = json.loads(out.stdout.strip().splitlines()[-1])
    report = reports["two"]
    assert len(report["worker_peak_mb"]) == 1  # one child process ran
    assert report["worker_peak_mb"][0] >= 300
    assert report["tree_peak_mb"] > report["worker_peak_mb"][0]  # the driver's share on top
    assert reports["one"]["worker_peak_mb"] == [report["driver_peak_mb"]]

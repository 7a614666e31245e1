"""How fast the synthetic world builds: images per second for 1,000 and 10,000 images.

    python bench/bench_world.py [--quick] [--workers N]

Target (issue 2): 10,000 images well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from babelcap.world.build import build_world
from bench.common import write_results


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 2,000 images only")
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1
    sizes = [1000, 2000] if args.quick else [1000, 10_000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-world-") as tmp:
        for n in sizes:
            out = Path(tmp) / f"w{n}"
            start = time.perf_counter()
            build_world(out, n_images=n, seed=0, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "images": n,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(n / seconds, 1),
                    "mb": round(_size_mb(out), 1),
                }
            )
            shutil.rmtree(out)
    lines = [
        "| images | workers | seconds | images/s | size on disk (MB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['images']:,} | {workers} | {r['seconds']} | {r['images_per_s']} | {r['mb']} |"
        for r in rows
    ]
    markdown = "\n".join(lines) + "\n\n5 languages x 6 paraphrases per image, 64 px PNGs.\n"
    write_results("world", "Synthetic world build", {"workers": workers, "runs": rows}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

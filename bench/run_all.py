"""Run every benchmark, collect `bench/results/*.json` and write one Markdown summary.

Each benchmark is a script `bench/bench_<name>.py` that writes `bench/results/<name>.json`
with a `markdown` field (its table). This script runs them one after another (so timings do
not disturb each other), then writes `bench/results/SUMMARY.md` and copies it into the README
between the `<!-- BENCH:BEGIN -->` / `<!-- BENCH:END -->` markers, so the README quotes the
benchmarks' own output rather than hand-copied numbers.

    python bench/run_all.py [--quick] [--only translate,training] [--no-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from babelcap.core.lists import parse_list

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"

# Order: cheap first, so a partial run still reports something useful.
BENCHMARKS = [
    "world",
    "translate",
    "pipeline",
    "incremental",
    "training",
    "quality",
    "crosslingual",
]


def run(names: list[str], quick: bool) -> dict[str, float]:
    seconds = {}
    for name in names:
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            print(f"[bench] {name}: no {script.name}, skipped", flush=True)
            continue
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
        subprocess.run(cmd, check=True, cwd=HERE.parent)
        seconds[name] = round(time.perf_counter() - start, 1)
    return seconds


def summary_markdown(names: list[str]) -> str:
    parts = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        title = data.get("title", name)
        when = data.get("date", "")
        table = data.get("markdown") or _sidecar_markdown(name)
        parts.append(f"### {title}\n\n{table.strip()}\n")
        if data.get("command") or when:
            parts.append(
                f"_Measured with `{data.get('command', f'python bench/bench_{name}.py')}`"
                f"{' on ' + when if when else ''}; raw figures in "
                f"`bench/results/{name}.json`._\n"
            )
    return "\n".join(parts).strip() + "\n"


def _sidecar_markdown(name: str) -> str:
    """Benchmarks that write their table to `results/<name>.md` instead of the JSON."""
    path = RESULTS / f"{name}.md"
    return path.read_text() if path.exists() else ""


def update_readme(markdown: str) -> bool:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{markdown}{END}{tail}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster settings")
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    parser.add_argument("--no-run", action="store_true", help="only rebuild the summary")
    args = parser.parse_args()
    names = parse_list(args.only) or BENCHMARKS
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.no_run:
        run(names, args.quick)
    markdown = summary_markdown(BENCHMARKS)
    (RESULTS / "SUMMARY.md").write_text(markdown)
    print(markdown)
    if update_readme(markdown):
        print(f"[bench] README.md updated from {RESULTS / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

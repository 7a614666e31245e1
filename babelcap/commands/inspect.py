"""`babelcap inspect`: what is in a folder of shards."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise shards and dead-letter files (counts per split/language/origin, samples)",
        description="Summarise babelcap Parquet shards: files, rows per split, captions per "
        "language and origin, caption lengths, samples, dead-letter counts by stage and reason, "
        "the run's dropped captions, metadata. Streams the files, so any number of shards fits "
        "in memory. Values from the files are printed escaped (no control characters).",
    )
    p.add_argument("path", help="a shard file, a folder (searched recursively) or a glob")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--samples", type=int, default=3, help="sample rows to show (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from babelcap.pipelines.display import printable_json
    from babelcap.pipelines.inspect import format_report, inspect_paths

    data = inspect_paths(args.path, n_samples=max(0, args.samples))
    text = printable_json(data) if args.json else format_report(data)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `babelcap inspect ... | head`: the reader has gone, which is not an error. Point
        # stdout at /dev/null so the interpreter's own flush at exit stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0

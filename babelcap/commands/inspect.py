"""`babelcap inspect`: what is in a folder of shards."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise shards and dead-letter files (counts per language/origin, samples)",
        description="Summarise babelcap Parquet shards: files, rows, captions per language and "
        "origin, caption lengths, samples, dead-letter counts by stage and reason, metadata. "
        "Streams the files, so any number of shards fits in memory.",
    )
    p.add_argument("path", help="a shard file, a folder (searched recursively) or a glob")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--samples", type=int, default=3, help="sample rows to show (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from babelcap.pipelines.inspect import format_report, inspect_paths

    data = inspect_paths(args.path, n_samples=args.samples)
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else format_report(data))
    return 0

"""`babelcap export-wds SHARDS --out DIR --lang pt`: WebDataset tars for open_clip's trainer."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-wds",
        help="export shards as WebDataset tars (image + txt + json, sizes.json) for open_clip",
    )
    parser.add_argument("shards", help="augment output folder, shard folder or one shard file")
    parser.add_argument("--out", required=True, help="output folder for the tars")
    parser.add_argument("--lang", required=True, help="caption language to export, e.g. pt")
    parser.add_argument("--maxcount", type=int, default=10_000, help="samples per tar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from babelcap.pipelines.export_wds import export_webdataset

    result = export_webdataset(args.shards, args.out, args.lang, maxcount=args.maxcount)
    print(json.dumps({k: v for k, v in result.items() if k != "sizes"}, indent=1))
    print(
        f"train with: python -m open_clip_train.main --dataset-type webdataset "
        f"--train-data '{args.out}/shard-{{000000..{max(result['tars'] - 1, 0):06d}}}.tar' ..."
    )
    return 0

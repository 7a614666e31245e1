"""`babelcap export-wds SHARDS --out DIR --lang pt`: WebDataset tars for open_clip's trainer.

    babelcap export-wds OUTPUT --out wds/ --lang pt [--caption-origin synthetic,translated]
        [--caption-select best|first|random] [--splits train] [--maxcount 10000]

The options are the fields of `babelcap.pipelines.export_wds.WdsExportConfig`.
"""

from __future__ import annotations

import argparse
import json

from babelcap.core.config import Flag, add_flags, apply_flags

FLAGS: tuple[Flag, ...] = (
    Flag("language", "--lang"),
    Flag("caption_origins", "--caption-origin"),
    Flag("caption_select"),
    Flag("seed"),
    Flag("splits"),
    Flag("maxcount"),
    Flag("maxsize"),
    Flag("prefix"),
    Flag("image_root"),
    Flag("max_image_bytes"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from babelcap.pipelines.export_wds import WdsExportConfig

    parser = subparsers.add_parser(
        "export-wds",
        help="export shards as WebDataset tars (image + txt + json, sizes.json) for open_clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("shards", help="augment output folder, shard folder, file or glob")
    parser.add_argument("--out", required=True, help="output folder for the tars")
    add_flags(parser, WdsExportConfig, FLAGS)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from babelcap.pipelines.export_wds import WdsExportConfig, export_webdataset

    if not args.lang:
        raise ValueError("export-wds needs --lang (the caption language to export)")
    config = WdsExportConfig.from_dict(apply_flags({}, args, WdsExportConfig, FLAGS))
    result = export_webdataset(args.shards, args.out, config=config)
    print(json.dumps({k: v for k, v in result.items() if k != "sizes"}, indent=1))
    if result["pattern"]:
        print(
            "train with: python -m open_clip_train.main --dataset-type webdataset "
            f"--train-data '{args.out.rstrip('/')}/{result['pattern']}' "
            f"--train-num-samples {result['written']} --model local-dir:EXPORT ..."
        )
    return 0

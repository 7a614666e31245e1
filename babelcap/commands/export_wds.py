"""`babelcap export-wds SHARDS --out DIR --lang pt`: WebDataset tars for open_clip's trainer.

    babelcap export-wds OUTPUT --out wds/ --lang pt [--caption-origin synthetic,translated]
        [--caption-select best|first|random] [--splits train] [--maxcount 10000]

The options are the fields of `babelcap.pipelines.export_wds.WdsExportConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex

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
        print(train_hint(args.out, result["pattern"], result["written"]))
    return 0


def train_hint(out: str, pattern: str, written: int) -> str:
    """The open_clip_train command for this export, as it works when pasted: the tars by an
    absolute path (the command runs from elsewhere), and the model as `local-dir:.` from
    inside the model export (`babelcap train`'s `export/`), whose config names its text tower
    relative to that folder."""
    data = out.rstrip("/") + "/" + pattern
    if "://" not in data:
        data = os.path.abspath(data)
    return (
        "train with open_clip from inside a model export (EXPORT: `babelcap train`'s "
        "RUN/export; its paths are relative to it):\n"
        "  cd EXPORT && python -m open_clip_train.main --model local-dir:. "
        f"--dataset-type webdataset --train-data {shlex.quote(data)} "
        f"--train-num-samples {written} --batch-size 32 --epochs 1"
    )

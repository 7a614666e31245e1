"""`babelcap augment`: images -> captioned, translated, filtered Parquet shards (Apache Beam).

    babelcap augment --input world/manifest.jsonl --captioner world/models/captioner \\
        --translator world/models/translator/ct2 --languages pt,es --output out/ \\
        [--num-captions 10] [--workers 2] [--filter min_words=3] [-- BEAM OPTIONS...]
    babelcap augment --config augment.yaml [--set clip.score_threshold=0.2] ...

The configuration is `babelcap.pipelines.options.AugmentConfig`: a YAML/JSON file (`--config`),
then `--set key=value` overrides, then the flags (derived from the config's fields). Unknown keys
and bad values are errors before any work starts. Everything after `--` goes to Beam untouched
(e.g. `-- --runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--setup_file ./setup.py`). `beam_runner.py` builds the same pipeline from the same flags (it is
the same parser).
"""

from __future__ import annotations

import argparse

from babelcap.core.config import Flag, add_flags, apply_flags, interpolate, read_config

IO, CAPTIONING, TRANSLATION, FILTERS = (
    "input / output",
    "captioning",
    "translation",
    "filters and CLIP",
)

# Top-level fields get a flag named after them (`rows_per_shard` -> `--rows-per-shard`); keys
# inside sections keep their established flag names.
FLAGS: tuple[Flag, ...] = (
    Flag("input", group=IO),
    Flag("input_format", group=IO),
    Flag("output", group=IO),
    Flag("source_language", group=IO),
    Flag("image_column", group=IO),
    Flag("caption_column", group=IO),
    Flag("language_column", group=IO),
    Flag("image_extensions", group=IO),
    Flag("store_image", group=IO),
    Flag("resize_max_side", "--resize", group=IO),
    Flag("max_image_pixels", group=IO),
    Flag("max_file_bytes", group=IO),
    Flag("num_shards", group=IO),
    Flag("rows_per_shard", group=IO),
    Flag("seed", group=IO),
    Flag("captioner.model", "--captioner", group=CAPTIONING),
    Flag("captioner.model_class", "--captioner-class", group=CAPTIONING),
    Flag("captioner.num_captions", "--num-captions", group=CAPTIONING),
    Flag(
        "captioner.prompts",
        "--prompt",
        append=True,
        help="prompt prefix (repeat; default: CAPIVARA's ten)",
        group=CAPTIONING,
    ),
    Flag("captioner.sampling", "--sampling", group=CAPTIONING),
    Flag("captioner.batch_size", "--caption-batch-size", group=CAPTIONING),
    Flag("captioner.max_new_tokens", "--max-new-tokens", group=CAPTIONING),
    Flag("translator.model", "--translator", group=TRANSLATION),
    Flag("languages", group=TRANSLATION),
    Flag("translator.batch_size", "--translate-batch-size", group=TRANSLATION),
    Flag(
        "text",
        "--filter",
        mapping=True,
        help="text filter setting, e.g. min_words=3, language_check=false",
        group=FILTERS,
    ),
    Flag("clip.model", "--clip", group=FILTERS),
    Flag("clip.pretrained", "--clip-pretrained", group=FILTERS),
    Flag("clip.score_threshold", "--clip-threshold", group=FILTERS),
    Flag("clip.top_k", "--clip-top-k", group=FILTERS),
    Flag("clip.embed_images", "--embed-images", group=FILTERS),
    Flag(
        "captioner.device",
        "--device",
        also=("translator.device", "clip.device"),
        only_present=True,
        help="auto | cpu | cuda, for every model",
        group="running",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The augment flags (shared with beam_runner.py)."""
    from babelcap.pipelines.options import AugmentConfig

    parser.add_argument(
        "--config", help="JSON or YAML file with an AugmentConfig (--set and flags override)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. clip.score_threshold=0.2 (value parsed as YAML)",
    )
    add_flags(parser, AugmentConfig, FLAGS)
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")


def config_from_args(args: argparse.Namespace):
    """An AugmentConfig: the config file (optional), then `--set` overrides, then flags;
    `${NAME}` in values comes from the environment."""
    from babelcap.core.config import apply_overrides
    from babelcap.pipelines.options import AugmentConfig

    data = apply_overrides(read_config(args.config), args.overrides)
    data = apply_flags(data, args, AugmentConfig, FLAGS)
    return AugmentConfig.from_dict(interpolate(data), source=args.config)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "augment",
        help="caption, translate and filter images into Parquet shards (Apache Beam)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument(
        "beam_args",
        nargs=argparse.REMAINDER,
        help="after `--`: Beam pipeline options, passed through",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from babelcap.pipelines.runner import run

    beam_args = [a for a in args.beam_args if a != "--"]
    run(config_from_args(args), beam_args=beam_args, workers=args.workers)
    return 0

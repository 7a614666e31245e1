"""`babelcap augment`: images -> captioned, translated, filtered Parquet shards (Apache Beam).

    babelcap augment --input world/manifest.jsonl --captioner world/models/captioner \\
        --translator world/models/translator/ct2 --languages pt,es --output out/ \\
        [--num-captions 10] [--workers 2 [--model-copies 1]] [--filter min_words=3] \\
        [-- BEAM OPTIONS...]
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
from pathlib import Path

from babelcap.core.config import (
    Flag,
    add_config_arguments,
    add_flags,
    apply_flags,
    interpolate,
    read_config,
)

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
    Flag("allow_outside_paths", group=IO),
    Flag("num_shards", group=IO),
    Flag("rows_per_shard", group=IO),
    Flag("seed", group=IO),
    Flag("unit_size", group=IO),
    Flag("units_per_wave", group=IO),
    Flag("units_per_translation_wave", group=IO),
    Flag("max_dead_letter_share", group=IO),
    Flag("overwrite", group=IO),
    Flag("retry_failed", group=IO),
    Flag("retranslate", group=TRANSLATION),
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
    Flag("clip.source_filter", "--source-filter", group=FILTERS),
    Flag("clip.source_min_score", "--source-min-score", group=FILTERS),
    Flag("clip.source_relative", "--source-relative", group=FILTERS),
    Flag("translator.reverse_model", "--reverse-translator", group=TRANSLATION),
    Flag("text.min_translation_score", "--min-translation-score", group=FILTERS),
    Flag("text.translation_top_k", "--translation-top-k", group=FILTERS),
    Flag("model_copies", group="running"),
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

    add_config_arguments(
        parser,
        "JSON or YAML file with an AugmentConfig (--set and flags override)",
        "clip.score_threshold=0.2",
    )
    add_flags(parser, AugmentConfig, FLAGS)
    dec = parser.add_argument_group("decontamination")
    dec.add_argument(
        "--decontaminate",
        metavar="SPEC",
        help="keep the images of this evaluation dataset out of the output (world:DIR, "
        "shards:PATH, xm3600:DIR, ...: any `babelcap eval --data` spec); matched by image id "
        "and by perceptual hash, so resized or re-encoded copies are caught",
    )
    dec.add_argument(
        "--decontaminate-mode",
        choices=["drop", "flag"],
        default=None,
        help='drop matches to the dead letters (default) or keep them with split "eval_overlap"',
    )
    dec.add_argument(
        "--decontaminate-split",
        default="test",
        help="split of the evaluation dataset (default test; 'all' for every split)",
    )
    dec.add_argument(
        "--decontaminate-languages",
        default="en",
        help="caption languages to read the evaluation dataset in (its images are what count)",
    )
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")


def config_from_args(args: argparse.Namespace):
    """An AugmentConfig: the config file (optional), then `--set` overrides, then flags;
    `${NAME}` in values comes from the environment."""
    from babelcap.core.config import apply_overrides
    from babelcap.pipelines.options import AugmentConfig

    data = apply_overrides(read_config(args.config), args.overrides)
    data = apply_flags(data, args, AugmentConfig, FLAGS)
    config = AugmentConfig.from_dict(interpolate(data), source=args.config)
    if getattr(args, "decontaminate", None):
        section = {
            "fingerprints": eval_fingerprints(args, config.output),
            "mode": args.decontaminate_mode or "drop",
            "source": args.decontaminate,
        }
        config = config.updated({"decontaminate": section})
    elif getattr(args, "decontaminate_mode", None) and config.decontaminate is not None:
        config = config.updated({"decontaminate.mode": args.decontaminate_mode})
    return config


FINGERPRINTS_FILE = "_eval_fingerprints.parquet"  # "_": never read as a shard


def eval_fingerprints(args: argparse.Namespace, output: str) -> str:
    """Fingerprint the evaluation dataset `--decontaminate SPEC` into OUTPUT (any Beam
    filesystem) and return the file's path."""
    import io

    from apache_beam.io.filesystems import FileSystems

    from babelcap.core.lists import parse_list
    from babelcap.core.near_duplicates import Fingerprints
    from babelcap.training.eval_data import load_eval_data

    split = None if args.decontaminate_split == "all" else args.decontaminate_split
    data = load_eval_data(args.decontaminate, parse_list(args.decontaminate_languages), split=split)
    if not data.images:
        raise ValueError(f"--decontaminate {args.decontaminate}: no images (split {split})")
    buf = io.BytesIO()
    Fingerprints.of(data.images, data.image_ids or [None] * len(data.images)).save(buf)
    if "://" not in output:
        Path(output).mkdir(parents=True, exist_ok=True)
    path = FileSystems.join(output, FINGERPRINTS_FILE)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())
    print(f"decontaminate: {len(data.images)} images of {args.decontaminate} -> {path}")
    return path


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
    from babelcap.pipelines.publish import OutputLockedError, PublishGuardError
    from babelcap.pipelines.runner import run

    beam_args = [a for a in args.beam_args if a != "--"]
    try:
        run(config_from_args(args), beam_args=beam_args, workers=args.workers)
    except (OutputLockedError, PublishGuardError) as exc:  # one clear line, no traceback
        raise ValueError(str(exc)) from exc
    return 0

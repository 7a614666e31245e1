"""Thin entry point for Beam jobs: the augmentation pipeline on any Beam runner.

    python beam_runner.py --input gs://bucket/manifest.parquet --output gs://bucket/out \\
        --captioner gs://bucket/models/blip --translator gs://bucket/models/nllb-ct2 \\
        --languages pt,hi \\
        --runner DataflowRunner --project P --region europe-west4 \\
        --temp_location gs://bucket/tmp --setup_file ./setup.py

babelcap's own flags are those of `babelcap augment` (the same parser: `--config FILE`,
`--set key=value`, and the flags derived from `AugmentConfig`); every other flag is a Beam
pipeline option and passes through untouched. Without `--runner` it runs locally
(multi-process).
"""

from __future__ import annotations

import argparse
import logging
import sys

from babelcap.commands.augment import add_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a Beam option must never be read as an abbreviated babelcap flag
    )
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from babelcap.pipelines.runner import run

    run(config_from_args(args), beam_args=beam_args, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

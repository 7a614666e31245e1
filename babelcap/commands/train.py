"""`babelcap train`: adapt a CLIP model on shards (LiT + LoRA + gradient checkpointing, or
full training) from a YAML config and/or `--set section.key=value` flags."""

from __future__ import annotations

import argparse
import os

from babelcap.core.config import (
    Flag,
    add_config_arguments,
    add_flags,
    apply_flags,
    apply_overrides,
    interpolate,
    read_config,
)
from babelcap.core.lists import parse_list

# Flags for keys of the TrainConfig (babelcap.training.config): type and help from the field.
FLAGS: tuple[Flag, ...] = (
    Flag(
        "data.train",
        "--shards",
        append=True,
        help="training shards (file, folder, glob or URI; repeat); replaces data.train",
    ),
    Flag("run.output_dir", "--output", help="output folder"),
    Flag("model.name", "--model", help="model name / config JSON / folder"),
    Flag("model.pretrained", "--pretrained", help="pretrained tag or checkpoint"),
    Flag("optim.max_steps", "--steps"),
    Flag("method.name", "--method", help="training method: clip, capivara, alignment, continual"),
    Flag(
        "data.languages",
        "--languages",
        help='comma-separated languages ("pt, es"); for --method continual the order of '
        "arrival, e.g. pt,de,hi",
    ),
    Flag("run.resume", "--resume", help="continue from the output folder's newest checkpoint"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from babelcap.training.config import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train / adapt a CLIP model on shards (LiT, LoRA, checkpoints, export)",
        description="Train from a YAML config (see configs/). Several GPUs: "
        "`torchrun --nproc_per_node N -m babelcap.cli train ...`.",
    )
    add_config_arguments(parser, "YAML training config (configs/*.yaml)", "optim.lr=1e-4")
    add_flags(parser, TrainConfig, FLAGS)
    parser.add_argument("--world", help="world folder: the config's ${BABELCAP_WORLD}")
    parser.add_argument(
        "--eval-world",
        help="after training, evaluate base and trained model "
        "on this world's split and print mean recall per language",
    )
    parser.add_argument("--eval-languages", default="en,pt", help="languages for --eval-world")
    parser.set_defaults(func=_train)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of a `babelcap train` command line: the config file, then `--set`
    overrides, then flags; `--world W` is the variable `${BABELCAP_WORLD}` (the process
    environment is not changed)."""
    from babelcap.training.config import TrainConfig

    variables = {"BABELCAP_WORLD": os.path.abspath(args.world)} if args.world else None
    data = apply_overrides(read_config(args.config), args.overrides)
    data = apply_flags(data, args, TrainConfig, FLAGS)
    return TrainConfig.from_dict(interpolate(data, variables), source=args.config)


def _train(args: argparse.Namespace) -> int:
    from babelcap.training.runs import run

    cfg = config_from_args(args)
    if not cfg.data.train:
        raise ValueError("no training shards: set data.train in the config or pass --shards")
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun / accelerate only rank 0 reports
    print(
        f"trained {summary['steps']} steps ({summary['samples']} samples), final loss "
        f"{summary['final_loss']:.4f}; trainable {summary['parameters']['trainable']:,} of "
        f"{summary['parameters']['total']:,} parameters "
        f"({summary['trainable_percent']:.3f}%) -> {summary['output_dir']}"
    )
    splits = summary.get("splits")
    if splits:
        line = ", ".join(f"{n} {k}" for k, n in splits["trained"].items())
        skipped = ", ".join(f"{n} {k}" for k, n in splits["skipped"].items())
        print(f"rows trained on: {line}" + (f" (skipped: {skipped})" if skipped else ""))
    for key in ("export", "adapter"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    if args.eval_world and summary.get("export"):
        from babelcap.commands.eval import run_eval

        languages = parse_list(args.eval_languages)
        base = (
            cfg.model.name
            if cfg.model.pretrained is None
            else f"{cfg.model.name}@{cfg.model.pretrained}"
        )
        run_eval(
            {"before": base, "after": os.path.dirname(summary["export"])},
            world=args.eval_world,
            shards=None,
            languages=languages,
            split="test",
            out=os.path.join(cfg.run.output_dir, "eval"),
            zero_shot=True,
        )
    return 0

"""`babelcap train`: adapt a CLIP model on shards (LiT + LoRA + gradient checkpointing, or
full training) from a YAML config and/or `--set section.key=value` flags."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train / adapt a CLIP model on shards (LiT, LoRA, checkpoints, export)",
        description="Train from a YAML config (see configs/). Several GPUs: "
        "`torchrun --nproc_per_node N -m babelcap.cli train ...`.",
    )
    parser.add_argument("--config", help="YAML training config (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. optim.lr=1e-4",
    )
    parser.add_argument(
        "--shards",
        action="append",
        default=None,
        help="training shards (file, folder, glob or URI); replaces data.train",
    )
    parser.add_argument("--output", help="output folder (run.output_dir)")
    parser.add_argument("--model", help="model name / config JSON / folder (model.name)")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint (model.pretrained)")
    parser.add_argument("--steps", type=int, help="optimizer steps (optim.max_steps)")
    parser.add_argument(
        "--method", help="training method (method.name): clip, capivara, alignment, continual"
    )
    parser.add_argument(
        "--languages",
        help="comma-separated languages (data.languages); for "
        "--method continual the order of arrival, e.g. pt,de,hi",
    )
    parser.add_argument("--world", help="world folder; sets ${BABELCAP_WORLD} for the config")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if the output folder has checkpoints",
    )
    parser.add_argument(
        "--eval-world",
        help="after training, evaluate base and trained model "
        "on this world's split and print mean recall per language",
    )
    parser.add_argument("--eval-languages", default="en,pt", help="languages for --eval-world")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    if args.world:
        os.environ["BABELCAP_WORLD"] = os.path.abspath(args.world)
    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.train={json.dumps(args.shards)}")
    for flag, key in (
        ("output", "run.output_dir"),
        ("model", "model.name"),
        ("pretrained", "model.pretrained"),
        ("steps", "optim.max_steps"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.method:
        overrides.append(f"method.name={json.dumps(args.method)}")
    if args.languages:
        overrides.append(f"data.languages={json.dumps(args.languages.split(','))}")
    if args.no_resume:
        overrides.append("run.resume=false")

    from babelcap.training.config import load_config
    from babelcap.training.trainer import run

    cfg = load_config(args.config, overrides)
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
    for key in ("export", "adapter"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    if args.eval_world and summary.get("export"):
        from babelcap.commands.eval import run_eval

        languages = [s for s in args.eval_languages.split(",") if s]
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

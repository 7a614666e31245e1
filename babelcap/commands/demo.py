"""`babelcap demo`: the whole story on the built-in world (what `make demo` runs)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build the world, augment it with Beam, train LiT+LoRA, evaluate, write a report",
        description="Runs babelcap end to end on the built-in synthetic world. Every step is "
        "cached in --dir, so a second run only re-evaluates and re-writes the report.",
    )
    p.add_argument("--dir", default=".cache/demo", help="working folder (default .cache/demo)")
    p.add_argument("--images", type=int, default=1000, help="world size (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--languages", default="pt,es,de,hi", help="augmentation target languages")
    p.add_argument("--num-captions", type=int, default=5, help="synthetic captions per image")
    p.add_argument("--steps", type=int, default=None, help="training steps (config default)")
    p.add_argument("--workers", type=int, default=2, help="Beam worker processes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from babelcap.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            out=args.dir,
            images=args.images,
            seed=args.seed,
            languages=tuple(s for s in args.languages.split(",") if s),
            num_captions=args.num_captions,
            train_steps=args.steps,
            workers=args.workers,
        )
    )
    return 0

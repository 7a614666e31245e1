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
    from babelcap.demo import DemoConfig  # light: each step imports its libraries itself

    d = DemoConfig()  # the defaults, defined once
    p.add_argument("--dir", default=d.out, help=f"working folder (default {d.out})")
    p.add_argument("--images", type=int, default=d.images, help=f"world size (default {d.images})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--languages",
        default=",".join(d.languages),
        help=f"augmentation target languages (default {','.join(d.languages)})",
    )
    p.add_argument(
        "--num-captions",
        type=int,
        default=d.num_captions,
        help=f"synthetic captions per image (default {d.num_captions})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=d.train_steps,
        help=f"training steps (default {d.train_steps}; 0: the training config's)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="Beam worker processes")
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
            train_steps=args.steps or None,
            workers=args.workers,
        )
    )
    return 0

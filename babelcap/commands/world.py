"""`babelcap world build` and `babelcap world models`: the built-in synthetic world."""

from __future__ import annotations

import argparse
import time

from babelcap.core.lists import parse_list


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "world", help="build the synthetic world (images + parallel gold captions) and its models"
    )
    sub = parser.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")
    sub.required = True

    build = sub.add_parser("build", help="render a world: images, manifest, gold captions")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    build.add_argument(
        "--languages", default=None, help="comma-separated languages (default: en,pt,es,de,hi)"
    )
    build.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    build.add_argument(
        "--alt-text-noise",
        type=float,
        default=0.5,
        help="share of images whose alt-text is generic or another image's (default 0.5)",
    )
    build.add_argument(
        "--workers",
        type=int,
        default=None,
        help="render processes (default: CPU count for big worlds)",
    )
    build.set_defaults(func=_build)

    models = sub.add_parser("models", help="train the world's small models into DIR/models/")
    models.add_argument("--world", required=True, help="a built world folder")
    models.add_argument("--only", default=None, help="comma-separated model names")
    models.add_argument("--force", action="store_true", help="rebuild even when up to date")
    models.set_defaults(func=_models)


def _build(args: argparse.Namespace) -> int:
    from babelcap.world.build import build_world
    from babelcap.world.grammar import LANGUAGES

    start = time.perf_counter()
    try:
        meta = build_world(
            args.out,
            n_images=args.images,
            seed=args.seed,
            languages=parse_list(args.languages) or LANGUAGES,
            image_size=args.size,
            workers=args.workers,
            alt_text_noise=args.alt_text_noise,
        )
    except FileExistsError as exc:  # the CLI reports ValueErrors as one clear line
        raise ValueError(str(exc)) from exc
    counts = ", ".join(f"{k} {v}" for k, v in meta["counts"].items())
    print(
        f"world: {meta['n_images']} images ({counts}) of {meta['image_size']}px, "
        f"languages {','.join(meta['languages'])}, {meta['num_variants']} captions each, "
        f"seed {meta['seed']} -> {args.out} in {time.perf_counter() - start:.1f}s"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from babelcap.world.models import build_models

    results = build_models(args.world, only=parse_list(args.only) or None, force=args.force)
    for name, stamp in results.items():
        metrics = stamp.get("summary", {})
        shown = ", ".join(f"{k}={v}" for k, v in metrics.items() if not isinstance(v, dict | list))
        print(f"{name}: {stamp.get('seconds', 0)}s {shown}".rstrip())
    return 0

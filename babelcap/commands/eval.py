"""`babelcap eval`: retrieval recall@1/5/10 and mean recall per language (and zero-shot
shape/colour classification on a world), for one model or several side by side."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate CLIP models per language (retrieval, zero-shot), compare them"
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[LABEL=]MODEL[@PRETRAINED]",
        help="model name, config JSON or folder (e.g. a run's export/), optionally "
        "@checkpoint-or-tag; repeat to compare (e.g. --model before=W/models/clip-base "
        "--model after=runs/x/export)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="apply a peft adapter folder to the model with this label",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", help="evaluate on a world's gold captions")
    source.add_argument("--shards", action="append", help="evaluate on shards (images with bytes)")
    parser.add_argument("--languages", default="en,pt,es,de,hi", help="comma-separated")
    parser.add_argument("--split", default="test", help="split (default test)")
    parser.add_argument("--out", default=None, help="folder for results.json/.md/.png")
    parser.add_argument("--no-zero-shot", action="store_true", help="skip zero-shot classes")
    parser.set_defaults(func=_eval)


def _parse_models(items: Sequence[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for i, item in enumerate(items):
        label, _, spec = item.rpartition("=") if "=" in item else ("", "", item)
        models[label or (f"model{i + 1}" if len(items) > 1 else "model")] = spec
    return models


def run_eval(
    models: Mapping[str, str],
    world: str | None,
    shards: Sequence[str] | None,
    languages: Sequence[str],
    split: str,
    out: str | None,
    zero_shot: bool,
    adapters: Mapping[str, str] | None = None,
) -> dict:
    from babelcap.models.clip import load_clip
    from babelcap.training.evaluate import (
        evaluate,
        save_report,
        shard_eval_data,
        to_markdown,
        world_eval_data,
    )
    from babelcap.training.export import load_adapter

    if world:
        data = world_eval_data(world, languages, split)
    else:
        data = shard_eval_data(shards, languages, split=split if split != "all" else None)
    results = {}
    for label, spec in models.items():
        name, _, pretrained = spec.partition("@")
        bundle = load_clip(name, pretrained or None)
        evaluate_fn = evaluate
        if adapters and label in adapters:
            from babelcap.training import adapters as per_language

            if per_language.is_language_adapter_dir(adapters[label]):  # adapter/<lang>/ folders
                per_language.load_language_adapters(bundle.model, adapters[label])
                evaluate_fn = per_language.evaluate_with_adapters  # each language its adapter
            else:
                load_adapter(bundle, adapters[label])
        results[label] = evaluate_fn(bundle, data, name=label, zero_shot=zero_shot and bool(world))
    print(to_markdown(results), end="")
    if out:
        paths = save_report(results, out)
        print(f"report: {paths['json']}, {paths['markdown']}, {paths['chart']}")
    return results


def _eval(args: argparse.Namespace) -> int:
    adapters = dict(a.split("=", 1) for a in args.adapter)
    run_eval(
        _parse_models(args.model),
        args.world,
        args.shards,
        [s for s in args.languages.split(",") if s],
        args.split,
        args.out,
        not args.no_zero_shot,
        adapters,
    )
    return 0

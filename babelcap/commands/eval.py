"""`babelcap eval`: retrieval recall@1/5/10 and mean recall per language, their spread across
languages (and the zero-shot tasks the evaluation dataset provides, e.g. shape/colour on a
world), for one model or several side by side. The dataset is `--dataset KIND:PATH[,split]`
(repeat for several; `--data` is the same flag; see `babelcap.training.eval_data` and
`babelcap.training.benchmarks`); `--world W` means `--dataset world:W` and `--shards P` means
`--dataset shards:P`."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any


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
    source.add_argument(
        "--dataset",
        "--data",
        dest="datasets",
        action="append",
        metavar="KIND:PATH[,split][,key=value]",
        help="evaluation dataset (repeat for several): xm3600:DIR, xtd10:DIR[,images=COCO_ROOT] "
        "(a COCO root with train2014/ and val2014/), multi30k:DIR[,test_2017_mscoco]"
        "[,images=FLICKR30K_DIR or COCO_ROOT], karpathy:dataset_flickr30k.json[,test]"
        "[,images=DIR][,pt=flickr30k_pt.token], manifest:FILE.{jsonl,csv,parquet}, "
        "imagefolder:DIR, world:DIR, shards:PATH (gold captions; shards[source]:PATH other "
        "origins, shards[*]:PATH all), a plain shard path, or any reader registered under the "
        "entry-point group babelcap.eval_datasets",
    )
    source.add_argument("--world", metavar="DIR", help="same as --data world:DIR")
    source.add_argument("--shards", metavar="PATH", help="same as --data shards:PATH")
    parser.add_argument(
        "--languages",
        default=None,
        help="comma-separated (default: every language the dataset has captions or class names "
        "in; for a world, the languages it was built with)",
    )
    parser.add_argument("--split", default="test", help="split (default test; all: every split)")
    parser.add_argument("--max-images", type=int, default=None, help="first N images only")
    parser.add_argument(
        "--max-captions", type=int, default=None, help="at most N captions per image and language"
    )
    parser.add_argument(
        "--tie-rule",
        choices=["babelcap", "clip_benchmark"],
        default="babelcap",
        help="babelcap: ties with a wrong item are misses, identical captions count for each of "
        "their images; clip_benchmark: torch.topk decides, as CLIP_benchmark computes it (to "
        "compare with published tables)",
    )
    parser.add_argument(
        "--embedding-cache",
        metavar="DIR",
        default=None,
        help="keep image and caption embeddings here per model (keyed by the weights and the "
        "data's content) and reuse them on the next run",
    )
    parser.add_argument("--out", default=None, help="folder for results.json/.md/.png")
    parser.add_argument("--no-zero-shot", action="store_true", help="skip zero-shot classes")
    parser.add_argument(
        "--allow-contamination",
        action="store_true",
        help="evaluate even when evaluation images are in a model's recorded training data "
        "(refused by default; the report then says so in its first line)",
    )
    parser.set_defaults(func=_eval)


def _parse_models(items: Sequence[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for i, item in enumerate(items):
        label, _, spec = item.rpartition("=") if "=" in item else ("", "", item)
        models[label or (f"model{i + 1}" if len(items) > 1 else "model")] = spec
    return models


def data_spec(data: str | None, world: str | None = None, shards: str | None = None) -> str:
    """The dataset spec of `--dataset`, `--world W` (world:W) or `--shards P` (shards:P)."""
    given = [s for s in (data, world and f"world:{world}", shards and f"shards:{shards}") if s]
    if len(given) != 1:
        raise ValueError("give exactly one of --dataset, --world, --shards")
    return given[0]


def dataset_languages(spec: str) -> list[str] | None:
    """The languages to evaluate `spec` in when none are named: None (every language the
    dataset has, which babelcap's readers and shards work out) except for a world, whose
    reader needs them named: the languages its world.json says it was built with."""
    from babelcap.training.eval_data import parse_spec, split_options

    kind, _, arg = parse_spec(spec)
    if kind != "world":
        return None
    from babelcap.world.build import world_meta

    path, _, _ = split_options(arg)
    meta = world_meta(path)
    if meta is None:
        raise ValueError(f"{spec}: no world.json; build the world or give --languages")
    return list(meta["languages"])


def run_eval(
    models: Mapping[str, str],
    data: str | None = None,
    languages: Sequence[str] | None = None,
    split: str = "test",
    out: str | None = None,
    zero_shot: bool = True,
    adapters: Mapping[str, str] | None = None,
    *,
    world: str | None = None,
    shards: str | None = None,
    max_images: int | None = None,
    allow_contamination: bool = False,
    max_captions: int | None = None,
    tie_rule: str = "babelcap",
    embedding_cache: str | None = None,
) -> dict:
    """Evaluate `models` (label -> spec) on the dataset `data` (or `world` / `shards`) in
    `languages` (None: every language it has, `dataset_languages`), each after checking the
    dataset's images against what the model's run recorded it trained on (with an adapter: the
    adapter run's record, which includes its base model's)."""
    from babelcap.models.clip import load_clip
    from babelcap.training.contamination import load_run_index
    from babelcap.training.eval_data import load_eval_data
    from babelcap.training.evaluate import EmbeddingCache, evaluate, save_report, to_markdown
    from babelcap.training.export import load_adapter

    spec = data_spec(data, world, shards)
    dataset = load_eval_data(
        spec,
        dataset_languages(spec) if languages is None else languages,
        split=None if split == "all" else split,
        max_images=max_images,
        max_captions=max_captions,
    )
    if dataset.info.get("missing_images"):  # skipped by the reader: say so beside the figures
        print(
            f"note: {dataset.info['missing_images']} images listed by {spec} are not in its "
            "image folder and are not evaluated (results.json: reader.missing_images)"
        )
    cache = EmbeddingCache(embedding_cache) if embedding_cache else None
    results = {}
    for label, spec in models.items():
        name, _, pretrained = spec.partition("@")
        bundle = load_clip(name, pretrained or None)
        evaluate_fn: Any = evaluate
        extra: dict[str, Any] = {"tie_rule": tie_rule, "cache": cache}
        training_images: Any = "recorded"
        if adapters and label in adapters:
            training_images = load_run_index(adapters[label]) or "recorded"
            from babelcap.training import adapters as per_language

            if per_language.is_language_adapter_dir(adapters[label]):  # adapter/<lang>/ folders
                per_language.load_language_adapters(bundle.model, adapters[label])
                evaluate_fn = per_language.evaluate_with_adapters  # each language its adapter
                # it evaluates language by language with babelcap's rule and no embedding
                # cache (the weights hold every language's adapter, not which one is active)
                if tie_rule != "babelcap":
                    raise ValueError("per-language adapters are evaluated with --tie-rule babelcap")
                extra = {}
            else:
                load_adapter(bundle, adapters[label])
        results[label] = evaluate_fn(
            bundle,
            dataset,
            name=label,
            zero_shot=zero_shot,
            training_images=training_images,
            allow_contamination=allow_contamination,
            **extra,
        )
    print(to_markdown(results), end="")
    if out:
        paths = save_report(results, out)
        print(
            f"report: {paths['json']}, {paths['markdown']}, {paths['chart']}, "
            f"{paths['clip_benchmark']}/ (CLIP_benchmark result files)"
        )
    return results


def _eval(args: argparse.Namespace) -> int:
    from babelcap.core.lists import parse_list

    adapters = dict(a.split("=", 1) for a in args.adapter)
    specs = args.datasets or [data_spec(None, args.world, args.shards)]
    for i, spec in enumerate(specs):
        out = args.out
        if out and len(specs) > 1:  # one report folder per dataset
            out = os.path.join(out, f"{i + 1}-{_slug(spec)}")
        if len(specs) > 1:
            print(f"## {spec}\n")
        run_eval(
            _parse_models(args.model),
            spec,
            parse_list(args.languages) or None,  # none named: every language the data has
            args.split,
            out,
            not args.no_zero_shot,
            adapters,
            max_images=args.max_images,
            allow_contamination=args.allow_contamination,
            max_captions=args.max_captions,
            tie_rule=args.tie_rule,
            embedding_cache=args.embedding_cache,
        )
    return 0


def _slug(spec: str) -> str:
    kind = spec.split(":", 1)[0] if ":" in spec else "shards"
    return re.sub(r"[^\w.-]+", "_", kind)[:40] or "dataset"

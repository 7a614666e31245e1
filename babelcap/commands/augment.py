"""`babelcap augment`: images -> captioned, translated, filtered Parquet shards (Apache Beam).

    babelcap augment --input world/manifest.jsonl --captioner world/models/captioner \\
        --translator world/models/translator/ct2 --languages pt,es --output out/ \\
        [--num-captions 10] [--workers 2] [--filter min_words=3] [-- BEAM OPTIONS...]

Everything after `--` goes to Beam untouched (e.g. `-- --runner DataflowRunner --project P
--region R --temp_location gs://B/tmp --setup_file ./setup.py`). `beam_runner.py` builds the
same pipeline from the same flags (it is the same parser).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The augment flags (shared with beam_runner.py)."""
    io = parser.add_argument_group("input / output")
    io.add_argument("--config", help="JSON or YAML file with an AugmentConfig (flags override)")
    io.add_argument("--input", help="image folder, manifest (.jsonl/.csv/.parquet) or .tar shards")
    io.add_argument(
        "--input-format", default=None, choices=["auto", "folder", "manifest", "webdataset"]
    )
    io.add_argument("--output", help="output folder (local or gs://)")
    io.add_argument("--source-language", default=None, help="language of source captions (en)")
    io.add_argument(
        "--store-image",
        default=None,
        choices=["bytes", "reencode", "path", "none"],
        help="what the `image` column holds (default: the original bytes)",
    )
    io.add_argument(
        "--resize", type=int, default=None, help="with --store-image reencode: max side"
    )
    io.add_argument("--max-image-pixels", type=int, default=None, help="decompression-bomb limit")
    io.add_argument("--num-shards", type=int, default=None, help="fixed number of shards")
    io.add_argument("--rows-per-shard", type=int, default=None, help="target rows per shard")
    io.add_argument("--seed", type=int, default=None)

    cap = parser.add_argument_group("captioning")
    cap.add_argument("--captioner", help="image-to-text model: hub name or path (gs:// ok)")
    cap.add_argument("--captioner-class", default=None, help="e.g. Blip2ForConditionalGeneration")
    cap.add_argument("--num-captions", type=int, default=None, help="captions per image (10)")
    cap.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt prefix (repeat; default: CAPIVARA's ten)",
    )
    cap.add_argument("--sampling", action="store_true", help="sample captions (seeded per image)")
    cap.add_argument("--caption-batch-size", type=int, default=None)
    cap.add_argument("--max-new-tokens", type=int, default=None)

    tr = parser.add_argument_group("translation")
    tr.add_argument("--translator", help="translators (CTranslate2) model folder")
    tr.add_argument("--languages", default="", help="target languages, comma-separated")
    tr.add_argument("--translate-batch-size", type=int, default=None)

    flt = parser.add_argument_group("filters and CLIP")
    flt.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="text filter setting, e.g. min_words=3, max_chars=200, "
        "near_duplicate_threshold=0.8, min_keep=2, language_check=false",
    )
    flt.add_argument("--clip", help="open_clip model (name, config JSON or folder) for scores")
    flt.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag / file")
    flt.add_argument("--clip-threshold", type=float, default=None, help="keep score >= this")
    flt.add_argument("--clip-top-k", type=int, default=None, help="keep the k best per image")
    flt.add_argument("--embed-images", action="store_true", help="write CLIP image embeddings")

    run = parser.add_argument_group("running")
    run.add_argument("--device", default=None, help="auto | cpu | cuda (models)")
    run.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _load_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def config_from_args(args: argparse.Namespace):
    """An AugmentConfig from a config file (optional) overridden by flags."""
    from babelcap.pipelines.options import (
        AugmentConfig,
        CaptionerConfig,
        ClipConfig,
        TextFilterConfig,
        TranslatorConfig,
        parse_languages,
    )

    base = AugmentConfig.from_dict(_load_file(args.config)) if args.config else None

    def pick(flag: Any, current: Any) -> Any:
        return current if flag is None else flag

    top: dict[str, Any] = dataclasses.asdict(base) if base else {}
    top = {k: v for k, v in top.items() if k not in ("captioner", "translator", "clip", "text")}
    for key, flag in (
        ("input", args.input),
        ("output", args.output),
        ("input_format", args.input_format),
        ("source_language", args.source_language),
        ("store_image", args.store_image),
        ("resize_max_side", args.resize),
        ("max_image_pixels", args.max_image_pixels),
        ("num_shards", args.num_shards),
        ("rows_per_shard", args.rows_per_shard),
        ("seed", args.seed),
    ):
        if flag is not None:
            top[key] = flag
    if not top.get("input") or not top.get("output"):
        raise ValueError("--input and --output are required (or give them in --config)")
    if args.languages:
        top["languages"] = parse_languages(args.languages)

    captioner = base.captioner if base else None
    if args.captioner:
        captioner = CaptionerConfig(model=args.captioner)
    if captioner is not None:
        changes = {
            "model_class": args.captioner_class,
            "num_captions": args.num_captions,
            "batch_size": args.caption_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "device": args.device,
            "prompts": tuple(args.prompt) if args.prompt else None,
            "sampling": True if args.sampling else None,
        }
        captioner = dataclasses.replace(
            captioner, **{k: v for k, v in changes.items() if v is not None}
        )

    translator = base.translator if base else None
    if args.translator:
        translator = TranslatorConfig(model=args.translator)
    if translator is not None:
        changes = {"batch_size": args.translate_batch_size, "device": args.device}
        translator = dataclasses.replace(
            translator, **{k: v for k, v in changes.items() if v is not None}
        )

    clip = base.clip if base else None
    if args.clip:
        clip = ClipConfig(model=args.clip)
    if clip is not None:
        changes = {
            "pretrained": args.clip_pretrained,
            "score_threshold": args.clip_threshold,
            "top_k": args.clip_top_k,
            "device": args.device,
            "embed_images": True if args.embed_images else None,
        }
        clip = dataclasses.replace(clip, **{k: v for k, v in changes.items() if v is not None})

    text = base.text if base else TextFilterConfig()
    names = {f.name for f in dataclasses.fields(TextFilterConfig)}
    for item in args.filter:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in names or not value:
            raise ValueError(f"--filter {item!r}: expected KEY=VALUE with KEY in {sorted(names)}")
        text = dataclasses.replace(text, **{key: _coerce(value.strip())})

    return AugmentConfig(**top, captioner=captioner, translator=translator, clip=clip, text=text)


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

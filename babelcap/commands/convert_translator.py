"""`babelcap convert-translator`: a Hugging Face translation model -> CTranslate2 directory."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-translator",
        help="convert a Hugging Face Marian/M2M100/NLLB model to CTranslate2",
        description="Wraps CTranslate2's converter, copies the tokenizer files and writes "
        "babelcap-translator.json (source model, family, languages) for the engine.",
    )
    parser.add_argument("model", help="hub id (e.g. Helsinki-NLP/opus-mt-en-ROMANCE) or folder")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--quantization",
        default=None,
        help="weights type: int8, int8_float16, float16, ... (default: as is)",
    )
    parser.add_argument(
        "--languages",
        default=None,
        help="comma-separated language codes the model serves (default: from its tokenizer)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from babelcap.core.lists import parse_list
    from babelcap.translators import convert_model, read_model_info

    langs = parse_list(args.languages) or None
    try:
        out = convert_model(
            args.model, args.out, quantization=args.quantization, languages=langs, force=args.force
        )
    except FileExistsError as exc:
        raise ValueError(str(exc)) from exc
    info = read_model_info(out)
    langs_txt = "/".join(",".join(x) for x in (info.source_languages, info.target_languages) if x)
    print(
        f"convert-translator: {args.model} ({info.family}) -> {out}"
        + (f", languages {langs_txt}" if langs_txt else "")
    )
    return 0

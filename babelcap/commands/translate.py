"""`babelcap translate`: translate text files (one sentence per line) with a CTranslate2 model."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from itertools import islice
from typing import TextIO


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "translate",
        help="translate lines of text with a CTranslate2 model (Marian, M2M100, NLLB)",
        description="Translate one sentence per line, streaming in chunks; empty lines stay "
        "empty and the output has exactly one line per input line.",
    )
    parser.add_argument("--model", required=True, help="CTranslate2 model directory")
    parser.add_argument("--src", required=True, help="source language (pt, por, pt-BR, por_Latn)")
    parser.add_argument("--tgt", required=True, help="target language")
    parser.add_argument("--input", default="-", help="input file (default: stdin)")
    parser.add_argument("--output", default="-", help="output file (default: stdout)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument(
        "--compute-type",
        default="auto",
        help="auto (int8 on CPU, int8_float16 on GPU), float32, int8, ...",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: CTranslate2's)")
    parser.add_argument("--beam-size", type=int, default=1, help="1 (default) is greedy")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1024,
        help="tokens per CTranslate2 batch (default 1024)",
    )
    parser.add_argument(
        "--chunk", type=int, default=2000, help="lines read and translated at a time (default 2000)"
    )
    parser.add_argument("--cache", default=None, help="SQLite translation memory file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _chunks(lines: TextIO, size: int) -> Iterator[list[str]]:
    it = (line.rstrip("\n").rstrip("\r") for line in lines)
    while chunk := list(islice(it, size)):
        yield chunk


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from babelcap.translators import Translator, TranslatorConfig

    translator = Translator(
        TranslatorConfig(
            model_dir=args.model,
            device=args.device,
            compute_type=args.compute_type,
            intra_threads=args.threads,
            beam_size=args.beam_size,
            max_batch_size=args.max_batch_tokens,
            cache_path=args.cache,
        )
    )
    # Fail on bad languages before reading any input.
    translator.load().translate([], args.src, args.tgt)
    with contextlib.ExitStack() as stack:
        src = (
            sys.stdin
            if args.input == "-"
            else stack.enter_context(open(args.input, encoding="utf-8"))
        )
        dst = (
            sys.stdout
            if args.output == "-"
            else stack.enter_context(open(args.output, "w", encoding="utf-8"))
        )
        # disable=None: a bar only when stderr is a terminal (not in logs and pipes)
        bar = stack.enter_context(
            tqdm(
                desc="translate",
                unit="line",
                file=sys.stderr,
                disable=True if args.no_progress else None,
            )
        )
        for chunk in _chunks(src, args.chunk):
            for line in translator.translate(chunk, args.src, args.tgt):
                dst.write(line.replace("\n", " ") + "\n")
            dst.flush()
            bar.update(len(chunk))
    stats = translator.stats
    print(
        f"translate: {stats.translated} translated, {stats.cache_hits} from memory, "
        f"{stats.duplicates} duplicates, {stats.empty} empty, {stats.split} split, "
        f"{stats.truncated} truncated",
        file=sys.stderr,
    )
    return 0

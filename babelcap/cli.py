"""The `babelcap` command line: a thin layer that parses flags and calls library code.

Each subcommand lives in `babelcap/commands/<name>.py` and exposes
`register(subparsers) -> None`; heavy imports (torch, beam) happen inside the handlers so
`babelcap --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from babelcap import __version__

# Order here is the order in `babelcap --help`.
COMMAND_MODULES = [
    "world",
    "augment",
    "inspect",
    "translate",
    "convert_translator",
    "train",
    "eval",
    "export_wds",
    "demo",
]

OWN_LOGGERS = ("babelcap",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="babelcap",
        description="Multilingual image-text data with Beam + CTranslate2, and cheap CLIP "
        "language adaptation (LiT, LoRA, per-language adapters, continual learning).",
    )
    parser.add_argument("--version", action="version", version=f"babelcap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"babelcap.commands.{name}").register(sub)
    return parser


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (`babelcap ... | head`), so that a
    BrokenPipeError from elsewhere (a worker's pipe) is never mistaken for it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    try:
        import select

        poller = select.poll()
    except (ImportError, AttributeError):  # no poll (Windows): the pipe error was stdout's
        return True
    poller.register(fd, select.POLLOUT)
    events = dict(poller.poll(0)).get(fd, 0)
    return bool(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL))


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every command is quiet when its reader goes away (`babelcap translate
    ... | head`): the command stops, stdout is pointed at /dev/null so the interpreter's flush
    at exit stays quiet, and the exit status is 0 (the Python docs' recipe for SIGPIPE)."""
    try:
        try:
            return _main(argv)
        finally:
            # Flushed here, where a closed pipe can still be caught; at exit the interpreter
            # would print "Exception ignored ... BrokenPipeError".
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        if not _reader_gone():
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Libraries (open_clip, Beam) log chatty INFO lines on the root logger: show their
    # warnings only, and babelcap's own packages at INFO (everything with -v).
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as exc:
        # Library code raises these for bad user input; show the message, not a traceback.
        if args.verbose:
            raise
        print(f"babelcap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

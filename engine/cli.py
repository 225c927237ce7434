"""The `crystallab` command line (also `python -m engine`).

Each engine module that owns a command exposes ``add_cli(subparsers)`` which registers its sub-command(s) and
sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code. User errors
(`CrystallabError`) are printed as one readable line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import CrystallabError

# Modules that register sub-commands, in the order they appear in `crystallab --help`.
COMMAND_MODULES = (
    "engine.canonical",  # cif canonicalize / tokenize
    "engine.datasets",  # data build / import-tokens / corpus / inspect
    "engine.checkpoint",  # ckpt inspect
    "engine.trainer",  # train
    "engine.sampler",  # sample
    "engine.postprocess",  # postprocess
    "engine.evaluate",  # evaluate
    "engine.sweeps",  # sweep
    "engine.dashboard",  # dashboard
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crystallab",
        description="A lab for crystal-structure language models (CrystaLLM-compatible).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except CrystallabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

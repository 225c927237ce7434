"""The `crystallab` command line (also `python -m engine`).

Each engine module that owns a command exposes ``add_cli(subparsers)`` which registers its sub-command(s) and
sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code. User errors
(`CrystallabError`) are printed as one readable line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.lab.errors import CrystallabError

# Command name -> (module that registers it via ``add_cli``, one-line help). Only the module of the command being
# run is imported, so `crystallab data inspect` does not pay for torch and `crystallab --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "cif": ("engine.crystal.canonical", "canonical CrystaLLM CIF text and token ids"),
    "data": ("engine.data.datasets", "build, import and inspect token datasets"),
    "ckpt": ("engine.models.checkpoint", "inspect checkpoints"),
    "train": ("engine.train.trainer", "train a model (scratch, fine-tune or resume)"),
    "distill": ("engine.train.chain", "distil a teacher into smaller students: chains, sequence-level data, reports"),
    "sample": ("engine.sample.sample_sets", "sample CIFs from a checkpoint for a composition / space-group prompt"),
    "infill": ("engine.sample.infill", "rank replacements for a hidden element, or regenerate a site / the cell"),
    "mcts": ("engine.sample.mcts", "scored decoding: Monte Carlo tree search rewarded by E_hull, energy or your scorer"),
    "postprocess": ("engine.crystal.postprocess", "post-process generated texts into CIFs"),
    "evaluate": ("engine.evaluate.evaluation", "check generated CIFs and compute set metrics"),
    "csp": ("engine.evaluate.csp", "crystal-structure-prediction benchmark: match rate and RMSE against known structures"),
    "hull": ("engine.evaluate.hull", "build, import and inspect reference convex hulls for E_hull"),
    "stability": ("engine.evaluate.stability", "relax structures with an ML potential; E_hull against a hull"),
    "ipt": ("engine.evaluate.ipt", "translation-invariance probe (IPT) of checkpoints on held-out structures"),
    "sweep": ("engine.evaluate.sweeps", "sample and evaluate checkpoints x prompts x sampling settings; resumable"),
    "dashboard": ("engine.app.dashboard", "start the Streamlit lab (127.0.0.1:8501 by default)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command`` only that command's module is imported (others get a stub)."""
    parser = argparse.ArgumentParser(
        prog="crystallab",
        description="A lab for crystal-structure language models (CrystaLLM-compatible).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).add_cli(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _command_in(argv: list[str]) -> str | None:
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
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

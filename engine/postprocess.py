"""CrystaLLM post-processing: turn generated (model-view) text into a CIF that pymatgen reads with full symmetry.

A model writes a *semi-symmetrized* CIF: the space-group symbol, the asymmetric-unit sites and a single identity
row in the symmetry-operator loop. Post-processing (crystallm-format.md section 6) does two edits:

1. unless the space group is ``P1`` (``P 1``), replace the exact identity-only block
   ``loop_ / _symmetry_equiv_pos_site_id / _symmetry_equiv_pos_as_xyz / 1 'x, y, z'`` with the full operator list
   of that space group (pymatgen ``SpaceGroup(symbol).symmetry_ops`` as ``x, y, z`` strings, ids 1..n, identity
   first, the rest sorted so output is deterministic; upstream writes them in set order);
2. remove the atom-properties loop (``_atom_type_*``) between the ``data_`` line and the H-M line.

Unlike upstream, which writes a warning line into the CIF when this fails, failures are returned as a short
``reason`` category plus a readable ``error`` and no CIF: ``not_cif`` (no ``data_`` line), ``truncated`` (the
text stops before its atom-site loop is complete: the token limit cut it), ``no_spacegroup`` (no H-M line),
``unknown_spacegroup`` (pymatgen does not know the symbol), ``no_symmetry_loop`` (no symmetry-operator loop).
A text whose symmetry loop already lists operators other than the identity block is left as written.

CLI: ``crystallab postprocess IN OUT`` (a file or a folder of raw texts).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engine.errors import InputError
from engine.fsutil import atomic_write_text

_HM_RE = re.compile(r"_symmetry_space_group_name_H-M[ \t]+(?:'([^'\n]+)'|(\S+))")
_IDENTITY_BLOCK_RE = re.compile(
    r"loop_[ \t]*\n[ \t]*_symmetry_equiv_pos_site_id[ \t]*\n[ \t]*_symmetry_equiv_pos_as_xyz[ \t]*\n"
    r"[ \t]*1[ \t]+'x, y, z'[ \t]*(?=\n|$)"
)
# The atom-properties loop: `loop_` + the four `_atom_type_*` tags + its rows, up to the H-M line.
_ATOM_PROPS_RE = re.compile(
    r"loop_[ \t]*\n(?:[ \t]*_atom_type_\w+[ \t]*\n)+(?:(?![ \t]*_symmetry_space_group_name_H-M).*\n)*?"
    r"(?=[ \t]*_symmetry_space_group_name_H-M)"
)
_P1_SYMBOLS = frozenset({"P1", "P 1"})


@dataclass(frozen=True)
class PostprocessResult:
    """Outcome of post-processing one generated text; exactly one of ``cif`` and ``error`` is set."""

    cif: str | None
    """The post-processed CIF, or None when post-processing failed."""
    error: str | None
    """Readable description of the failure, or None."""
    spacegroup: str | None
    """The H-M symbol as written in the text (None when there is no H-M line)."""
    reason: str | None = None
    """Short failure category (``truncated``, ``unknown_spacegroup``, ...), or None on success."""


def stated_spacegroup(text: str) -> str | None:
    """The H-M symbol written on the ``_symmetry_space_group_name_H-M`` line (quotes removed), or None."""
    match = _HM_RE.search(text)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).strip()


def find_truncation(text: str) -> str | None:
    """Say why ``text`` looks cut off before its end, or return None when it is complete.

    A complete CIF has an ``_atom_site_*`` loop with at least one row, every row has one value per tag, and the
    last row ends with a newline (a model stops after two newlines; a text cut by the token limit does not).
    """
    lines = text.split("\n")
    tags: list[str] = []
    start = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("_atom_site_") and i > 0 and (tags or lines[i - 1].strip() == "loop_"):
            tags.append(stripped)
            start = i + 1
        elif tags:
            break
    if not tags or start is None:
        return "the text ends before its atom-site loop"
    rows = []
    for line in lines[start:]:
        stripped = line.strip()
        if not stripped or stripped.startswith(("loop_", "_", "data_", "#")):
            break
        rows.append(stripped)
    if not rows:
        return "the atom-site loop has no rows"
    if len(rows[-1].split()) < len(tags):
        return f"the last atom-site row {rows[-1]!r} has fewer than {len(tags)} values"
    if start + len(rows) >= len(lines):  # the last row is the last line: no newline after it
        return f"the last atom-site row {rows[-1]!r} is not followed by a newline"
    return None


@lru_cache(maxsize=256)
def symmetry_operator_strings(symbol: str) -> tuple[str, ...]:
    """All symmetry operators of space group ``symbol`` as ``x, y, z`` strings, identity first then sorted.

    Translations are wrapped into [0, 1) (fractional coordinates).

    Raises:
        ValueError: pymatgen does not know the symbol.
    """
    from pymatgen.core.operations import SymmOp
    from pymatgen.symmetry.groups import SpaceGroup

    # Wrapping translations into [0, 1) gives one canonical string per operator (`z+1/2`, never `z-1/2`);
    # pymatgen returns some operators shifted by a lattice vector, and which ones changed between versions.
    ops = {
        SymmOp.from_rotation_and_translation(op.rotation_matrix, op.translation_vector % 1.0).as_xyz_str()
        for op in SpaceGroup(symbol).symmetry_ops
    }
    ops.discard("x, y, z")
    return ("x, y, z", *sorted(ops))


def _operator_block(symbol: str) -> str:
    rows = "\n".join(f"{i} '{op}'" for i, op in enumerate(symmetry_operator_strings(symbol), start=1))
    return f"loop_\n_symmetry_equiv_pos_site_id\n_symmetry_equiv_pos_as_xyz\n{rows}"


def _failure(reason: str, error: str, spacegroup: str | None = None) -> PostprocessResult:
    return PostprocessResult(cif=None, error=error, spacegroup=spacegroup, reason=reason)


def postprocess(text: str) -> PostprocessResult:
    """Post-process one generated text the way CrystaLLM does, recording failures instead of writing them.

    Args:
        text: raw generated text (model view: ``data_`` line, atom-properties loop, semi-symmetrized CIF).

    Returns:
        A `PostprocessResult`; on failure ``cif`` is None and ``reason``/``error`` say why.
    """
    if not re.search(r"^[ \t]*data_\S*", text, flags=re.MULTILINE):
        return _failure("not_cif", "the text has no 'data_' line, so it is not a CIF")
    symbol = stated_spacegroup(text)
    truncation = find_truncation(text)
    if truncation is not None:
        return _failure("truncated", f"truncated text: {truncation}", symbol)
    if symbol is None:
        return _failure("no_spacegroup", "the text has no '_symmetry_space_group_name_H-M' line")
    cif = text
    if symbol not in _P1_SYMBOLS:
        try:
            block = _operator_block(symbol)
        except ValueError:
            return _failure("unknown_spacegroup", f"unknown space-group symbol {symbol!r}", symbol)
        if _IDENTITY_BLOCK_RE.search(cif):
            cif = _IDENTITY_BLOCK_RE.sub(lambda _m: block, cif, count=1)
        elif "_symmetry_equiv_pos_as_xyz" not in cif:
            return _failure("no_symmetry_loop", "the text has no symmetry-operator loop", symbol)
    cif = _ATOM_PROPS_RE.sub("", cif, count=1)
    return PostprocessResult(cif=cif, error=None, spacegroup=symbol)


def _inputs(src: Path) -> list[Path]:
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".txt", ".cif"))
        if not files:
            raise InputError(f"{src} holds no .txt or .cif files: point IN at a folder of generated texts")
        return files
    if not src.is_file():
        raise InputError(f"{src} does not exist: give a generated-text file or a folder of them")
    return [src]


def _run_cli(args: argparse.Namespace) -> int:
    src, out = Path(args.input), Path(args.output)
    files = _inputs(src)
    to_folder = src.is_dir() or out.is_dir()
    failures: list[dict] = []
    for path in files:
        result = postprocess(path.read_text(encoding="utf-8", errors="replace"))
        if result.cif is None:
            failures.append({"file": path.name, "reason": result.reason, "error": result.error})
            print(f"{path.name}: {result.reason}: {result.error}", file=sys.stderr)
            continue
        atomic_write_text(out / f"{path.stem}.cif" if to_folder else out, result.cif)
    if to_folder:
        # Rewritten whole (not appended) so a rerun over the same folder does not list old failures twice.
        lines = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in failures)
        atomic_write_text(out / "postprocess_failures.jsonl", lines)
    print(f"post-processed {len(files) - len(failures)} of {len(files)} file(s) into {out}", file=sys.stderr)
    return 0 if len(failures) < len(files) else 1


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab postprocess IN OUT``."""
    p = subparsers.add_parser(
        "postprocess",
        help="post-process generated texts into CIFs (full symmetry operators, no atom-properties loop)",
        description=(
            "IN is a generated-text file or a folder of them (.txt/.cif); OUT is a file or a folder. "
            "Failures are listed on stderr and, for a folder, in OUT/postprocess_failures.jsonl."
        ),
    )
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.set_defaults(func=_run_cli)

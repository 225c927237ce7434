"""CrystaLLM post-processing: turn generated (model-view) text into a CIF that pymatgen reads with full symmetry.

A model writes a *semi-symmetrized* CIF: the space-group symbol, the asymmetric-unit sites and a single identity
row in the symmetry-operator loop. Post-processing (crystallm-format.md section 6) does two edits:

1. unless the space group is ``P1`` (``P 1``), replace the exact identity-only block
   ``loop_ / _symmetry_equiv_pos_site_id / _symmetry_equiv_pos_as_xyz / 1 'x, y, z'`` with the full operator list
   of that space group (pymatgen ``SpaceGroup(symbol).symmetry_ops`` as ``x, y, z`` strings, ids 1..n, identity
   first, the rest sorted so output is deterministic; upstream writes them in set order);
2. remove the atom-properties loop (``_atom_type_*``) between the ``data_`` line and the H-M line.

Unlike upstream, which writes a warning line into the CIF when this fails, failures are returned as a short
``reason`` category plus a readable ``error`` and no CIF:

- ``not_cif``: no ``data_`` line;
- ``truncated``: generation was cut by its token limit (``max_new_tokens``) before the CIF ended: the sampler says
  so (``finished=False``), or, for a text of unknown origin, it stops inside its atom-site loop without the blank
  line a model writes at the end of a CIF;
- ``malformed``: the CIF ended (blank line, or more text follows) with an incomplete atom-site loop (none, no
  rows, or a last row with fewer values than tags): the model wrote a broken CIF, a longer budget will not help;
- ``several_blocks``: the text holds more than one ``data_`` block (the model ran on into a second CIF);
- ``no_spacegroup`` (no H-M line), ``unknown_spacegroup`` (pymatgen does not know the symbol),
  ``no_symmetry_loop`` (no symmetry-operator loop).

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

from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_text

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
_DATA_LINE_RE = re.compile(r"^[ \t]*data_(\S*)", re.MULTILINE)


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


def _ended(text: str) -> bool:
    """Whether ``text`` ends with a blank line: how a model ends a CIF (it stops after two newlines)."""
    return re.search(r"\n[ \t]*\n\s*\Z", text) is not None


def _loop_problem(text: str) -> tuple[str, bool] | None:
    """What is incomplete about the atom-site loop, and whether the text stops right there; None when complete.

    Returns:
        ``(detail, cut)``: ``cut`` is True when the text looks cut by the token limit: it stops mid-line, or
        nothing but whitespace follows the problem and the text does not end with the blank line a model writes.
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
    ended = _ended(text)
    mid_line = not text.endswith("\n")
    if not tags or start is None:
        return "the text ends before its atom-site loop", not ended
    rows = []
    for line in lines[start:]:
        stripped = line.strip()
        if not stripped or stripped.startswith(("loop_", "_", "data_", "#")):
            break
        rows.append(stripped)
    cut = mid_line or (not ended and not any(line.strip() for line in lines[start + len(rows) :]))
    if not rows:
        return "the atom-site loop has no rows", cut
    if len(rows[-1].split()) < len(tags):
        return f"the last atom-site row {rows[-1]!r} has fewer than {len(tags)} values", cut
    if start + len(rows) >= len(lines):  # the last row is the last line: no newline after it
        return f"the last atom-site row {rows[-1]!r} is not followed by a newline", True
    return None


def find_truncation(text: str) -> str | None:
    """Say why the atom-site loop of ``text`` is incomplete, or return None when it is complete.

    A complete CIF has an ``_atom_site_*`` loop with at least one row, every row has one value per tag, and the
    last row ends with a newline. Whether an incomplete text was cut or written broken is `incomplete_reason`'s
    question.
    """
    problem = _loop_problem(text)
    return None if problem is None else problem[0]


def incomplete_reason(text: str, finished: bool | None = None) -> tuple[str, str] | None:
    """Classify an incomplete atom-site loop as ``truncated`` or ``malformed``; None when the loop is complete.

    Args:
        text: a generated text or a post-processed CIF.
        finished: whether generation stopped at the CIF end (the sampler's ``finished``); None when unknown, in
            which case a text that stops inside its loop without a final blank line counts as cut.

    Returns:
        ``(reason, error)`` with a readable error that says what to do.
    """
    problem = _loop_problem(text)
    if problem is None:
        return None
    detail, cut = problem
    if finished is False or (finished is None and cut):
        return "truncated", f"truncated text: {detail}; generation stopped there (raise max_new_tokens)"
    return "malformed", f"malformed CIF: {detail}, yet the CIF ended there (the model wrote a broken atom-site loop)"


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


def postprocess(text: str, finished: bool | None = None) -> PostprocessResult:
    """Post-process one generated text the way CrystaLLM does, recording failures instead of writing them.

    Args:
        text: raw generated text (model view: ``data_`` line, atom-properties loop, semi-symmetrized CIF).
        finished: whether generation stopped at the CIF end (`engine.sample.sampler.Generation.finished`); False makes
            the text a ``truncated`` failure whatever it holds, None (unknown) judges from the text alone.

    Returns:
        A `PostprocessResult`; on failure ``cif`` is None and ``reason``/``error`` say why.
    """
    headers = _DATA_LINE_RE.findall(text)
    if not headers:
        return _failure("not_cif", "the text has no 'data_' line, so it is not a CIF")
    symbol = stated_spacegroup(text)
    if finished is False:
        return _failure(
            "truncated",
            "truncated text: generation stopped at its token limit before the CIF ended (raise max_new_tokens)",
            symbol,
        )
    if len(headers) > 1:
        names = ", ".join(f"data_{h}" for h in headers[:3]) + (" ..." if len(headers) > 3 else "")
        return _failure(
            "several_blocks",
            f"the text holds {len(headers)} data_ blocks ({names}): the model did not stop after the first CIF",
            symbol,
        )
    incomplete = incomplete_reason(text, finished)
    if incomplete is not None:
        return _failure(*incomplete, symbol)
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


def finished_flags(folder: str | Path) -> dict[str, bool]:
    """The sampler's ``finished`` flag per raw file name (``0003.txt``) of a sample set; {} when unknown.

    Args:
        folder: a sample-set folder or its ``raw/`` folder; the flags come from the set's ``samples.jsonl``.
    """
    folder = Path(folder)
    if (folder / "samples.jsonl").is_file():
        jsonl = folder / "samples.jsonl"
    elif folder.name == "raw" and (folder.parent / "samples.jsonl").is_file():
        jsonl = folder.parent / "samples.jsonl"
    else:
        return {}
    flags = {}
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a hand-edited or partly written file: judge those texts by their text
            continue
        if isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("finished"), bool):
            flags[f"{rec['name']}.txt"] = rec["finished"]
    return flags


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
    if src.is_dir() and out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} is a file but IN {src} is a folder: give a folder (new or existing) for OUT")
    to_folder = src.is_dir() or out.is_dir()
    finished = finished_flags(src) if src.is_dir() else {}
    failures: list[dict] = []
    for path in files:
        result = postprocess(path.read_text(encoding="utf-8", errors="replace"), finished.get(path.name))
        if result.cif is None:
            failures.append({"file": path.name, "reason": result.reason, "error": result.error})
            print(f"{path.name}: {result.reason}: {result.error}", file=sys.stderr)
            continue
        atomic_write_text(out / f"{path.stem}.cif" if to_folder else out, result.cif)
    listed = ""
    if to_folder:
        # Rewritten whole (not appended) so a rerun over the same folder does not list old failures twice.
        lines = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in failures)
        atomic_write_text(out / "postprocess_failures.jsonl", lines)
        listed = f" and in {out / 'postprocess_failures.jsonl'}"
    if failures and len(failures) == len(files):
        what = f"none of the {len(files)} file(s) in {src} could" if src.is_dir() else f"{src} could not"
        raise InputError(
            f"{what} be post-processed (reasons above{listed}): give raw texts written by `crystallab sample` "
            "(raw/NNNN.txt); a truncated text needs a larger --max-new-tokens when sampling"
        )
    print(f"post-processed {len(files) - len(failures)} of {len(files)} file(s) into {out}", file=sys.stderr)
    return 0


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

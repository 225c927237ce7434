"""CrystaLLM canonical CIF text and the model view that gets tokenized; CLI group ``cif``.

Pipeline (the upstream preprocessing, reimplemented): parse with pymatgen, reject disordered structures, write
the conventional standard cell with ``CifWriter(structure, symprec=0.1)``, then apply the edits in order:

1. read ``_cell_formula_units_Z`` (Z = 0 rejects the CIF);
2. the ``data_`` line becomes the cell composition from ``_chemical_formula_sum`` (``data_Na4Cl4``), elements
   in ``cell_formula`` order (upstream kept the text of ``_chemical_formula_sum``: the same order, except that
   pymatgen left He, Ne and Ar wherever the input put them);
3. semi-symmetrize: the symmetry-operator loop keeps only ``1 'x, y, z'``;
4. insert the atom-properties loop after the ``data_`` line, with the frozen values of ``engine.crystal.vocab``;
5. round every decimal number with more than 4 decimals to exactly 4.

``model_view`` then strips lines, drops blank / comment / ``pymatgen`` lines and collapses blanks: the result is
exactly the text a model reads and writes (``decode(encode(model_view(x))) == model_view(x)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from pymatgen.core import Composition, Element, Structure
from pymatgen.io.cif import CifParser, CifWriter

from engine.crystal import tokenizer
from engine.crystal.vocab import ATOM_PROPS, PAULING_X, UNK_ID
from engine.lab.errors import CrystallabError, InputError

SYMPREC = 0.1
"""Symmetry tolerance in angstrom for ``CifWriter`` (the value CrystaLLM's data was made with)."""
DECIMALS = 4
"""Decimals kept in every number of a canonical CIF."""
MAX_SITES = 500
"""Most sites a structure may have to be canonicalized: symmetrizing a large cell takes spglib seconds to minutes
(2,000 sites: about 13 s; 5,000: over 7 minutes), and CrystaLLM-sized models never see cells this large."""
TIMEOUT_S = 60.0
"""Default time box for canonicalizing one input in ``data build`` and ``cif canonicalize`` (seconds)."""

_Z = re.compile(r"_cell_formula_units_Z\s+(\S+)")
_FORMULA_SUM = re.compile(r"_chemical_formula_sum\s+('([^']+)'|(\S+))")
_NUMBER = re.compile(r"[-+]?\d*\.\d+(?:[eE][-+]?\d+)?")
_BLANKS = re.compile(r"[ \t]+")
_CELL_PARAM = re.compile(r"^[ \t]*(_cell_(?:length_[abc]|angle_(?:alpha|beta|gamma)))[ \t]+(\S+)", re.MULTILINE)
_DATA_LINE = re.compile(r"^[ \t]*data_", re.MULTILINE)
_ATOM_PROPS_TAGS = (
    "_atom_type_symbol",
    "_atom_type_electronegativity",
    "_atom_type_radius",
    "_atom_type_ionic_radius",
)


def _check_elements(symbols: list[str]) -> None:
    for symbol in symbols:
        if symbol not in ATOM_PROPS:
            raise InputError(
                f"element {symbol!r} is not in the CrystaLLM vocabulary (89 elements): "
                "structures containing it cannot be written in the CrystaLLM format"
            )


def _element_order(symbol: str) -> float:
    # Pauling electronegativity as in pymatgen's Composition.formula. pymatgen had none for He, Ne and Ar and
    # sorted by NaN, which leaves their position to the input order; their Allen value (above every Pauling
    # value) puts them last, so the same composition always gets the same data_ line.
    x = PAULING_X[symbol]
    return float(ATOM_PROPS[symbol].electronegativity) if math.isnan(x) else x


def _cell_counts(composition: Composition | str) -> list[tuple[str, int]]:
    comp = Composition(composition)
    amounts = comp.get_el_amt_dict()
    _check_elements(list(amounts))
    counts = []
    for symbol in sorted(amounts, key=_element_order):
        amount = amounts[symbol]
        if abs(amount - round(amount)) > 1e-8 or round(amount) < 1:
            raise InputError(
                f"composition {comp.formula!r} has {amount:g} {symbol} atoms: a cell composition needs whole "
                "counts (give the full cell, e.g. Na4Cl4, not a fractional formula or partial occupancy)"
            )
        counts.append((symbol, round(amount)))
    return counts


def cell_formula(composition: Composition | str) -> str:
    """The cell composition as written on a ``data_`` line: ``Na4Cl4``, ``Ba1Ti1O3``.

    Elements are ordered by ascending Pauling electronegativity from the frozen table (pymatgen's
    ``Composition.formula`` order as of CrystaLLM's data; He, Ne, Ar last); every count is written, 1s included.

    Raises:
        InputError: an element outside the vocabulary, or a non-integer amount (a cell holds whole atoms).
    """
    return "".join(f"{symbol}{count}" for symbol, count in _cell_counts(composition))


def check_cell_parameters(cif_text: str) -> None:
    """Refuse cell lengths that are not positive and angles outside (0, 180) degrees, naming the value.

    pymatgen builds a lattice from ``|a|`` and so would silently turn ``_cell_length_a -3.0`` into a 3 angstrom
    cell, and a zero length ends in a bare "Singular matrix"; both are errors in the file.

    Raises:
        InputError: a cell length <= 0 angstrom, an angle outside (0, 180) degrees, or a value that is no number.
    """
    for tag, raw in _CELL_PARAM.findall(cif_text):
        try:
            value = float(re.sub(r"\(\d+\)$", "", raw))  # "5.64(2)": a standard uncertainty in parentheses
        except ValueError:
            raise InputError(f"{tag} is {raw!r}, not a number: fix the cell parameters of the CIF") from None
        if "length" in tag and not (math.isfinite(value) and value > 0):
            raise InputError(f"{tag} is {raw}: a cell length must be a positive number of angstroms; "
                             "fix the cell parameters of the CIF")
        if "angle" in tag and not (math.isfinite(value) and 0 < value < 180):
            raise InputError(f"{tag} is {raw}: a cell angle must lie between 0 and 180 degrees; "
                             "fix the cell parameters of the CIF")


def _parse(cif_text: str) -> Structure:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structures = CifParser.from_str(cif_text).parse_structures(primitive=False, on_error="raise")
        except Exception as exc:  # pymatgen raises many types on malformed CIFs; all mean "unreadable input"
            hints = "; ".join(dict.fromkeys(str(w.message) for w in caught))
            reason = " ".join(f"{type(exc).__name__}: {exc}".split()) + (f" ({hints})" if hints else "")
            if not cif_text.strip():
                raise InputError("the CIF is empty: give a file holding one crystal structure") from exc
            raise InputError(
                f"CIF could not be parsed by pymatgen: {reason}; check that the file is a complete CIF (cell "
                "lengths and angles, symmetry, an atom-site loop with fractional coordinates) and not cut off"
            ) from exc
    if len(structures) != 1:
        raise InputError(f"CIF holds {len(structures)} structures; give one structure per CIF")
    return structures[0]


def _loop_span(lines: list[str], tag: str) -> tuple[int, int, int] | None:
    """Locate the loop holding ``tag``: (index of ``loop_``, index of first row, index after the last row)."""
    for start, line in enumerate(lines):
        if line.strip() != "loop_":
            continue
        first_row = start + 1
        while first_row < len(lines) and lines[first_row].strip().startswith("_"):
            first_row += 1
        if tag not in (line.strip() for line in lines[start + 1 : first_row]):
            continue
        end = first_row
        while end < len(lines):
            stripped = lines[end].strip()
            if not stripped or stripped.startswith(("_", "loop_", "data_", "#")):
                break
            end += 1
        return start, first_row, end
    return None


def _atom_props_block(symbols: list[str]) -> list[str]:
    rows = [f"  {s}  {'  '.join(ATOM_PROPS[s])}" for s in symbols]
    return ["loop_", *(f" {tag}" for tag in _ATOM_PROPS_TAGS), *rows]


def _round_number(match: re.Match) -> str:
    text = match.group()
    mantissa, _, exponent = text.lower().partition("e")
    # Exponent notation is always written out: the vocabulary has no "e" token.
    if not exponent and len(mantissa.split(".")[1]) <= DECIMALS:
        return text
    return f"{round(float(text), DECIMALS):.{DECIMALS}f}"


def _apply_edits(cif_text: str) -> str:
    """The four CrystaLLM edits on ``CifWriter`` output (or on a canonical CIF / model view: idempotent)."""
    z_match = _Z.search(cif_text)
    if z_match is None:
        raise InputError("CIF has no _cell_formula_units_Z line; give CifWriter output or use symmetrized=False")
    try:
        z = int(float(z_match.group(1)))
    except ValueError:
        raise InputError(f"CIF has a non-numeric _cell_formula_units_Z {z_match.group(1)!r}") from None
    if z == 0:
        raise InputError("CIF has _cell_formula_units_Z 0, which CrystaLLM rejects as erroneous")

    sum_match = _FORMULA_SUM.search(cif_text)
    if sum_match is None:
        raise InputError("CIF has no _chemical_formula_sum line; give CifWriter output or use symmetrized=False")
    formula_sum = sum_match.group(2) or sum_match.group(3)
    try:
        counts = _cell_counts(formula_sum)
    except ValueError as exc:
        raise InputError(f"CIF _chemical_formula_sum {formula_sum!r} is not a chemical formula: {exc}") from None
    symbols = [symbol for symbol, _ in counts]
    data_line = "data_" + "".join(f"{symbol}{count}" for symbol, count in counts)

    lines = cif_text.split("\n")
    existing = _loop_span(lines, "_atom_type_symbol")
    if existing is not None:  # a canonical CIF / model view given again, or an oxidation-state loop
        del lines[existing[0] : existing[2]]
    data_at = next((i for i, line in enumerate(lines) if line.startswith("data_")), None)
    if data_at is None:
        raise InputError("CIF has no data_ line")
    lines[data_at] = data_line

    ops = _loop_span(lines, "_symmetry_equiv_pos_as_xyz")
    if ops is None:
        raise InputError("CIF has no _symmetry_equiv_pos_as_xyz loop; give CifWriter output")
    lines[ops[1] : ops[2]] = ["  1  'x, y, z'"]

    hm_tag = "_symmetry_space_group_name_H-M"
    hm_at = next((i for i, line in enumerate(lines) if line.lstrip().startswith(hm_tag)), None)
    if hm_at is None:
        raise InputError("CIF has no _symmetry_space_group_name_H-M line; give CifWriter output")
    lines[hm_at:hm_at] = _atom_props_block(symbols)
    return _NUMBER.sub(_round_number, "\n".join(lines))


def _check_size(n_sites: int, max_sites: int | None, what: str = "the structure has") -> None:
    if max_sites is not None and n_sites > max_sites:
        raise InputError(f"too_many_sites: {what} {n_sites} sites, over the limit of {max_sites} (symmetrizing it "
                         "could take minutes); raise --max-sites to canonicalize it anyway")


def canonicalize_structure(structure: Structure, max_sites: int | None = MAX_SITES) -> str:
    """Canonical CrystaLLM CIF of a pymatgen structure.

    Only the lattice, the elements and the fractional coordinates matter: oxidation states (the vocabulary has
    none), site labels and site properties are dropped, so the text does not depend on how the structure was made.

    Args:
        structure: the crystal.
        max_sites: refuse structures with more sites than this before symmetrizing (None: no limit).

    Raises:
        InputError: the structure is disordered or partially occupied, holds an element outside the
            vocabulary, has more than ``max_sites`` sites, or cannot be symmetrized.
    """
    _check_size(len(structure), max_sites)
    for index, site in enumerate(structure):
        if not site.is_ordered:
            raise InputError(
                f"site {index} ({site.species.formula}) is disordered or partially occupied: only ordered, "
                "stoichiometric structures can be written in the CrystaLLM format"
            )
    symbols = [getattr(site.specie, "symbol", str(site.specie)) for site in structure]
    _check_elements(list(dict.fromkeys(symbols)))
    # Rebuild from lattice, elements and fractional coordinates only. Newer pymatgen's CifWriter writes a site's
    # own label and integer occupancies when the structure carries them (and oxidation states, magnetic moments);
    # upstream always wrote "Na0"-style labels and "1.0", which is what the pretrained models saw.
    structure = Structure(
        structure.lattice, [{Element(s): 1.0} for s in symbols], structure.frac_coords, coords_are_cartesian=False
    )
    try:
        text = str(CifWriter(structure, symprec=SYMPREC))
    except Exception as exc:  # spglib / CifWriter failures on odd cells: report, do not write anything
        raise InputError(f"structure could not be symmetrized (symprec {SYMPREC} angstrom): {exc}") from exc
    return _apply_edits(text)


def translated(structure: Structure, shift: Any) -> Structure:
    """``structure`` with every fractional coordinate moved by ``shift`` (3,), wrapped into [0, 1): the same crystal,
    another origin (translation augmentation and the IPT probe)."""
    import numpy as np

    frac = (structure.frac_coords + np.asarray(shift, dtype=float)[None, :]) % 1.0  # (n_sites, 3)
    return Structure(structure.lattice, structure.species, frac, coords_are_cartesian=False)


def canonicalize(cif_text: str, symmetrized: bool = False, max_sites: int | None = MAX_SITES) -> str:
    """Canonical CrystaLLM CIF text (comment lines kept) from CIF text.

    Args:
        cif_text: one CIF.
        symmetrized: the text is already ``CifWriter(structure, symprec=0.1)`` output (or a canonical CIF /
            model view): only apply the edits, without re-parsing and re-symmetrizing.
        max_sites: refuse a CIF with more sites than this (None: no limit); its atom-site rows are counted before
            parsing, since parsing a large cell is slow too.

    Raises:
        InputError: unparseable CIF, disorder / partial occupancy, Z = 0, an element outside the vocabulary, or
            more than ``max_sites`` sites.
    """
    check_cell_parameters(cif_text)
    if symmetrized:
        return _apply_edits(cif_text)
    span = _loop_span(cif_text.split("\n"), "_atom_site_fract_x")
    if span is not None:  # each row is at least one site once symmetry is applied
        _check_size(span[2] - span[1], max_sites, "its atom-site loop lists")
    return canonicalize_structure(_parse(cif_text), max_sites)


def model_view(text: str) -> str:
    """The text a model reads: stripped non-empty lines without comments, blanks collapsed, two final newlines."""
    lines = [line.strip() for line in text.split("\n")]
    kept = [line for line in lines if line and not line.startswith("#") and "pymatgen" not in line]
    return _BLANKS.sub(" ", "\n".join(kept)) + "\n\n"


def structure_to_model_view(structure: Structure) -> str:
    """Model view of a pymatgen structure (``model_view(canonicalize_structure(structure))``)."""
    return model_view(canonicalize_structure(structure))


# ---- CLI ---------------------------------------------------------------------------------------------------


def _read(name: str) -> str:
    """A CIF file's text under the lab's one rule for encodings (`engine.data.sources.decode_cif_bytes`)."""
    from engine.data.sources import decode_cif_bytes, first_non_utf8_line, latin1_warning

    if name == "-" and not hasattr(sys.stdin, "buffer"):  # stdin replaced by a text stream (an embedding program)
        return sys.stdin.read()
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read it ({exc.strerror or exc}); check the path") from None
    text, was_latin1 = decode_cif_bytes(data, "the file")
    if was_latin1:
        print(f"warning: {latin1_warning(name, first_non_utf8_line(data))}", file=sys.stderr)
    return text


def warm_up() -> None:
    """Canonicalize a two-atom rock salt once: pymatgen and spglib pay their first-use costs here (`run_pool`)."""
    from pymatgen.core import Lattice

    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    canonicalize(str(CifWriter(rock_salt)))


def _canonicalize_task(text: str, symmetrized: bool, max_sites: int | None) -> tuple[str | None, str | None]:
    """One file in a pool worker: ``(model view, None)`` or ``(None, reason)``."""
    try:
        return model_view(canonicalize(text, symmetrized=symmetrized, max_sites=max_sites)), None
    except CrystallabError as exc:
        return None, str(exc)


def _pool_problem(reason: str, detail: str) -> tuple[None, str]:
    hint = "; raise --timeout, or leave this file out" if reason == "timeout" else ""
    return None, f"{reason}: {detail}{hint}"


def _for_each_file(files: list[str], handle: Callable[[str, str], None]) -> int:
    """Run ``handle(name, text)`` on every file; report failures per file and keep going (exit status 2 if any)."""
    failed = 0
    for name in files:
        try:
            handle(name, _read(name))
        except CrystallabError as exc:
            failed += 1
            print(f"error: {name}: {exc}", file=sys.stderr)
    return 2 if failed else 0


def _tolerate_closed_stdout(run: Callable[[], int]) -> int:
    """Run a command that prints to stdout; a reader that stops early (``| head``) ends it quietly."""
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not raise (and print a traceback) again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _cmd_canonicalize(args: argparse.Namespace) -> int:
    from engine.lab.pool import run_pool

    if args.timeout is not None and args.timeout <= 0:
        raise InputError(f"--timeout {args.timeout:g}: give a positive number of seconds (default {TIMEOUT_S:g})")
    if args.max_sites < 1:
        raise InputError(f"--max-sites {args.max_sites}: give a whole number of at least 1 (default {MAX_SITES})")

    def run() -> int:
        failed = 0
        # Batches keep output flowing for long file lists; each input runs in a killable worker with a time box.
        for a in range(0, len(args.files), 64):
            names, results = args.files[a:a + 64], []
            texts: dict[int, str] = {}
            for i, name in enumerate(names):
                try:
                    texts[i] = _read(name)
                except CrystallabError as exc:
                    results.append((i, (None, str(exc))))
            tasks = [(k, texts[i], args.symmetrized, args.max_sites) for k, i in enumerate(sorted(texts))]
            workers = min(len(tasks), args.workers or os.cpu_count() or 1)
            done = run_pool(_canonicalize_task, tasks, workers, args.timeout, problem=_pool_problem,
                            warm_up=warm_up) if tasks else []
            results += list(zip(sorted(texts), done))
            for i, (view, error) in sorted(results, key=lambda r: r[0]):
                if error is None:
                    sys.stdout.write(view)
                else:
                    failed += 1
                    print(f"error: {names[i]}: {error}", file=sys.stderr)
            sys.stdout.flush()
        return 2 if failed else 0

    return _tolerate_closed_stdout(run)


def _cmd_tokenize(args: argparse.Namespace) -> int:
    def handle(name: str, text: str) -> None:
        if not text.strip():
            raise InputError("the file is empty: give a CIF (crystallab cif canonicalize FILE prints its model view)")
        if not _DATA_LINE.search(text):
            raise InputError(
                "it has no 'data_' line, so it is not a CIF: give a canonical CIF (crystallab cif canonicalize)"
            )
        ids, dropped = tokenizer.encode_with_report(model_view(text))
        if dropped:
            kinds = "".join(dict.fromkeys(dropped))
            print(f"warning: {name}: dropped {len(dropped)} characters: {kinds!r}", file=sys.stderr)
        unknown = ids.count(UNK_ID)
        if unknown:
            print(
                f"warning: {name}: {unknown} of {len(ids)} tokens are <unk> (words outside the CrystaLLM "
                "vocabulary, which a model has never seen); canonicalize the CIF first (crystallab cif canonicalize)",
                file=sys.stderr,
            )
        print(json.dumps(ids))

    return _tolerate_closed_stdout(lambda: _for_each_file(args.files, handle))


def add_cli(subparsers) -> None:
    """Register ``crystallab cif canonicalize`` and ``crystallab cif tokenize``."""
    cif = subparsers.add_parser("cif", help="canonical CrystaLLM CIF text and token ids")
    sub = cif.add_subparsers(dest="cif_command", metavar="ACTION", required=True)

    canon = sub.add_parser("canonicalize", help="print the model view of each CIF (two newlines after each)")
    canon.add_argument("files", nargs="+", metavar="FILE", help="CIF files ('-' reads stdin)")
    canon.add_argument(
        "--symmetrized", action="store_true", help="inputs are already CifWriter(symprec=0.1) output: only edit"
    )
    canon.add_argument("--timeout", type=float, default=TIMEOUT_S,
                       help=f"seconds one file may take; it is then stopped and reported (default {TIMEOUT_S:g})")
    canon.add_argument("--max-sites", type=int, default=MAX_SITES,
                       help=f"refuse structures with more sites than this, before symmetrizing (default {MAX_SITES})")
    canon.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPU cores)")
    canon.set_defaults(func=_cmd_canonicalize)

    tok = sub.add_parser(
        "tokenize",
        help="print one JSON list of token ids per file",
        description=(
            "Tokenizes each file as written (comments and blank lines dropped, as in the model view); it does not "
            "canonicalize. Run 'crystallab cif canonicalize' first on raw CIFs: words outside the vocabulary "
            "become <unk> tokens, which are counted in a warning."
        ),
    )
    tok.add_argument("files", nargs="+", metavar="FILE", help="canonical CIF files ('-' reads stdin)")
    tok.set_defaults(func=_cmd_tokenize)

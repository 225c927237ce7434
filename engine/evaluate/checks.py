"""Per-sample checks of one post-processed CIF: CrystaLLM validity, CDVAE validity, symmetry and descriptors.

`check_cif` returns one flat row (a dict of scalars) that the evaluator turns into a table. Each check is a small
function returning its value, or None when it cannot be computed (upstream CrystaLLM wraps each check in a
try/except and records None the same way). Definitions and thresholds follow CrystaLLM exactly
(crystallm-format.md section 7):

- ``is_sensible``: every cell length written is in [0.5, 1000] angstrom and every angle in [10, 170] degrees.
- ``formula_consistent``: reduced formulas of the ``data_`` header, ``_chemical_formula_sum`` and
  ``_chemical_formula_structural`` agree.
- ``multiplicity_consistent``: per element, the summed ``_atom_site_symmetry_multiplicity`` equals its count in
  ``_chemical_formula_sum``.
- ``bond_length_score``: over CrystalNN bonds (bonds from a site to an image of itself are skipped, as upstream
  does), the fraction with length / expected in (0.68, 1.32), or < 2.5 when H is involved; expected = cation
  average cationic radius + anion average anionic radius when the Pauling difference is >= 1.7, else the sum of
  atomic radii (angstrom). No bonds: None.
- ``space_group_consistent``: ``SpacegroupAnalyzer(symprec=0.1)`` symbol equals the stated H-M symbol.
- ``is_valid``: formula and multiplicity consistent, score >= 1.0 and space group consistent.
- ``cdvae_struct_valid``: every minimum-image distance between distinct sites >= 0.5 angstrom and volume >= 0.1
  angstrom^3 (CDVAE's definition, which ignores a site's distance to its own images).
- ``smact_valid``: smact ``smact_validity(composition, oxidation_states_set="smact14")`` (charge neutrality and
  the Pauling electronegativity test; one element or an all-metal alloy passes), as CDVAE computed it.

Deliberate differences from upstream CrystaLLM (the README quotes this list):

1. A truncated text (no complete atom-site loop, a short last row, or a last row without its newline) is a parse
   failure: ``parse_ok`` False, ``failure_reason`` "truncated", ``is_valid`` False. The text-only checks
   (sensible, formula, multiplicity) are still reported, but the structure checks are not run even when pymatgen
   could read the surviving rows (upstream scored such texts). A CIF that *ended* with such a loop (a blank line
   or more text after it) was written broken, not cut: ``failure_reason`` "malformed", same consequences.
2. Absurd cells are rejected before any expensive analysis: more than ``max_sites`` sites after symmetry
   expansion (``too_many_sites``) or a volume per atom outside [1, 1000] angstrom^3 (``absurd_volume``). Their
   structure checks are None and ``is_valid`` is False. Upstream analysed them, sometimes for many minutes.
3. ``is_sensible`` judges only the cell values present; a text missing them is caught by the parse instead.
4. A check that raises gives None (as upstream) and ``is_valid`` is then False; the evaluator adds
   ``failure_reason`` "timeout" when a sample exceeds its time box.
5. A disordered or partially occupied site (occupancy below 1, or two elements on one site) gives
   ``failure_reason`` "disordered" and ``is_valid`` False; the structure checks are not run.
6. ``smact_valid`` is None (undecided) when the oxidation-state combinations exceed ``max_smact_combinations``.
"""

from __future__ import annotations

import math
import re
import warnings
from functools import lru_cache, reduce
from operator import mul
from typing import Any

import numpy as np
from pymatgen.analysis.local_env import CrystalNN
from pymatgen.core import Composition, Element, Structure
from pymatgen.io.cif import CifFile, CifParser
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from engine.crystal.postprocess import incomplete_reason, stated_spacegroup
from engine.crystal.vocab import ATOM_PROPS

SENSIBLE_LENGTH = (0.5, 1000.0)
"""Allowed cell lengths a, b, c in angstrom (CrystaLLM)."""
SENSIBLE_ANGLE = (10.0, 170.0)
"""Allowed cell angles in degrees (CrystaLLM)."""
BOND_TOLERANCE = 0.32
"""Bond length / expected length must lie strictly inside (1 - 0.32, 1 + 0.32) (CrystaLLM)."""
H_BOND_FACTOR = 2.5
"""A bond involving H is reasonable when length / expected < 2.5 (CrystaLLM)."""
IONIC_DELTA_X = 1.7
"""Pauling electronegativity difference from which a bond is treated as ionic (CrystaLLM)."""
SYMPREC = 0.1
"""Symmetry tolerance in angstrom for space-group detection (CrystaLLM)."""
EQUIVALENCE_SYMPREC = 1e-3
"""Tolerance in angstrom for grouping symmetry-equivalent sites before the bond-length analysis."""
CDVAE_MIN_DISTANCE = 0.5
"""Smallest allowed distance between two sites in angstrom (CDVAE structural validity)."""
CDVAE_MIN_VOLUME = 0.1
"""Smallest allowed cell volume in angstrom^3 (CDVAE structural validity)."""
VOLUME_PER_ATOM = (1.0, 1000.0)
"""Volume per atom in angstrom^3 outside which a cell is rejected as absurd before analysis."""

ROW_FIELDS = (
    "parse_ok", "failure_reason", "failure_detail", "is_sensible", "formula_consistent",
    "multiplicity_consistent", "bond_length_score", "space_group_consistent", "is_valid", "cdvae_struct_valid",
    "smact_valid", "reduced_formula", "cell_composition", "stated_spacegroup", "spacegroup", "spacegroup_number",
    "n_atoms", "n_elements", "elements", "density", "volume", "formula_hit", "spacegroup_hit",
)  # fmt: skip
"""Columns of a check row, in table order."""

# What pymatgen raises on malformed CIF text (a loop without values divides by zero, a missing tag is a KeyError).
_CHECK_ERRORS = (KeyError, ValueError, IndexError, ZeroDivisionError, StopIteration, AttributeError, TypeError)

_LENGTH_RE = re.compile(r"_cell_length_[abc][ \t]+(\S+)")
_ANGLE_RE = re.compile(r"_cell_angle_(?:alpha|beta|gamma)[ \t]+(\S+)")
_DATA_RE = re.compile(r"^[ \t]*data_(\S+)", re.MULTILINE)


def empty_row() -> dict[str, Any]:
    """A row with every field None (``is_valid`` False)."""
    row = dict.fromkeys(ROW_FIELDS)
    row["is_valid"] = False
    return row


def is_sensible(text: str) -> bool | None:
    """Whether the written cell lengths and angles lie in CrystaLLM's sensible ranges (None: unreadable)."""
    try:
        lengths = [float(v) for v in _LENGTH_RE.findall(text)]
        angles = [float(v) for v in _ANGLE_RE.findall(text)]
    except ValueError:
        return None
    return all(SENSIBLE_LENGTH[0] <= v <= SENSIBLE_LENGTH[1] for v in lengths) and all(
        SENSIBLE_ANGLE[0] <= v <= SENSIBLE_ANGLE[1] for v in angles
    )


def _cif_block(text: str) -> dict:
    """The first data block of ``text`` as pymatgen's raw tag -> value(s) mapping."""
    return next(iter(CifFile.from_str(text).data.values())).data


def formula_consistent(text: str) -> bool | None:
    """Whether the ``data_`` header, formula sum and structural formula have one reduced formula."""
    try:
        block = _cif_block(text)
        header = _DATA_RE.search(text)
        formulas = [header.group(1), block["_chemical_formula_sum"], block["_chemical_formula_structural"]]
        reduced = {Composition(f).reduced_formula for f in formulas}
    except _CHECK_ERRORS:
        return None
    return len(reduced) == 1


def multiplicity_consistent(text: str) -> bool | None:
    """Whether per-element summed site multiplicities equal the element counts of ``_chemical_formula_sum``."""
    try:
        block = _cif_block(text)
        expected = Composition(block["_chemical_formula_sum"]).as_dict()
        found: dict[str, int] = {}
        for symbol, mult in zip(block["_atom_site_type_symbol"], block["_atom_site_symmetry_multiplicity"]):
            found[symbol] = found.get(symbol, 0) + int(mult)
    except _CHECK_ERRORS:
        return None
    return expected == found


@lru_cache(maxsize=None)
def cationic_radius(symbol: str) -> float:
    """Average cationic radius in angstrom, as the pymatgen version behind CrystaLLM's verdicts computed it.

    pymatgen later revised Mn's ionic radii (average 0.6483 -> 0.8775 angstrom), which flips bond-length verdicts
    of Mn oxides. For an element with only cationic radii the average cationic radius equals the average ionic
    radius, which the frozen atom-property table (`engine.crystal.vocab.ATOM_PROPS`) keeps as CrystaLLM wrote it; that
    value is used wherever current pymatgen disagrees with it.
    """
    element = Element(symbol)
    current = float(element.average_cationic_radius)
    props = ATOM_PROPS.get(symbol)
    if props is not None and float(element.average_anionic_radius) == 0.0:
        frozen = float(props.ionic_radius)
        if frozen > 0 and abs(frozen - float(element.average_ionic_radius)) > 1e-3:
            return frozen
    return current


def _bond_counts(structure: Structure, i: int, nn: CrystalNN) -> tuple[int, int]:
    """(reasonable, all) CrystalNN bonds of site ``i``, skipping bonds to images of itself as upstream does."""
    site = structure[i]
    reasonable = total = 0
    for info in nn.get_nn_info(structure, i):
        if info["site_index"] == i:
            continue
        other = info["site"]
        a, b = site.specie, other.specie
        if abs(a.X - b.X) >= IONIC_DELTA_X:
            cation, anion = (a, b) if a.X < b.X else (b, a)
            expected = cationic_radius(cation.symbol) + anion.average_anionic_radius
        else:
            expected = a.atomic_radius + b.atomic_radius
        ratio = site.distance(other) / expected
        if "H" in (a.symbol, b.symbol):
            reasonable += ratio < H_BOND_FACTOR
        else:
            reasonable += (1 - BOND_TOLERANCE) < ratio < (1 + BOND_TOLERANCE)
        total += 1
    return reasonable, total


def bond_length_score(structure: Structure) -> float | None:
    """Fraction of CrystalNN bonds with a reasonable length (see module docstring); None when there are none.

    Symmetry-equivalent sites have the same bonds, so CrystalNN runs once per equivalence class (found at a
    tight 1e-3 angstrom tolerance, so that equivalent sites' bond lengths agree to well below the rounding of
    the written coordinates) and its counts are weighted by the class size: the score equals the all-site one.
    """
    nn = CrystalNN()
    try:
        classes = SpacegroupAnalyzer(structure, symprec=EQUIVALENCE_SYMPREC).get_symmetrized_structure()
        groups = classes.equivalent_indices
    except (ValueError, TypeError, RuntimeError):  # no symmetry found: every site on its own
        groups = [[i] for i in range(len(structure))]
    reasonable = total = 0
    for group in groups:
        r, t = _bond_counts(structure, group[0], nn)
        reasonable += r * len(group)
        total += t * len(group)
    return reasonable / total if total else None


def detect_spacegroup(structure: Structure) -> tuple[str | None, int | None]:
    """The (H-M symbol, number) spglib finds at ``SYMPREC``, or (None, None) when symmetry is undetermined."""
    try:
        sga = SpacegroupAnalyzer(structure, symprec=SYMPREC)
        return sga.get_space_group_symbol(), sga.get_space_group_number()
    except (ValueError, TypeError, RuntimeError):  # SymmetryUndeterminedError is a ValueError
        return None, None


def cdvae_struct_valid(structure: Structure) -> bool:
    """CDVAE structural validity: all distinct-site distances >= 0.5 angstrom and volume >= 0.1 angstrom^3."""
    if structure.volume < CDVAE_MIN_VOLUME:
        return False
    if len(structure) < 2:
        return True
    off_diagonal = structure.distance_matrix[~np.eye(len(structure), dtype=bool)]
    return bool(off_diagonal.min() >= CDVAE_MIN_DISTANCE)


def smact_valid(composition: Composition, max_combinations: int = 100_000) -> bool | None:
    """CDVAE compositional validity with smact's 2014 oxidation states; None when the search is too large.

    Args:
        composition: the cell composition.
        max_combinations: most oxidation-state combinations searched; above it the verdict is None.
    """
    import smact
    from smact.screening import smact_validity

    try:
        elements = smact.element_dictionary(tuple(el.symbol for el in composition.elements))
    except (NameError, KeyError):  # smact has no data for the element
        return None
    n_states = [len(e.oxidation_states_smact14 or ()) for e in elements.values()]
    if reduce(mul, n_states, 1) > max_combinations:
        return None
    return bool(smact_validity(composition, oxidation_states_set="smact14"))


def _parse_failure(exc: Exception, caught: list[warnings.WarningMessage]) -> tuple[str, str]:
    """Map a parse exception (and the warnings pymatgen raised first) to (category, readable detail)."""
    messages = list(dict.fromkeys(m for m in [str(exc), *(str(w.message) for w in caught)] if m.strip()))
    text = "; ".join(messages)
    lowered = text.lower()
    if "element" in lowered or "species" in lowered or isinstance(exc, KeyError):
        category = "unknown_element"
    elif "float" in lowered or "convert" in lowered or "number" in lowered:
        category = "bad_number"
    elif "lattice" in lowered or "singular" in lowered or "volume" in lowered or "angle" in lowered:
        category = "lattice_error"
    else:
        category = "parse_error"
    return category, text[:500]


def parse_structure(text: str) -> tuple[Structure | None, str | None, str | None]:
    """Parse a post-processed CIF into a Structure: (structure, None, None) or (None, category, detail)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structure = CifParser.from_str(text, check_cif=False).parse_structures(primitive=False, on_error="raise")[0]
        except (*_CHECK_ERRORS, AssertionError) as exc:
            return (None, *_parse_failure(exc, caught))
    unknown = sorted({str(sp) for sp in structure.composition if not isinstance(sp, Element)})
    if unknown:  # pymatgen reads an unknown symbol as a dummy species instead of failing
        return None, "unknown_element", f"unknown element symbol(s) {', '.join(unknown)}"
    if not math.isfinite(structure.volume) or structure.volume <= 0:
        return None, "lattice_error", f"cell volume {structure.volume} is not positive"
    return structure, None, None


def prompt_targets(prompt: dict | None) -> tuple[str | None, str | None]:
    """The (cell composition, space-group symbol) a prompt asks for; None for each part it leaves open.

    The prompt's ``formula`` is the cell composition of its ``data_`` line (``Na2Cl2``: Z is part of it); a
    prompt without one falls back to the formula on the ``data_`` line of its ``text``.
    """
    if not prompt:
        return None, None
    formula = prompt.get("formula")
    if not formula:
        header = _DATA_RE.search(prompt.get("text") or "")
        formula = header.group(1) if header else None
    spacegroup = str(prompt["spacegroup"]).strip() if prompt.get("spacegroup") else None
    return formula or None, spacegroup


def _prompt_hits(row: dict, prompt: dict | None, structure: Structure) -> None:
    """Fill ``formula_hit`` / ``spacegroup_hit`` against the prompt's cell composition and space group.

    A hit is the same cell composition, not just the same reduced formula; a space-group hit needs a detected
    space group (rows whose analysis stopped early have none, so they miss).
    """
    formula, spacegroup = prompt_targets(prompt)
    if formula:
        row["formula_hit"] = structure.composition.almost_equals(Composition(formula))
    if spacegroup:
        row["spacegroup_hit"] = row["spacegroup"] == spacegroup


def mark_missed_hits(row: dict, prompt: dict | None) -> dict:
    """Set the hit columns the prompt asks about to False where the sample gave no verdict (it did not parse).

    A sample that failed did not hit the prompt, so hit rates stay k/n over all samples; columns the prompt does
    not ask about stay None. Returns ``row``.
    """
    formula, spacegroup = prompt_targets(prompt)
    if formula and row.get("formula_hit") is None:
        row["formula_hit"] = False
    if spacegroup and row.get("spacegroup_hit") is None:
        row["spacegroup_hit"] = False
    return row


def text_checks(text: str) -> dict[str, Any]:
    """The checks that read only the text (stated space group, sensible cell, formula, multiplicity)."""
    row = empty_row()
    row["stated_spacegroup"] = stated_spacegroup(text)
    row["is_sensible"] = is_sensible(text)
    row["formula_consistent"] = formula_consistent(text)
    row["multiplicity_consistent"] = multiplicity_consistent(text)
    return row


def failed_row(text: str, reason: str, detail: str | None = None) -> dict[str, Any]:
    """The row of a text that could not be post-processed: text-only checks plus the failure reason.

    Post-processing leaves the header lines and the atom-site loop unchanged, so the text-only checks mean the
    same on the raw text as on a processed CIF.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = text_checks(text)
    row.update(parse_ok=False, failure_reason=reason, failure_detail=detail)
    return row


def check_cif(
    processed_cif: str,
    prompt: dict | None = None,
    *,
    max_sites: int = 500,
    volume_per_atom: tuple[float, float] = VOLUME_PER_ATOM,
    max_smact_combinations: int = 100_000,
) -> dict[str, Any]:
    """Run every per-sample check on one post-processed CIF.

    Args:
        processed_cif: CIF text after `engine.crystal.postprocess.postprocess` (full symmetry operators).
        prompt: the sample set's prompt (``{"text", "formula", "z", "spacegroup"}``), for the hit columns.
        max_sites: most sites after symmetry expansion before the cell is rejected as ``too_many_sites``.
        volume_per_atom: allowed (min, max) volume per atom in angstrom^3; outside it ``absurd_volume``.
        max_smact_combinations: cap on oxidation-state combinations for ``smact_valid``.

    Returns:
        One flat row with the fields of `ROW_FIELDS`.
    """
    # pymatgen warns on nearly every generated CIF (no oxidation states, rounded coordinates); the verdicts
    # carry the information, and a warning per sample would drown the evaluator's output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = _check(processed_cif, prompt, max_sites, volume_per_atom, max_smact_combinations)
    return mark_missed_hits(row, prompt)


def _check(
    processed_cif: str,
    prompt: dict | None,
    max_sites: int,
    volume_per_atom: tuple[float, float],
    max_smact_combinations: int,
) -> dict[str, Any]:
    row = text_checks(processed_cif)
    incomplete = incomplete_reason(processed_cif)
    if incomplete is not None:
        row.update(parse_ok=False, failure_reason=incomplete[0], failure_detail=incomplete[1])
        return row
    structure, category, detail = parse_structure(processed_cif)
    if structure is None:
        row.update(parse_ok=False, failure_reason=category, failure_detail=detail)
        return row
    row["parse_ok"] = True
    comp = structure.composition
    n = len(structure)
    row.update(
        n_atoms=n,
        volume=float(structure.volume),
        reduced_formula=comp.reduced_formula,
        cell_composition=comp.formula.replace(" ", ""),
        elements=" ".join(el.symbol for el in comp.elements),
        n_elements=len(comp.elements),
        density=float(structure.density),
    )
    disordered = next((i for i, site in enumerate(structure) if not site.is_ordered), None)
    if disordered is not None:
        # Bond scores and symmetry need one element per site; a generated CIF never means partial occupancy.
        row.update(failure_reason="disordered", failure_detail=f"site {disordered} "
                   f"({structure[disordered].species.formula}) is disordered or partially occupied")
        return row
    if n > max_sites:
        row.update(failure_reason="too_many_sites", failure_detail=f"{n} sites after symmetry expansion > {max_sites}")
        _prompt_hits(row, prompt, structure)
        return row
    if not volume_per_atom[0] <= structure.volume / n <= volume_per_atom[1]:
        row.update(
            failure_reason="absurd_volume",
            failure_detail=f"volume per atom {structure.volume / n:.3g} A^3 outside {volume_per_atom}",
        )
        _prompt_hits(row, prompt, structure)
        return row
    row["spacegroup"], row["spacegroup_number"] = detect_spacegroup(structure)
    if row["spacegroup"] is not None and row["stated_spacegroup"] is not None:
        row["space_group_consistent"] = row["spacegroup"] == row["stated_spacegroup"]
    try:
        row["bond_length_score"] = bond_length_score(structure)
    except (TypeError, ValueError, ZeroDivisionError):  # an element without tabulated radii
        row["bond_length_score"] = None
    row["cdvae_struct_valid"] = cdvae_struct_valid(structure)
    row["smact_valid"] = smact_valid(comp, max_smact_combinations)
    row["is_valid"] = bool(
        row["formula_consistent"]
        and row["multiplicity_consistent"]
        and row["bond_length_score"] is not None
        and row["bond_length_score"] >= 1.0
        and row["space_group_consistent"]
    )
    _prompt_hits(row, prompt, structure)
    return row

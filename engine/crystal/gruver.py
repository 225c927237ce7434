"""Gruver et al.'s crystal text (ICLR 2024): the string format, its prompts, the training mix, and parsing back.

The format (reference: ``diffusion-and-distillation.md`` section C)::

    3.9 3.9 3.9          lattice lengths a b c in angstrom, 1 decimal
    90 90 90             angles alpha beta gamma in degrees, integers
    Na                   then per atom: its element ...
    0.00 0.00 0.00       ... and its fractional coordinates, 2 decimals, in [0, 1)

Training sees a fresh random translation of all atoms each time an example is used (the format is not
translation invariant; the augmentation teaches the model that it should be). Generation prompts are
unconditional or state the formula, the space-group number and / or E_hull; the infill prompt replaces one
element by ``[MASK]`` and asks for it. The paper trains on 2/3 generation and 1/3 infill examples.

Generated text becomes a pymatgen `Structure` (`text_to_structure`) and then the lab's canonical CIF
(`text_to_cif`), so everything downstream of sampling treats it like any other family's output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from engine.lab.errors import InputError

GENERATION_HEAD = "Below is a description of a bulk material."
GENERATION_TAIL = (" Generate a description of the lengths and angles of the lattice vectors and then the element "
                   "type and coordinates for each atom within the lattice:\n")
INFILL_HEAD = ('Below is a partial description of a bulk material where one element has been replaced with the '
               'string "[MASK]":\n')
INFILL_TAIL = "Generate an element that could replace [MASK] in the bulk material:\n"
MASK = "[MASK]"
INFILL_FRACTION = 1 / 3
"""Share of training examples that are infill tasks (the rest are generation), as in the paper."""
CONDITION_PROBABILITY = 0.5
"""Each known condition (formula, space group, E_hull) is stated in a training prompt with this probability, so one
model learns unconditional and conditional generation alike."""

_NUMBER = r"[-+]?\d+(?:\.\d*)?"
_LENGTHS_RE = re.compile(rf"^\s*({_NUMBER})\s+({_NUMBER})\s+({_NUMBER})\s*$")
_ELEMENT_RE = re.compile(r"^\s*([A-Z][a-z]?)\s*$")


def structure_to_text(structure: Structure, rng: np.random.Generator | None = None) -> str:
    """Gruver's string of ``structure``; with ``rng``, every atom is first shifted by one random fractional vector.

    Coordinates are wrapped into [0, 1) before rounding; a coordinate that rounds to 1.00 is written 0.00.
    """
    frac = np.asarray(structure.frac_coords, dtype=float)  # (N, 3)
    if rng is not None:
        frac = frac + rng.random(3)[None, :]  # (N, 3): one translation for all atoms
    frac = np.round(np.mod(frac, 1.0), 2) % 1.0  # (N, 3)
    lat = structure.lattice
    lines = [" ".join(f"{x:.1f}" for x in lat.abc), " ".join(f"{round(x):d}" for x in lat.angles)]
    for site, xyz in zip(structure, frac):
        lines.append(getattr(site.specie, "symbol", str(site.specie)))
        lines.append(" ".join(f"{x:.2f}" for x in xyz))
    return "\n".join(lines) + "\n"


def text_to_structure(text: str) -> Structure:
    """Parse Gruver's string (without a prompt) into a structure.

    Raises:
        InputError: malformed lines, an unknown element, an impossible cell, or no atoms (names the problem).
    """
    lines = [line for line in text.strip().split("\n") if line.strip()]
    if len(lines) < 4:
        raise InputError(f"crystal text has {len(lines)} lines; it needs lengths, angles and at least one atom")
    abc, angles = _three(lines[0], "lattice lengths"), _three(lines[1], "lattice angles")
    if min(abc) <= 0 or not all(0 < x < 180 for x in angles):
        raise InputError(f"crystal text has an impossible cell: lengths {abc}, angles {angles}")
    if len(lines) % 2:
        raise InputError(f"crystal text ends with an element line without coordinates: {lines[-1]!r}")
    species, coords = [], []
    for el_line, xyz_line in zip(lines[2::2], lines[3::2]):
        m = _ELEMENT_RE.match(el_line)
        if m is None or not Element.is_valid_symbol(m.group(1)):
            raise InputError(f"crystal text has {el_line!r} where an element symbol belongs")
        species.append(m.group(1))
        coords.append(_three(xyz_line, "fractional coordinates"))
    try:
        lattice = Lattice.from_parameters(*abc, *angles)
    except ValueError as exc:
        raise InputError(f"crystal text has an impossible cell ({exc})") from None
    if not np.isfinite(lattice.volume) or lattice.volume <= 1e-3:
        raise InputError(f"crystal text has a degenerate cell: lengths {abc}, angles {angles}")
    return Structure(lattice, species, coords)


def _three(line: str, what: str) -> tuple[float, float, float]:
    m = _LENGTHS_RE.match(line)
    if m is None:
        raise InputError(f"crystal text has {line!r} where three numbers ({what}) belong")
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def body_of(text: str) -> str:
    """The crystal part of a prompt + completion: what follows the last instruction line."""
    for tail in (GENERATION_TAIL, INFILL_TAIL):
        if tail in text:
            return text.rsplit(tail, 1)[1]
    return text


def text_to_cif(text: str) -> str:
    """The lab's canonical CIF (model view) of a generated text (prompt included or not).

    Raises:
        InputError: the text is not a readable crystal (`text_to_structure`) or cannot be canonicalized.
    """
    from engine.crystal.canonical import structure_to_model_view

    return structure_to_model_view(text_to_structure(body_of(text)))


# ---- prompts ---------------------------------------------------------------------------------------------------


def generation_prompt(formula: str | None = None, spacegroup_number: int | None = None,
                      e_hull: float | None = None) -> str:
    """The generation prompt, unconditional or stating any of formula, space-group number and E_hull (eV/atom)."""
    conditions = ""
    if formula:
        conditions += f" The chemical formula is {formula}."
    if spacegroup_number is not None:
        conditions += f" The spacegroup number is {int(spacegroup_number)}."
    if e_hull is not None:
        conditions += f" The energy above the convex hull is {float(e_hull):.3f}."
    return GENERATION_HEAD + conditions + GENERATION_TAIL


def infill_prompt(masked_text: str) -> str:
    """The infill prompt around a crystal string in which one element is written ``[MASK]``."""
    return INFILL_HEAD + masked_text.rstrip("\n") + "\n" + INFILL_TAIL


def mask_element(text: str, element: str) -> str:
    """``text`` with every atom of ``element`` written ``[MASK]``."""
    lines = text.split("\n")
    return "\n".join(MASK if i >= 2 and i % 2 == 0 and line == element else line for i, line in enumerate(lines))


def parse_infill_answer(completion: str) -> str | None:
    """The element an infill completion names (its first line), or None when it names none."""
    body = body_of(completion)
    first = body.strip().split("\n", 1)[0] if body.strip() else ""
    m = _ELEMENT_RE.match(first)
    return m.group(1) if m and Element.is_valid_symbol(m.group(1)) else None


def prompt_for(formula: str | None, spacegroup: str | None) -> str:
    """The generation prompt for a lab `engine.crystal.prompts.Prompt`'s cell formula and H-M symbol."""
    number = None
    if spacegroup:
        from engine.crystal.prompts import spacegroup_choices

        number = next((n for n, sym in spacegroup_choices() if sym == spacegroup), None)
    return generation_prompt(formula, number)


# ---- training examples -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One crystal the training mix draws from: its structure and what a prompt may state about it.

    Attributes:
        structure: The crystal.
        formula: Cell formula as the lab writes it (``"Na4Cl4"``).
        spacegroup_number: International number (1-230) or None.
        e_hull: Energy above the convex hull in eV/atom, or None when unknown.
    """

    structure: Structure
    formula: str
    spacegroup_number: int | None = None
    e_hull: float | None = None


def training_text(example: Example, rng: np.random.Generator, *, infill_fraction: float = INFILL_FRACTION,
                  condition_probability: float = CONDITION_PROBABILITY) -> str:
    """One training text for ``example``: a fresh translation, then a generation task (each known condition stated
    with probability ``condition_probability``) or, with probability ``infill_fraction``, an infill task."""
    body = structure_to_text(example.structure, rng)
    if rng.random() < infill_fraction:
        elements = sorted({getattr(s.specie, "symbol", str(s.specie)) for s in example.structure})
        element = elements[int(rng.integers(len(elements)))]
        return infill_prompt(mask_element(body, element)) + element + "\n"
    state = {k: bool(rng.random() < condition_probability) for k in ("formula", "spacegroup_number", "e_hull")}
    prompt = generation_prompt(example.formula if state["formula"] else None,
                               example.spacegroup_number if state["spacegroup_number"] else None,
                               example.e_hull if state["e_hull"] else None)
    return prompt + body


_SG_NUMBER_RE = re.compile(r"^_symmetry_Int_Tables_number\s+(\d+)", re.M)


def example_from_cif(cif_text: str) -> Example:
    """An `Example` from a canonical CIF (the lab's datasets keep them as token files; `iter_cifs` decodes them).

    Raises:
        InputError: the CIF cannot be read.
    """
    from engine.crystal.canonical import cell_formula
    from engine.crystal.postprocess import postprocess
    from engine.evaluate.checks import parse_structure

    processed = postprocess(cif_text, True)  # the model view lacks the symmetry operators: restore them
    structure, _, detail = parse_structure(processed.cif) if processed.cif else (None, None, processed.error)
    if structure is None:
        head = cif_text.split("\n", 1)[0]
        raise InputError(f"dataset CIF {head} cannot be read ({detail}); rebuild the dataset")
    m = _SG_NUMBER_RE.search(cif_text)
    return Example(structure, cell_formula(structure.composition), int(m.group(1)) if m else None)

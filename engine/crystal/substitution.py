"""Element substitution in a structure, and the chemistry checks that screen replacement elements.

`substitute` swaps every site of one element for another in the pymatgen structure and writes the canonical CIF
again, so the ``data_`` line, atom-property rows, formulas and site labels are regenerated for the new element
(element order follows electronegativity, so a substitution can reorder them). The filters say why a candidate
fails, or None when it passes:

- ``oxidation``: the substituted composition admits a charge-neutral assignment of smact's 2014 oxidation states
  with electronegativity ordering (CDVAE's compositional validity, `engine.evaluate.checks.smact_valid`);
- ``radius``: the candidate's Shannon ionic radius (pymatgen) at the oxidation state the hidden element takes in
  the original composition lies within `RADIUS_TOLERANCE` of the hidden element's radius (the Goldschmidt rule
  for solid solutions allows about 15 %; 35 % keeps structural analogues such as K for Na, 1.52 / 1.16 A).
"""

from __future__ import annotations

import math
import warnings

from pymatgen.core import Composition, Element, Species, Structure

from engine.crystal.canonical import canonicalize_structure
from engine.crystal.vocab import ELEMENTS
from engine.lab.errors import InputError

FILTERS = ("none", "oxidation", "radius")
RADIUS_TOLERANCE = 0.35
"""Largest relative difference of ionic radii, |r_candidate / r_hidden - 1|, that the radius filter accepts."""


def candidate_elements(structure: Structure, element: str) -> list[str]:
    """The vocabulary's elements that could replace ``element``: all 89 except the structure's other elements
    (a substitution that merges two species is not an infill); ``element`` itself is kept, in vocabulary order."""
    others = {el.symbol for el in structure.composition.elements} - {element}
    return [el for el in ELEMENTS if el not in others]


def substitute(structure: Structure, element: str, candidate: str) -> tuple[Structure, str]:
    """``structure`` with every ``element`` site turned into ``candidate``, and its canonical CIF.

    Raises:
        InputError: as `engine.crystal.canonical.canonicalize_structure`.
    """
    swapped = structure.copy()
    if candidate != element:
        swapped.replace_species({Element(element): Element(candidate)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns that He, Ne and Ar have no Pauling electronegativity
        return swapped, canonicalize_structure(swapped)


def _oxidation_states(composition: Composition) -> dict[str, float]:
    """Most likely oxidation state per element (pymatgen's bond-valence-free guess); empty when none balances."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = composition.oxi_state_guesses(max_sites=-50)
    return dict(guesses[0]) if guesses else {}


def ionic_radius(element: str, oxidation: float | None) -> float | None:
    """Shannon ionic radius of ``element`` at ``oxidation`` in angstrom (pymatgen), else its average ionic
    radius; None when pymatgen has neither."""
    if oxidation is not None and float(oxidation).is_integer() and oxidation != 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                radius = Species(element, int(oxidation)).ionic_radius
            except ValueError:
                radius = None
        if radius:
            return float(radius)
    average = float(Element(element).average_ionic_radius)
    return average if average > 0 else None


class Screen:
    """The chemistry filter for one hidden element of one structure (the original's oxidation states are guessed
    once)."""

    def __init__(self, structure: Structure, element: str, kind: str) -> None:
        if kind not in FILTERS:
            raise InputError(f"--filter {kind!r}: give one of {', '.join(FILTERS)}")
        self.kind = kind
        self.element = element
        self.composition = structure.composition
        self._oxidation = _oxidation_states(self.composition).get(element) if kind == "radius" else None
        self._radius = ionic_radius(element, self._oxidation) if kind == "radius" else None

    def reason(self, candidate: str) -> str | None:
        """Why ``candidate`` fails the filter, or None when it passes (always None for ``none``)."""
        if self.kind == "none" or candidate == self.element:
            return None
        swapped = Composition({(candidate if el.symbol == self.element else el.symbol): amount
                               for el, amount in self.composition.items()})
        if self.kind == "oxidation":
            from engine.evaluate.checks import smact_valid

            ok = smact_valid(swapped)
            return None if ok else ("no charge-neutral oxidation states (smact)" if ok is False
                                    else "too many oxidation-state combinations to check")
        if self._radius is None:
            return None  # nothing to compare against: the hidden element has no known ionic radius
        radius = ionic_radius(candidate, self._oxidation)
        if radius is None:
            return "no ionic radius known (pymatgen)"
        ratio = radius / self._radius
        if math.isfinite(ratio) and abs(ratio - 1) <= RADIUS_TOLERANCE:
            return None
        return (f"ionic radius {radius:.2f} Å is {ratio:.2f}x that of {self.element} ({self._radius:.2f} Å); "
                f"allowed {1 - RADIUS_TOLERANCE:.2f}-{1 + RADIUS_TOLERANCE:.2f}")

"""The built-in corpus: thousands of plausible inorganic crystals generated on the spot, no downloads.

Every structure is one prototype of `engine.data.prototypes` (rock salt, perovskite, spinel, full Heusler, ...) with
elements of the CrystaLLM vocabulary on its sites:

- ionic families: charge-balanced cation/anion choices from pymatgen's common oxidation states;
- intermetallic families: elements from per-site pools of metals.

The cell is scaled so that each declared bond lands at a radius-based length. That length is the one CrystaLLM's
bond-length check expects (ionic: average cationic + average anionic radius when the Pauling electronegativity
difference is >= 1.7; otherwise the sum of atomic radii), corrected for coordination number as Shannon's radii
are (shorter bonds at low coordination, longer at high). A composition is kept only when one scale puts every
declared bond within `BOND_RATIO_WINDOW` of the expected length and no two non-bonded atoms come closer than
`CONTACT_FRACTION` of their radius sum: the generalisation of Goldschmidt's tolerance factor and Pauling's
radius-ratio rule to any prototype.

Same seed, same list, same order; ids are ``<family>-<reduced formula>`` (``rocksalt-NaCl``) and unique.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.data.prototypes import PROTOTYPES, Prototype
from engine.lab.errors import InputError

_VOCAB_PATH = Path(__file__).resolve().parents[1] / "resources" / "crystallm_vocab.json"

BOND_RATIO_WINDOW = (0.80, 1.22)
"""Accepted range of (bond length / expected length), dimensionless. CrystaLLM accepts 0.68-1.32; the margin
absorbs CrystalNN counting slightly longer or shorter contacts than the declared bonds."""

CONTACT_FRACTION = 0.80
"""Non-bonded atoms must be at least this fraction (dimensionless) of their radius sum apart (ionic radii for
ions, atomic radii for metals)."""

_SHELL_TOLERANCE = 1.15
"""Distances up to this factor (dimensionless) above the shortest A-X distance count as the same bond shell."""

# Bond length relative to octahedral coordination, from the trend of Shannon radii with coordination number.
_CN_FACTOR = {2: 0.88, 3: 0.91, 4: 0.94, 5: 0.97, 6: 1.0, 7: 1.02, 8: 1.04, 9: 1.06, 10: 1.08, 11: 1.095, 12: 1.11}

_NOBLE_GASES = frozenset({"He", "Ne", "Ar", "Kr", "Xe"})
_METALLOID_CATIONS = frozenset({"B", "Si", "Ge", "As", "Sb", "Te"})
_P_BLOCK_CATIONS = _METALLOID_CATIONS | {"Bi"}
"""Cations that are only plausible with a clearly more electronegative anion (As2S3 yes, SbAs no)."""
_P_BLOCK_MIN_ANION_X = 2.58
_P_BLOCK_MIN_DELTA_X = 0.35

RADIUS_RATIO_LIMITS = {"max_at_cn4": 0.90, "min_at_cn8": 0.60, "min_at_cn12": 0.80}
"""Loose Pauling radius-ratio rule on (average cationic radius / average anionic radius), dimensionless: a
cation with 4 or fewer anion neighbours must not be larger than this fraction of the anion, one with 8 (12) or
more must not be smaller (keeps LiCl out of the CsCl type, CsCl out of zinc blende, Mn off the perovskite A site)."""


@lru_cache(maxsize=1)
def vocabulary_elements() -> frozenset[str]:
    """The 89 element symbols of the CrystaLLM vocabulary (its first 89 tokens)."""
    tokens = json.loads(_VOCAB_PATH.read_text())["tokens_in_id_order"]
    return frozenset(tokens[:89])


def families() -> list[str]:
    """Names of the prototype families, in generation order."""
    return [p.name for p in PROTOTYPES]


@lru_cache(maxsize=None)
def _props(symbol: str) -> tuple[float, float, float, float]:
    """(Pauling X, average cationic radius, average anionic radius, atomic radius) in Angstrom (X unitless)."""
    el = Element(symbol)
    return float(el.X), float(el.average_cationic_radius), float(el.average_anionic_radius), float(el.atomic_radius)


@lru_cache(maxsize=None)
def expected_bond_length(a: str, b: str) -> tuple[float, bool]:
    """The bond length CrystaLLM's bond-length check expects between elements ``a`` and ``b``.

    Returns:
        (length in Angstrom, whether the bond counts as ionic). The length is 0 when an ionic bond involves an
        element without a tabulated cationic/anionic radius (the check would then be meaningless).
    """
    xa, cat_a, an_a, rad_a = _props(a)
    xb, cat_b, an_b, rad_b = _props(b)
    if abs(xa - xb) >= 1.7:
        length = cat_a + an_b if xa < xb else an_a + cat_b
        radii_known = (cat_a > 0 and an_b > 0) if xa < xb else (an_a > 0 and cat_b > 0)
        return (length if radii_known else 0.0), True
    return rad_a + rad_b, False


@dataclass(frozen=True)
class _Template:
    """A prototype expanded to its conventional cell at a = 1 (unit length)."""

    prototype: Prototype
    matrix: np.ndarray  # (3, 3) lattice vectors for a = 1
    roles: tuple[str, ...]  # role of each site
    frac_coords: np.ndarray  # (N, 3)
    counts: dict[str, int]  # sites per role in the reduced formula
    bonds: tuple[tuple[str, str, float, int, int], ...]  # (role a, role b, length at a = 1, CN of a, CN of b)
    contacts: tuple[tuple[str, str, float], ...]  # non-bonded role pairs: (role, role, shortest length at a = 1)


@lru_cache(maxsize=None)
def _template(proto: Prototype) -> _Template:
    lattice = {
        "cubic": lambda: Lattice.cubic(1.0),
        "tetragonal": lambda: Lattice.tetragonal(1.0, proto.c_over_a),
        "hexagonal": lambda: Lattice.hexagonal(1.0, proto.c_over_a),
    }[proto.lattice]()
    # Placeholder elements only carry the role through the symmetry expansion (as site labels).
    placeholders = ["Li", "Na", "K", "Rb"][: len(proto.sites)]
    structure = Structure.from_spacegroup(
        proto.spacegroup, lattice, placeholders, [xyz for _, xyz in proto.sites], labels=[r for r, _ in proto.sites]
    )
    roles = tuple(site.label for site in structure)
    n_per_role = {r: roles.count(r) for r in proto.roles}
    divisor = math.gcd(*n_per_role.values())

    pair_dists: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for i, neighbors in enumerate(structure.get_all_neighbors(1.3)):
        for nb in neighbors:
            pair_dists.setdefault((roles[i], roles[nb.index]), []).append((i, nb.nn_distance))

    def shell(ra: str, rb: str) -> tuple[list[float], int]:
        """Distances of the first coordination shell of rb around ra, and how many rb surround one ra."""
        items = pair_dists[(ra, rb)]
        shortest = min(d for _, d in items)
        kept = [(i, d) for i, d in items if d <= shortest * _SHELL_TOLERANCE]
        return [d for _, d in kept], sum(1 for i, _ in kept if i == kept[0][0])

    declared = {tuple(sorted(pair)) for pair in proto.bonds}
    bonds, contacts = [], []
    for ra, rb in sorted(pair_dists):
        if ra > rb:
            continue
        if (ra, rb) not in declared:
            contacts.append((ra, rb, min(d for _, d in pair_dists[(ra, rb)])))
            continue
        dists, cn_a = shell(ra, rb)
        _, cn_b = shell(rb, ra)
        bonds.extend((ra, rb, d, cn_a, cn_b) for d in sorted({round(d, 6) for d in dists}))
    return _Template(
        proto,
        lattice.matrix.copy(),
        roles,
        structure.frac_coords.copy(),
        {r: n // divisor for r, n in n_per_role.items()},
        tuple(bonds),
        tuple(contacts),
    )


def _size_radius(symbol: str, charge: int | None) -> float:
    """Radius (Angstrom) used for the non-bonded contact rule: ionic for ions, atomic for metals."""
    _, cat, an, atomic = _props(symbol)
    if charge is None or charge == 0:
        return atomic
    return cat if charge > 0 else an


def _fit_scale(tpl: _Template, elements: dict[str, str], charges: dict[str, int] | None) -> float | None:
    """Cell length a (Angstrom) that best fits the declared bonds, or None when the composition does not fit."""
    log_offsets, checks = [], []
    for ra, rb, d0, cn_a, cn_b in tpl.bonds:
        expected, ionic = expected_bond_length(elements[ra], elements[rb])
        if expected <= 0:
            return None
        # The coordination correction follows the cation: the end with the lower electronegativity.
        cation_cn = cn_a if _props(elements[ra])[0] <= _props(elements[rb])[0] else cn_b
        factor = _CN_FACTOR.get(cation_cn, 1.0) if ionic else 1.0
        log_offsets.append(math.log(d0 / (expected * factor)))
        checks.append((d0, expected))
    if not log_offsets:
        return None
    if charges and not _radius_ratio_ok(tpl, elements, charges):
        return None
    scale = math.exp(-(max(log_offsets) + min(log_offsets)) / 2)
    low, high = BOND_RATIO_WINDOW
    if any(not low <= scale * d0 / expected <= high for d0, expected in checks):
        return None
    for ra, rb, d0 in tpl.contacts:
        qa = charges.get(ra) if charges else None
        qb = charges.get(rb) if charges else None
        radius_sum = _size_radius(elements[ra], qa) + _size_radius(elements[rb], qb)
        expected, _ = expected_bond_length(elements[ra], elements[rb])
        if scale * d0 < CONTACT_FRACTION * radius_sum or (expected > 0 and scale * d0 < low * expected):
            return None
    return round(scale, 4)  # 1e-4 angstrom is far below any tolerance, and the CIF reads cleanly


def _radius_ratio_ok(tpl: _Template, elements: dict[str, str], charges: dict[str, int]) -> bool:
    """Whether every cation-anion bond obeys `RADIUS_RATIO_LIMITS` for the cation's coordination number."""
    for ra, rb, _, cn_a, cn_b in tpl.bonds:
        if charges[ra] * charges[rb] >= 0:
            continue
        (cation, cn), anion = ((ra, cn_a), rb) if charges[ra] > 0 else ((rb, cn_b), ra)
        anion_radius = _props(elements[anion])[2]
        if anion_radius <= 0:  # no tabulated anionic radius (e.g. Sb3-): the rule cannot be applied
            continue
        ratio = _props(elements[cation])[1] / anion_radius
        if cn <= 4 and ratio > RADIUS_RATIO_LIMITS["max_at_cn4"]:
            return False
        if cn >= 8 and ratio < RADIUS_RATIO_LIMITS["min_at_cn8"]:
            return False
        if cn >= 12 and ratio < RADIUS_RATIO_LIMITS["min_at_cn12"]:
            return False
    return True


@lru_cache(maxsize=1)
def _cation_options() -> tuple[tuple[str, int], ...]:
    """(element, positive common oxidation state) pairs usable as cations, in a fixed order."""
    options = []
    for symbol in sorted(vocabulary_elements() - _NOBLE_GASES - {"H"}):
        el = Element(symbol)
        if not (el.is_metal or symbol in _METALLOID_CATIONS):
            continue
        if el.average_cationic_radius <= 0:
            continue
        options.extend((symbol, q) for q in el.common_oxidation_states if q > 0)
    return tuple(options)


@dataclass(frozen=True)
class _Candidate:
    formula: str  # reduced formula
    elements: tuple[tuple[str, str], ...]  # (role, element)
    charges: tuple[tuple[str, int], ...]  # (role, formal charge); empty for intermetallics
    a: float  # cell length a in Angstrom (c follows from c/a)


def _ionic_assignments(proto: Prototype, tpl: _Template) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    cation_roles = [r for r in proto.roles if r != "X"]
    for anion, q_anion in proto.anions:
        x_anion = _props(anion)[0]
        options = [
            (el, q)
            for el, q in _cation_options()
            if el != anion
            and _props(el)[0] < x_anion
            and (
                el not in _P_BLOCK_CATIONS
                or (x_anion >= _P_BLOCK_MIN_ANION_X and x_anion - _props(el)[0] >= _P_BLOCK_MIN_DELTA_X)
            )
        ]
        for combo in itertools.product(options, repeat=len(cation_roles)):
            if len({el for el, _ in combo}) < len(combo):
                continue
            if sum(tpl.counts[r] * q for r, (_, q) in zip(cation_roles, combo)) + tpl.counts["X"] * q_anion != 0:
                continue
            elements = {r: el for r, (el, _) in zip(cation_roles, combo)} | {"X": anion}
            charges = {r: q for r, (_, q) in zip(cation_roles, combo)} | {"X": q_anion}
            yield elements, charges


def _metallic_assignments(proto: Prototype) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    vocab = vocabulary_elements()
    roles = [r for r, _ in proto.metals]
    pools = [[el for el in pool if el in vocab] for _, pool in proto.metals]
    for combo in itertools.product(*pools):
        if len(set(combo)) == len(combo):
            yield dict(zip(roles, combo)), {}


@lru_cache(maxsize=None)
def _candidates(proto: Prototype) -> tuple[_Candidate, ...]:
    """Every distinct composition that fits the prototype, sorted by formula (seed independent)."""
    tpl = _template(proto)
    assignments = _ionic_assignments(proto, tpl) if proto.ionic else _metallic_assignments(proto)
    found: dict[str, _Candidate] = {}
    for elements, charges in assignments:
        a = _fit_scale(tpl, elements, charges or None)
        if a is None:
            continue
        formula = Composition({elements[r]: n for r, n in tpl.counts.items()}).reduced_formula
        if formula not in found:
            found[formula] = _Candidate(formula, tuple(elements.items()), tuple(charges.items()), a)
    return tuple(found[f] for f in sorted(found))


def corpus_size() -> int:
    """Number of distinct structures the generator can produce (all families together)."""
    return sum(len(_candidates(p)) for p in PROTOTYPES)


def _build(proto: Prototype, cand: _Candidate) -> Structure:
    tpl = _template(proto)
    elements = dict(cand.elements)
    structure = Structure(
        Lattice(tpl.matrix * cand.a), [elements[r] for r in tpl.roles], tpl.frac_coords, validate_proximity=False
    )
    structure.properties = {
        "prototype": proto.name,
        "oxidation_states": {elements[r]: q for r, q in cand.charges} or None,
    }
    return structure


def generate_structures(n: int = 5000, seed: int = 0) -> list[tuple[str, Structure]]:
    """Generate ``n`` distinct prototype crystals.

    Families take turns (each in its own seeded shuffled order), so any ``n`` covers every family evenly until
    the small ones run out.

    Args:
        n: Number of structures, at most `corpus_size()`.
        seed: Same seed, same structures in the same order.

    Returns:
        (id, structure) pairs; ids are ``<family>-<reduced formula>``. Each structure's ``properties`` hold
        ``prototype`` and ``oxidation_states`` (element -> formal charge; None for intermetallics).
    """
    if not isinstance(n, int) or n < 0:
        raise InputError(f"corpus size n={n!r} must be a non-negative integer")
    queues = []
    for proto in PROTOTYPES:
        order = list(_candidates(proto))
        random.Random(f"{seed}:{proto.name}").shuffle(order)
        queues.append((proto, order))
    total = sum(len(order) for _, order in queues)
    if n > total:
        raise InputError(f"corpus size n={n} is more than the {total} distinct structures the generator can make; "
                         f"ask for at most {total}")
    out: list[tuple[str, Structure]] = []
    for depth in itertools.count():
        for proto, order in queues:
            if len(out) == n:
                return out
            if depth < len(order):
                out.append((f"{proto.name}-{order[depth].formula}", _build(proto, order[depth])))
    return out


def corpus_cifs(n: int = 5000, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Yield (id, CIF text) for `generate_structures` (P1 CIFs from pymatgen ``CifWriter``)."""
    for sid, structure in generate_structures(n, seed):
        yield sid, str(CifWriter(structure))

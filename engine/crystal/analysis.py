"""Analyses of one crystal structure for the Structure page: symmetry, lattice and sites, bonds, powder XRD.

Each function takes a pymatgen ``Structure`` and returns plain data (dicts, DataFrames) the page draws; none of
them imports streamlit. Bond lengths are judged by the rule of the CrystaLLM bond-length check (see
``engine.evaluate.checks``): CrystalNN neighbours, expected length from ionic radii when the electronegativity
difference is at least 1.7, otherwise from atomic radii; reasonable when 0.68 < d / expected < 1.32, or
d / expected < 2.5 when hydrogen takes part.
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import pandas as pd
import spglib
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.analysis.local_env import CrystalNN
from pymatgen.core import Element, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from engine.evaluate import checks
from engine.lab.errors import InputError

MAX_ANALYSIS_SITES = 500
"""Structures with more sites than this are refused: neighbour finding on them takes minutes."""


def load_structure(cif_text: str, label: str = "CIF") -> Structure:
    """Parse CIF text (a post-processed sample, an uploaded file) into a Structure.

    Raises:
        InputError: the text is not a readable CIF; the message gives pymatgen's reason.
    """
    structure, reason, detail = checks.parse_structure(cif_text)
    if structure is None:
        raise InputError(f"{label} cannot be read as a crystal structure: {_what_is_wrong(reason, detail)}; "
                         "check that it is a complete CIF (a data_ line, cell lengths and angles, and an "
                         "_atom_site loop with element and fractional coordinates)")
    return structure


def _what_is_wrong(reason: str | None, detail: str | None) -> str:
    """pymatgen's parser messages (several lines, quoted key names) said in one clause."""
    detail = " ".join((detail or "").split())
    missing = re.findall(r"'(_[a-z_]+)'", detail)
    if reason == "parse_error" and "no structures" in detail.lower():
        return "no crystal structure was found in the text"
    if missing:
        return f"the CIF key {', '.join(dict.fromkeys(missing))} is missing or unreadable"
    if reason == "unknown_element":
        return detail or "an element symbol is not known"
    first = re.split(r"(?<=[.!?])\s", detail, maxsplit=1)[0] if detail else (reason or "unknown reason")
    return first.rstrip(".")[:160]


def _guard_size(structure: Structure) -> None:
    if len(structure) > MAX_ANALYSIS_SITES:
        raise InputError(
            f"the structure has {len(structure)} sites (more than {MAX_ANALYSIS_SITES}); "
            "this analysis would take minutes, so pick a smaller structure"
        )


_WYCKOFF_LETTERS = "abcdefghijklmnopqrstuvwxyzA"
"""spglib's Wyckoff letters in International Tables order; ``A`` stands for the 27th letter, alpha."""


def symmetry(structure: Structure, symprec: float = 0.1, angle_tolerance: float = 5.0) -> dict:
    """Space group, Wyckoff positions and symmetry operations found by spglib at the given tolerances.

    Wyckoff positions and the operation count follow the International Tables: they refer to the conventional
    standard cell, whatever cell the structure is given in (a primitive spinel cell still reads Mn 8a, Lu 16d,
    S 32e, and Fd-3m has 192 operations).

    Args:
        symprec: distance tolerance in Å for two positions to count as the same (0.1 is CrystaLLM's choice).
        angle_tolerance: angle tolerance in degrees.

    Returns:
        ``{"symbol", "number", "crystal_system", "point_group", "n_operations", "n_operations_cell", "wyckoff",
        "site_wyckoff", "error"}``. ``n_operations``: operations of the conventional cell (point-group operations
        times centring translations); ``n_operations_cell``: operations spglib finds in the cell as given
        (fewer in a primitive cell, more in a supercell). ``wyckoff``: one dict per orbit of symmetry-equivalent
        sites, in International Tables letter order: ``element``, ``wyckoff`` (conventional multiplicity and
        letter, e.g. ``"8a"``), ``site_symmetry``, ``sites`` (how many of the given cell's sites it holds).
        ``site_wyckoff``: the Wyckoff label of every site of the given cell, in site order. When spglib cannot
        decide, ``error`` holds its reason and the other values are None.
    """
    _guard_size(structure)
    try:
        sga = SpacegroupAnalyzer(structure, symprec=symprec, angle_tolerance=angle_tolerance)
        data = sga.get_symmetry_dataset()
        # Sites per conventional cell / sites per given cell: 4 for a primitive cell of an F lattice, 1/8 for a
        # 2x2x2 supercell of a conventional cell; multiplicities and operation counts scale by it.
        to_conventional = len(data.std_types) / len(structure)
        n_primitive = len(set(data.mapping_to_primitive))
        point_group_order = len({r.tobytes() for r in data.rotations})
        orbits: dict[int, list[int]] = {}
        for i, rep in enumerate(data.equivalent_atoms):
            orbits.setdefault(int(rep), []).append(i)
        labels, wyckoff = {}, []
        for rep, members in orbits.items():
            letter = data.wyckoffs[rep]
            label = f"{round(len(members) * to_conventional)}{'α' if letter == 'A' else letter}"
            labels[rep] = label
            wyckoff.append({"element": structure[rep].species_string, "wyckoff": label,
                            "site_symmetry": data.site_symmetry_symbols[rep], "sites": len(members),
                            "_order": (_WYCKOFF_LETTERS.index(letter), structure[rep].species_string)})
        wyckoff.sort(key=lambda w: w.pop("_order"))
        return {
            "symbol": sga.get_space_group_symbol(),
            "number": sga.get_space_group_number(),
            "crystal_system": sga.get_crystal_system(),
            "point_group": sga.get_point_group_symbol(),
            "n_operations": point_group_order * round(len(data.std_types) / n_primitive),
            "n_operations_cell": len(data.rotations),
            "wyckoff": wyckoff,
            "site_wyckoff": [labels[int(rep)] for rep in data.equivalent_atoms],
            "error": None,
        }
    except (ValueError, TypeError, AttributeError) as exc:  # includes pymatgen's SymmetryUndeterminedError
        return {"symbol": None, "number": None, "crystal_system": None, "point_group": None,
                "n_operations": None, "n_operations_cell": None, "wyckoff": None, "site_wyckoff": None,
                "error": f"symmetry undetermined at symprec {symprec} Å: {exc}"}


@functools.cache
def spacegroup_label(symbol: object) -> str | None:
    """A space-group symbol as charts and cards show it, with its number: ``"P6_3/mmc (194)"``.

    Symbols pymatgen does not know are returned as given; None and NaN (no space group found) give None.
    """
    if not isinstance(symbol, str) or not symbol.strip():
        return None
    from pymatgen.symmetry.groups import SpaceGroup

    try:
        return f"{symbol} ({SpaceGroup(symbol).int_number})"
    except ValueError:
        return symbol


def conventional_cell(structure: Structure, symprec: float = 0.1, angle_tolerance: float = 5.0) -> Structure | None:
    """The same crystal in its conventional standard cell (International Tables setting, spglib's choice).

    Positions and cell lengths are the given ones, only re-expressed in the new cell: nothing is symmetrised,
    so a slightly distorted sample keeps its distortion (and its split XRD peaks).

    Args:
        symprec: distance tolerance in Å used to find the space group.
        angle_tolerance: angle tolerance in degrees.

    Returns:
        The conventional cell, or None when spglib finds no space group at these tolerances.
    """
    _guard_size(structure)
    kinds: dict[str, int] = {}
    numbers = [kinds.setdefault(site.species_string, len(kinds) + 1) for site in structure]
    species = {number: structure[numbers.index(number)].species for number in kinds.values()}
    cell = (structure.lattice.matrix, structure.frac_coords, numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib's notice about its error-handling switch
        try:
            std = spglib.standardize_cell(cell, to_primitive=False, no_idealize=True, symprec=symprec,
                                          angle_tolerance=angle_tolerance)
        except spglib.SpglibError:
            return None
    if std is None:
        return None
    lattice, positions, std_numbers = std
    return Structure(Lattice(lattice), [species[int(n)] for n in std_numbers], positions)


def lattice_info(structure: Structure) -> dict:
    """Cell lengths (Å), angles (degrees), volume (Å^3), density (g/cm^3), formula and site count."""
    lat = structure.lattice
    return {
        "formula": structure.composition.formula,
        "reduced_formula": structure.composition.reduced_formula,
        "a": lat.a, "b": lat.b, "c": lat.c,
        "alpha": lat.alpha, "beta": lat.beta, "gamma": lat.gamma,
        "volume": lat.volume,
        "density": float(structure.density),
        "n_sites": len(structure),
        "volume_per_atom": lat.volume / max(len(structure), 1),
    }


_CIF_NUMBER = re.compile(r"^[-+]?\d*\.(\d+)(\(\d+\))?$")


def cif_precision(cif_text: str, default: int = 6) -> int:
    """Decimal places of the fractional coordinates a CIF gives (the most any of them has; 4 to 10).

    Read from the ``_atom_site`` loop: the values after the ``_atom_site_fract_x`` header up to the next loop.
    ``default`` when the text has no such loop (a structure that did not come from CIF text).
    """
    decimals, in_sites = [], False
    for line in cif_text.splitlines():
        s = line.strip()
        if s.startswith("_atom_site_fract_"):
            in_sites = True
        elif in_sites and (s.startswith("loop_") or s.startswith("data_")):
            break
        elif in_sites and s and not s.startswith("_"):
            decimals += [len(m.group(1)) for tok in s.split() if (m := _CIF_NUMBER.match(tok))]
    return min(max(max(decimals), 4), 10) if decimals else default


def sites_table(structure: Structure, decimals: int = 6) -> pd.DataFrame:
    """One row per site: element, fractional and Cartesian (Å) coordinates, occupancy.

    Args:
        decimals: fractional coordinates are rounded to this many places (:func:`cif_precision` of the CIF the
            structure was read from), Cartesian ones to 4 (1e-4 Å), so parsing noise such as
            ``2e-16`` reads 0.
    """
    rows = []
    for i, site in enumerate(structure):
        f, c = np.round(site.frac_coords, decimals) + 0.0, np.round(site.coords, 4) + 0.0  # + 0.0: no "-0.0"
        rows.append({
            "site": i,
            "element": site.species_string,
            "x": f[0], "y": f[1], "z": f[2],
            "cart_x": c[0], "cart_y": c[1], "cart_z": c[2],
            "occupancy": float(sum(site.species.values())),
        })
    return pd.DataFrame(rows)


def expected_bond_length(el1: str, el2: str) -> tuple[float, bool]:
    """Expected length (Å) of a bond between two elements and whether it counts as ionic (CrystaLLM rule).

    Ionic (Pauling electronegativity difference >= 1.7): average cationic radius of the less electronegative
    element plus average anionic radius of the other; otherwise the sum of atomic radii. Radii as in
    ``engine.evaluate.checks`` (the values behind CrystaLLM's published verdicts).
    """
    a, b = Element(el1), Element(el2)
    if abs(a.X - b.X) >= checks.IONIC_DELTA_X:
        cation, anion = (a, b) if a.X < b.X else (b, a)
        return checks.cationic_radius(cation.symbol) + float(anion.average_anionic_radius), True
    return float(a.atomic_radius) + float(b.atomic_radius), False


def neighbour_bonds(structure: Structure) -> pd.DataFrame:
    """CrystalNN nearest-neighbour bonds with their expected lengths, judged as the CrystaLLM score judges them.

    Returns:
        One row per (site, neighbour) bond: ``site, element, neighbour, distance`` (Å), ``expected`` (Å),
        ``ratio`` (distance / expected), ``ionic``, ``reasonable``, ``neighbour_site`` (index of the neighbour's
        site in ``structure``) and ``image`` (the lattice translation, in cells along a, b, c, that carries that
        site onto the neighbour: ``(0, 0, -1)`` is the neighbour one cell below). Each bond appears once from
        each end and bonds from a site to its own periodic image are left out, as in the CrystaLLM score.
    """
    _guard_size(structure)
    nn = CrystalNN()
    rows = []
    lo, hi = 1 - checks.BOND_TOLERANCE, 1 + checks.BOND_TOLERANCE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CrystalNN warns about guessed oxidation states on every call
        for i, site in enumerate(structure):
            for info in nn.get_nn_info(structure, i):
                if info["site_index"] == i:
                    continue
                other = info["site"]
                el1, el2 = site.specie.symbol, other.specie.symbol
                dist = float(site.distance(other))
                expected, ionic = expected_bond_length(el1, el2)
                ratio = dist / expected
                ok = ratio < checks.H_BOND_FACTOR if "H" in (el1, el2) else lo < ratio < hi
                j = int(info["site_index"])
                image = tuple(int(v) for v in np.round(other.frac_coords - structure[j].frac_coords))
                rows.append({"site": i, "element": el1, "neighbour": el2, "distance": dist,
                             "expected": expected, "ratio": ratio, "ionic": ionic, "reasonable": bool(ok),
                             "neighbour_site": j, "image": image})
    return pd.DataFrame(rows, columns=["site", "element", "neighbour", "distance", "expected", "ratio",
                                       "ionic", "reasonable", "neighbour_site", "image"])


def bond_summary(bonds: pd.DataFrame) -> pd.DataFrame:
    """Bonds grouped by element pair: count, mean / min / max length (Å), expected (Å), share reasonable."""
    if bonds.empty:
        return pd.DataFrame(columns=["pair", "count", "mean", "min", "max", "expected", "reasonable"])
    pair = [" - ".join(sorted((a, b))) for a, b in zip(bonds["element"], bonds["neighbour"])]
    g = bonds.assign(pair=pair).groupby("pair")
    return pd.DataFrame({
        "count": g.size(),
        "mean": g["distance"].mean(), "min": g["distance"].min(), "max": g["distance"].max(),
        "expected": g["expected"].first(),
        "reasonable": g["reasonable"].mean(),
    }).reset_index()


def xrd_pattern(structure: Structure, wavelength: str | float = "CuKa",
                two_theta_range: tuple[float, float] = (5.0, 90.0), symprec: float | None = 0.1) -> pd.DataFrame:
    """Simulated powder X-ray diffraction peaks (pymatgen ``XRDCalculator``), indexed on the conventional cell.

    Peak positions and intensities do not depend on the cell the crystal is written in; the Miller indices do.
    They are given on the conventional standard cell (``conventional_cell``), as diffraction tables give them:
    the strongest peak of a spinel is (3 1 1), not the primitive cell's (2 2 1).

    Args:
        wavelength: an anode name (``"CuKa"``, ``"MoKa"``, ...) or a wavelength in Å.
        two_theta_range: scattering angles in degrees.
        symprec: distance tolerance in Å for finding the conventional cell; None, or no space group found at
            this tolerance, indexes on the cell as given.

    Returns:
        One row per peak: ``two_theta`` (degrees), ``intensity`` (scaled so the largest is 100),
        ``hkl`` (Miller indices of the contributing families), ``d_spacing`` (Å).
    """
    _guard_size(structure)
    if not two_theta_range[0] < two_theta_range[1]:
        raise InputError(f"two-theta range {two_theta_range} is empty; give (min, max) with min < max")
    conventional = conventional_cell(structure, symprec=symprec) if symprec is not None else None
    try:
        pattern = XRDCalculator(wavelength=wavelength).get_pattern(conventional or structure,
                                                                   two_theta_range=two_theta_range)
    except (ValueError, KeyError) as exc:
        raise InputError(f"cannot simulate XRD with wavelength {wavelength!r}: {exc}") from exc
    hkls = [", ".join("(" + " ".join(str(i) for i in fam["hkl"]) + ")" for fam in peak) for peak in pattern.hkls]
    return pd.DataFrame({"two_theta": pattern.x, "intensity": pattern.y, "hkl": hkls,
                         "d_spacing": pattern.d_hkls})

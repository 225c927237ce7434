"""Prototype crystal families for the built-in corpus: geometry and which elements may sit on which site.

Each `Prototype` is one structure type (rock salt, spinel, full Heusler, ...) written as its space group, its
lattice shape and its symmetry-distinct (Wyckoff) sites, each site tagged with a *role* (``A``, ``B``, ``X``).
`engine.data.corpus` expands the sites once with pymatgen ``Structure.from_spacegroup``, puts elements on the roles
and scales the cell so that the declared bonds land at radius-based lengths.

Internal coordinates and axial ratios are typical experimental values of the archetype (e.g. rutile TiO2
u = 0.305, c/a = 0.644; corundum Al2O3 z = 0.352, x = 0.306, c/a = 2.73), kept fixed for every composition:
only the cell scale changes, so a family's bond topology is the same for all its members.
"""

from __future__ import annotations

from dataclasses import dataclass

# Anion choices as (element, formal charge). Pyrite's anion is the X2^2- dimer, hence -1 per atom.
HALIDES = (("F", -1), ("Cl", -1), ("Br", -1), ("I", -1))
HEAVY_HALIDES = (("Cl", -1), ("Br", -1), ("I", -1))
CHALCOGENIDES = (("O", -2), ("S", -2), ("Se", -2), ("Te", -2))
HEAVY_CHALCOGENIDES = (("S", -2), ("Se", -2), ("Te", -2))
PNICTIDES = (("N", -3), ("P", -3), ("As", -3), ("Sb", -3))
PERSULFIDES = (("S", -1), ("Se", -1), ("Te", -1))

# Metal pools for the intermetallic families, by the role the element usually plays there.
LATE_TM = ("Fe", "Co", "Ni", "Cu", "Ru", "Rh", "Pd", "Ag", "Os", "Ir", "Pt", "Au", "Mn")
EARLY_TM = ("Sc", "Ti", "V", "Cr", "Mn", "Y", "Zr", "Nb", "Mo", "Hf", "Ta", "W", "Lu", "Tc", "Re")
RARE_EARTHS = ("La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu")
MAIN_GROUP = ("Al", "Ga", "In", "Tl", "Si", "Ge", "Sn", "Pb", "As", "Sb", "Bi", "Mg", "Zn", "Cd", "Be")
ALKALINE_EARTH = ("Mg", "Ca", "Sr", "Ba")


@dataclass(frozen=True)
class Prototype:
    """One structure type.

    Attributes:
        name: Family name, the prefix of every structure id (``rocksalt-NaCl``).
        spacegroup: Hermann-Mauguin symbol understood by pymatgen ``SpaceGroup`` (default settings: origin
            choice 1 for Fd-3m, hexagonal axes for rhombohedral groups).
        lattice: ``cubic``, ``tetragonal`` or ``hexagonal``.
        c_over_a: Axial ratio c/a (dimensionless); ignored for cubic cells.
        sites: Symmetry-distinct sites as (role, fractional coordinates).
        bonds: Role pairs that are chemical bonds; their lengths set the cell scale.
        ionic: True when roles hold ions and compositions must be charge balanced; False for intermetallics.
        anions: For ionic families, the (element, charge) choices of role ``X``.
        metals: For intermetallic families, the element pool of each role.
    """

    name: str
    spacegroup: str
    lattice: str
    c_over_a: float
    sites: tuple[tuple[str, tuple[float, float, float]], ...]
    bonds: tuple[tuple[str, str], ...]
    ionic: bool = True
    anions: tuple[tuple[str, int], ...] = ()
    metals: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles in site order, each once."""
        return tuple(dict.fromkeys(role for role, _ in self.sites))


def _p(
    name: str,
    sg: str,
    lattice: str,
    c_over_a: float,
    sites: list[tuple[str, tuple[float, float, float]]],
    bonds: list[tuple[str, str]],
    **kw,
) -> Prototype:
    """Compact constructor for the table below."""
    return Prototype(name, sg, lattice, c_over_a, tuple(sites), tuple(bonds), **kw)


_AX = [("A", "X")]
PROTOTYPES: tuple[Prototype, ...] = (
    _p("rocksalt", "Fm-3m", "cubic", 1, [("A", (0, 0, 0)), ("X", (0.5, 0.5, 0.5))], _AX,
       anions=HALIDES + CHALCOGENIDES + PNICTIDES[:3]),
    _p("cscl", "Pm-3m", "cubic", 1, [("A", (0, 0, 0)), ("X", (0.5, 0.5, 0.5))], _AX, anions=HEAVY_HALIDES),
    _p("zincblende", "F-43m", "cubic", 1, [("A", (0, 0, 0)), ("X", (0.25, 0.25, 0.25))], _AX,
       anions=HALIDES[1:] + HEAVY_CHALCOGENIDES + PNICTIDES),
    _p("wurtzite", "P6_3mc", "hexagonal", 1.633, [("A", (1 / 3, 2 / 3, 0)), ("X", (1 / 3, 2 / 3, 0.375))], _AX,
       anions=CHALCOGENIDES + PNICTIDES[:2]),
    _p("nias", "P6_3/mmc", "hexagonal", 1.40, [("A", (0, 0, 0)), ("X", (1 / 3, 2 / 3, 0.25))], _AX,
       anions=HEAVY_CHALCOGENIDES + PNICTIDES[2:]),
    _p("fluorite", "Fm-3m", "cubic", 1, [("A", (0, 0, 0)), ("X", (0.25, 0.25, 0.25))], _AX,
       anions=HALIDES + (("O", -2),)),
    _p("antifluorite", "Fm-3m", "cubic", 1, [("X", (0, 0, 0)), ("A", (0.25, 0.25, 0.25))], _AX,
       anions=CHALCOGENIDES),
    _p("rutile", "P4_2/mnm", "tetragonal", 0.644, [("A", (0, 0, 0)), ("X", (0.305, 0.305, 0))], _AX,
       anions=(("O", -2), ("F", -1))),
    _p("cdi2", "P-3m1", "hexagonal", 1.61, [("A", (0, 0, 0)), ("X", (1 / 3, 2 / 3, 0.25))], _AX,
       anions=HEAVY_HALIDES + HEAVY_CHALCOGENIDES),
    _p("corundum", "R-3c", "hexagonal", 2.73, [("A", (0, 0, 0.3523)), ("X", (0.3064, 0, 0.25))], _AX,
       anions=(("O", -2), ("S", -2))),
    _p("perovskite", "Pm-3m", "cubic", 1,
       [("B", (0, 0, 0)), ("X", (0.5, 0, 0)), ("A", (0.5, 0.5, 0.5))], [("B", "X"), ("A", "X")],
       anions=HALIDES + (("O", -2),)),
    _p("spinel", "Fd-3m", "cubic", 1,
       [("A", (0, 0, 0)), ("B", (0.625, 0.625, 0.625)), ("X", (0.3875, 0.3875, 0.3875))],
       [("A", "X"), ("B", "X")], anions=(("O", -2), ("S", -2), ("Se", -2))),
    _p("layered", "R-3m", "hexagonal", 4.99,
       [("B", (0, 0, 0)), ("A", (0, 0, 0.5)), ("X", (0, 0, 0.2604))], [("A", "X"), ("B", "X")],
       anions=(("O", -2), ("S", -2))),
    _p("reo3", "Pm-3m", "cubic", 1, [("A", (0, 0, 0)), ("X", (0.5, 0, 0))], _AX, anions=(("O", -2), ("F", -1))),
    _p("mos2", "P6_3/mmc", "hexagonal", 3.89, [("A", (1 / 3, 2 / 3, 0.25)), ("X", (1 / 3, 2 / 3, 0.621))], _AX,
       anions=HEAVY_CHALCOGENIDES),
    _p("pyrite", "Pa-3", "cubic", 1, [("A", (0, 0, 0)), ("X", (0.385, 0.385, 0.385))], [("A", "X"), ("X", "X")],
       anions=PERSULFIDES),
    _p("heusler", "Fm-3m", "cubic", 1,
       [("X", (0.25, 0.25, 0.25)), ("Y", (0, 0, 0)), ("Z", (0.5, 0.5, 0.5))], [("X", "Y"), ("X", "Z")],
       ionic=False, metals=(("X", LATE_TM), ("Y", EARLY_TM + LATE_TM[:3]), ("Z", MAIN_GROUP))),
    _p("halfheusler", "F-43m", "cubic", 1,
       [("Y", (0, 0, 0)), ("Z", (0.5, 0.5, 0.5)), ("X", (0.25, 0.25, 0.25))], [("X", "Y"), ("X", "Z")],
       ionic=False, metals=(("X", LATE_TM), ("Y", EARLY_TM + RARE_EARTHS), ("Z", MAIN_GROUP))),
    _p("alb2", "P6/mmm", "hexagonal", 1.08, [("A", (0, 0, 0)), ("B", (1 / 3, 2 / 3, 0.5))],
       [("A", "B"), ("B", "B")], ionic=False,
       metals=(("A", ALKALINE_EARTH + EARLY_TM + RARE_EARTHS + ("Al", "U", "Th", "Np", "Pu")), ("B", ("B",)))),
    _p("l12", "Pm-3m", "cubic", 1, [("B", (0, 0, 0)), ("A", (0, 0.5, 0.5))], [("A", "B"), ("A", "A")],
       ionic=False, metals=(("A", LATE_TM + ("Al",)), ("B", EARLY_TM + RARE_EARTHS + MAIN_GROUP + LATE_TM))),
    _p("b2", "Pm-3m", "cubic", 1, [("A", (0, 0, 0)), ("B", (0.5, 0.5, 0.5))], [("A", "B")], ionic=False,
       metals=(("A", LATE_TM), ("B", EARLY_TM + RARE_EARTHS + MAIN_GROUP))),
)

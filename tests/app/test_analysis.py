"""Structure-page analyses on real structures: symmetry at a tolerance, bonds against expected lengths, XRD."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from engine.crystal import analysis
from engine.lab.errors import InputError


@pytest.fixture
def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def spinel(shared_dir) -> Structure:
    """Lu2MnS4 (mp-14305), Fd-3m, as MP-20 stores it: the 14-site primitive cell, a = 7.72 Å, angles 60°."""
    rows = pd.read_csv(shared_dir / "data" / "mp20_subset" / "val.csv", index_col="material_id")
    return Structure.from_str(rows.loc["mp-14305", "cif"], fmt="cif")


def test_spinel_wyckoff_and_operations_are_those_of_the_conventional_cell(spinel):
    assert len(spinel) == 14
    sym = analysis.symmetry(spinel)
    assert (sym["symbol"], sym["number"]) == ("Fd-3m", 227)
    assert [(w["element"], w["wyckoff"], w["sites"]) for w in sym["wyckoff"]] == [
        ("Mn", "8a", 2), ("Lu", "16d", 4), ("S", "32e", 8)]
    assert sym["wyckoff"][0]["site_symmetry"] == "-43m"
    assert sym["n_operations"] == 192 and sym["n_operations_cell"] == 48  # 48 point operations x 4 F-centrings
    assert sorted(sym["site_wyckoff"]) == ["16d"] * 4 + ["32e"] * 8 + ["8a"] * 2


def test_rock_salt_wyckoff_is_4a_4b_in_any_cell(nacl):
    for cell in (nacl, nacl.get_primitive_structure(), nacl * (2, 2, 2)):
        sym = analysis.symmetry(cell)
        assert [(w["element"], w["wyckoff"]) for w in sym["wyckoff"]] == [("Na", "4a"), ("Cl", "4b")]
        assert sym["n_operations"] == 192
    assert analysis.symmetry(nacl.get_primitive_structure())["n_operations_cell"] == 48


def test_repeated_orbits_of_one_element_are_listed_apart():
    # Bi2Se3-type, R-3m: Se on two different orbits (3a and 6c), counted in the hexagonal conventional cell.
    hexagonal = Structure.from_spacegroup("R-3m", Lattice.hexagonal(4.14, 28.6), ["Bi", "Se", "Se"],
                                          [[0, 0, 0.4], [0, 0, 0], [0, 0, 0.21]])
    sym = analysis.symmetry(hexagonal.get_primitive_structure())
    assert [(w["element"], w["wyckoff"]) for w in sym["wyckoff"]] == [("Se", "3a"), ("Bi", "6c"), ("Se", "6c")]
    assert sym["n_operations"] == 36  # 12 point operations x 3 rhombohedral centrings


def test_conventional_cell_keeps_the_given_positions(spinel, nacl):
    conv = analysis.conventional_cell(spinel)
    assert len(conv) == 56 and conv.composition.reduced_formula == spinel.composition.reduced_formula
    assert np.allclose(conv.lattice.abc, 7.7186 * 2**0.5, atol=1e-3) and np.allclose(conv.lattice.angles, 90)
    stretched = nacl.copy()
    stretched.apply_strain([0.01, 0, 0])  # a 0.056 Å longer: cubic at 0.1 Å, yet the cell is not idealised
    assert analysis.symmetry(stretched)["number"] == 225
    assert sorted(analysis.conventional_cell(stretched).lattice.abc) == pytest.approx([5.64, 5.64, 5.6964])


def test_xrd_of_the_spinel_is_indexed_on_the_cubic_cell(spinel):
    peaks = analysis.xrd_pattern(spinel)
    top = peaks.loc[peaks.intensity.idxmax()]
    assert top.hkl == "(3 1 1)" and abs(top.two_theta - 27.09) < 0.05
    as_given = analysis.xrd_pattern(spinel, symprec=None)  # same peaks, primitive-cell indices
    assert np.allclose(as_given.two_theta, peaks.two_theta) and np.allclose(as_given.intensity, peaks.intensity)
    assert as_given.loc[as_given.intensity.idxmax(), "hkl"] != "(3 1 1)"


def test_symmetry_depends_on_tolerance(nacl):
    assert analysis.symmetry(nacl)["symbol"] == "Fm-3m"
    shaken = nacl.copy()
    shaken.translate_sites([0], [0.005, 0.0, 0.0])  # 0.028 Å off the ideal position
    assert analysis.symmetry(shaken, symprec=0.1)["number"] == 225
    strict = analysis.symmetry(shaken, symprec=0.001)
    assert strict["number"] != 225 and strict["error"] is None


def test_bonds_of_rock_salt_match_ionic_radii(nacl):
    bonds = analysis.neighbour_bonds(nacl)
    assert len(bonds) == 8 * 6  # octahedral coordination, each bond seen from both ends
    assert set(zip(bonds.element, bonds.neighbour)) == {("Na", "Cl"), ("Cl", "Na")}
    assert np.allclose(bonds.distance, 2.82)
    assert bonds.ionic.all() and bonds.reasonable.all()
    summary = analysis.bond_summary(bonds)
    assert summary.pair.tolist() == ["Cl - Na"] and summary["count"].iloc[0] == 48


def test_compressed_cell_has_unreasonable_bonds(nacl):
    squeezed = nacl.copy()
    squeezed.scale_lattice(nacl.volume * 0.3)  # bonds about 0.67 of their expected length
    assert not analysis.neighbour_bonds(squeezed).reasonable.any()


def test_xrd_of_rock_salt_has_its_strongest_peak_at_200(nacl):
    peaks = analysis.xrd_pattern(nacl)
    top = peaks.loc[peaks.intensity.idxmax()]
    assert top.hkl == "(2 0 0)" and abs(top.two_theta - 31.73) < 0.05  # Cu K-alpha, d = 2.82 Å
    assert peaks.intensity.max() == pytest.approx(100.0)
    with pytest.raises(InputError, match="two-theta"):
        analysis.xrd_pattern(nacl, two_theta_range=(60, 10))


def test_lattice_and_sites(nacl):
    info = analysis.lattice_info(nacl)
    assert info["reduced_formula"] == "NaCl" and info["n_sites"] == 8
    assert info["volume"] == pytest.approx(5.64**3) and info["density"] == pytest.approx(2.164, abs=1e-3)
    sites = analysis.sites_table(nacl)
    assert len(sites) == 8 and sorted(set(sites.element)) == ["Cl", "Na"]


def test_huge_structures_are_refused(nacl):
    big = nacl * (6, 6, 3)  # 864 sites
    with pytest.raises(InputError, match="sites"):
        analysis.neighbour_bonds(big)


def test_bond_table_agrees_with_the_validity_score(nacl):
    from engine.evaluate.checks import bond_length_score

    half_bad = nacl.copy()
    half_bad.translate_sites([4], [0.2, 0.0, 0.0])  # one Cl 1.13 Å off centre: its short bonds fail
    for s in (nacl, half_bad):
        bonds = analysis.neighbour_bonds(s)
        assert bonds.reasonable.mean() == pytest.approx(bond_length_score(s))
    assert 0 < analysis.neighbour_bonds(half_bad).reasonable.mean() < 1


def test_unreadable_cif_is_a_user_error():
    with pytest.raises(InputError, match="cannot be read"):
        analysis.load_structure("data_x\n_cell_length_a 3\n", label="upload.cif")


@pytest.mark.parametrize("text, says", [
    ("hello world", "no crystal structure was found in the text"),
    ("data_x\n_cell_length_a 5\n_cell_length_b 5\n_cell_length_c 5\n_cell_angle_alpha 90\n_cell_angle_beta 90\n"
     "_cell_angle_gamma 90\nloop_\n_atom_site_type_symbol\n_atom_site_fract_x\nNa 0\n",
     "the CIF key _atom_site_label is missing or unreadable"),
])
def test_a_bad_cif_is_refused_in_one_sentence(text, says):
    with pytest.raises(InputError) as err:
        analysis.load_structure(text, label="pasted CIF")
    message = str(err.value)
    assert "\n" not in message and says in message and message.count(";") == 1

"""Structure-page analyses on real structures: symmetry at a tolerance, bonds against expected lengths, XRD."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from engine import analysis
from engine.errors import InputError


@pytest.fixture
def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


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
    from engine.checks import bond_length_score

    half_bad = nacl.copy()
    half_bad.translate_sites([4], [0.2, 0.0, 0.0])  # one Cl 1.13 Å off centre: its short bonds fail
    for s in (nacl, half_bad):
        bonds = analysis.neighbour_bonds(s)
        assert bonds.reasonable.mean() == pytest.approx(bond_length_score(s))
    assert 0 < analysis.neighbour_bonds(half_bad).reasonable.mean() < 1


def test_unreadable_cif_is_a_user_error():
    with pytest.raises(InputError, match="cannot be read"):
        analysis.load_structure("data_x\n_cell_length_a 3\n", label="upload.cif")

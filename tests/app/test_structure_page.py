"""AppTest of the Structure page on a real crystal: Wyckoff positions, operation count and XRD indices follow the
International Tables (conventional cell) whatever cell the CIF is written in, and every table header has units."""

from __future__ import annotations

import pandas as pd
import pytest
from apptest_helpers import open_page
from streamlit.testing.v1 import AppTest


def table_with(at: AppTest, column: str) -> pd.DataFrame:
    """The one dataframe on the page that has this column."""
    found = [df.value for df in at.dataframe if column in df.value.columns]
    assert len(found) == 1, [list(df.value.columns) for df in at.dataframe]
    return found[0]


@pytest.fixture
def spinel_page(shared_dir, use_asset_cache) -> AppTest:
    """The Structure page showing Lu2MnS4 (mp-14305) pasted as MP-20 stores it: the 14-site primitive cell."""
    rows = pd.read_csv(shared_dir / "data" / "mp20_subset" / "val.csv", index_col="material_id")
    at = open_page("pages/structure.py")
    at.radio(key="structure_source").set_value("Paste a CIF").run()
    at.text_area(key="structure_paste").input(rows.loc["mp-14305", "cif"]).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_symmetry_panel_gives_conventional_wyckoff_positions_and_operations(spinel_page):
    text = "\n".join(md.value for md in spinel_page.markdown)
    assert "Fd-3m (No. 227), cubic, point group m-3m" in text
    assert "**Wyckoff positions** Mn 8a, Lu 16d, S 32e" in text
    assert "192 symmetry operations in the conventional cell (48 in this cell)" in text


def test_lattice_table_shows_this_cell_and_the_conventional_cell_in_full(spinel_page):
    lattice = spinel_page.table[0].value
    assert list(lattice.columns) == ["this cell", "conventional cell"]
    assert lattice.loc["a (Å)"].tolist() == ["7.7186", "10.9158"]
    assert lattice.loc["α (°)"].tolist() == ["60.00", "90.00"]
    assert lattice.loc["volume (Å³)"].tolist() == ["325.17", "1300.67"]
    assert lattice.loc["sites"].tolist() == ["14", "56"]


def test_xrd_is_indexed_on_the_cubic_cell_with_units_in_the_headers(spinel_page):
    peaks = table_with(spinel_page, "hkl")
    assert list(peaks.columns) == ["2θ (°, Cu Kα)", "intensity (max 100)", "hkl", "d (Å)"]
    top = peaks.loc[peaks["intensity (max 100)"].idxmax()]
    assert top["hkl"] == "(3 1 1)" and top["d (Å)"] == pytest.approx(3.291, abs=1e-3)
    assert any("conventional cell of Fd-3m" in c.value for c in spinel_page.caption)


def test_sites_and_bonds_tables_say_their_units(spinel_page):
    sites = table_with(spinel_page, "Wyckoff")
    assert list(sites.columns) == ["site", "element", "Wyckoff", "x (frac)", "y (frac)", "z (frac)", "x (Å)",
                                   "y (Å)", "z (Å)", "occupancy"]
    assert dict(zip(sites.element, sites.Wyckoff)) == {"Mn": "8a", "Lu": "16d", "S": "32e"}
    summary = table_with(spinel_page, "pair")
    assert {"mean (Å)", "min (Å)", "max (Å)", "expected (Å)"} <= set(summary.columns)
    assert {"distance (Å)", "expected (Å)"} <= set(table_with(spinel_page, "distance (Å)").columns)



def test_sites_are_rounded_to_the_precision_of_the_cif(use_asset_cache):
    """A site at 0 in the CIF reads 0, not parsing noise such as 2e-16, and keeps the CIF's 8 decimals."""
    cif = """data_BaTiO3
_symmetry_space_group_name_H-M   'P 1'
_cell_length_a   4.12278815
_cell_length_b   4.12278815
_cell_length_c   3.98753100
_cell_angle_alpha   90.00000000
_cell_angle_beta   90.00000000
_cell_angle_gamma   90.48824126
_symmetry_Int_Tables_number   1
loop_
 _symmetry_equiv_pos_site_id
 _symmetry_equiv_pos_as_xyz
  1  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_symmetry_multiplicity
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Ba  Ba0  1  0.99252100  0.00747900  0.00000000  1
  Ti  Ti1  1  0.47548600  0.52451400  0.50000000  1
  O  O2  1  0.50961200  0.97298700  0.50000000  1
  O  O3  1  0.02701300  0.49038800  0.50000000  1
  O  O4  1  0.51546800  0.48453200  0.00000000  1
"""
    at = open_page("pages/structure.py")
    at.radio(key="structure_source").set_value("Paste a CIF").run()
    at.text_area(key="structure_paste").input(cif).run()
    assert not at.exception, [e.value for e in at.exception]
    sites = table_with(at, "x (frac)")
    assert sites["x (frac)"].tolist() == [0.992521, 0.475486, 0.509612, 0.027013, 0.515468]
    assert sites["z (Å)"].tolist() == [0.0, 1.9938, 1.9938, 1.9938, 0.0]
    sites_frame = next(df for df in at.dataframe if "x (frac)" in df.value.columns)
    assert sites_frame.proto.columns  # formatted columns: the CIF's 8 decimals, not a cut-off float
    assert '"%.8f"' in sites_frame.proto.columns

"""Masks over canonical CIF tokens: every occurrence of an element and nothing else; site and cell spans."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure

from engine.crystal.canonical import canonicalize_structure, model_view
from engine.crystal.masking import MASK_TEXT, mask_cell, mask_element, mask_site, masked_text, split_cif
from engine.crystal.tokenizer import decode
from engine.crystal.vocab import STOI
from engine.lab.errors import InputError


@pytest.fixture(scope="module")
def spinel_view() -> str:
    """MgAl2O4 spinel: Mg, Al and O each on one orbit; O's label and property row sit among others."""
    s = Structure.from_spacegroup("Fd-3m", Lattice.cubic(8.08), ["Mg", "Al", "O"],
                                  [[0.125, 0.125, 0.125], [0.5, 0.5, 0.5], [0.2625, 0.2625, 0.2625]])
    return model_view(canonicalize_structure(s))


@pytest.fixture(scope="module")
def pm_view() -> str:
    """A structure in space group Pm holding the element Pm: the space-group token must not be masked."""
    s = Structure(Lattice.monoclinic(4.0, 5.0, 6.0, 100), ["Pm", "O", "O"],
                  [[0, 0, 0], [0.3, 0.5, 0.2], [0.7, 0.5, 0.9]])
    return model_view(canonicalize_structure(s))


def test_every_occurrence_of_the_element_is_masked_and_nothing_else(spinel_view):
    mask = mask_element(spinel_view, "O")
    ids = mask.cif.ids
    assert [p for p, t in enumerate(ids) if t == STOI["O"]] == mask.element_positions
    assert mask.region_counts() == {"data": 1, "props": 1, "formula": 2, "site": 1, "label": 1}
    # the dependent tokens are exactly the three numbers of O's property row
    props_line = next(line for line in spinel_view.split("\n") if line.startswith("O "))
    assert decode([ids[p] for p in mask.dependent_positions]) == props_line[2:].replace(" ", "")
    hidden = masked_text(ids, mask.positions)
    lines = hidden.split("\n")
    assert lines[0] == f"data_Mg16Al8{MASK_TEXT}32"
    assert " ".join([MASK_TEXT] * 4) in lines  # the property row: symbol and its three numbers
    assert f"_chemical_formula_sum 'Mg16 Al8 {MASK_TEXT}32'" in lines
    assert any(line.startswith(f"{MASK_TEXT} {MASK_TEXT}2 32 ") for line in lines)  # site row: symbol and label
    assert sorted(mask.positions) == sorted(mask.element_positions + mask.dependent_positions)
    assert sum(1 for line in lines if MASK_TEXT in line) == 5  # data, props, structural, sum, one site row


def test_several_site_rows_each_mask_symbol_and_label(pm_view):
    mask = mask_element(pm_view, "O")
    n_rows = sum(1 for line in pm_view.split("\n") if line.startswith("O O"))
    assert n_rows >= 2 and mask.regions.count("site") == mask.regions.count("label") == n_rows


def test_the_element_pm_is_masked_but_the_space_group_pm_is_not(pm_view):
    assert "_symmetry_space_group_name_H-M Pm\n" in pm_view
    mask = mask_element(pm_view, "Pm")
    assert STOI["Pm_sg"] in mask.cif.ids
    assert all(mask.cif.ids[p] == STOI["Pm"] for p in mask.positions if p in mask.element_positions)
    assert "_symmetry_space_group_name_H-M Pm\n" in masked_text(mask.cif.ids, mask.positions)


def test_an_element_not_in_the_cif_or_not_an_element_is_refused(spinel_view):
    with pytest.raises(InputError, match=r"no K \(its elements: .*Mg.*\)"):
        mask_element(spinel_view, "K")
    with pytest.raises(InputError, match="'Xx' is not an element symbol"):
        mask_element(spinel_view, "Xx")


def test_site_and_cell_spans_cover_exactly_their_numbers(spinel_view):
    cif = split_cif(spinel_view)
    ids = cif.ids
    site = mask_site(spinel_view, 2)
    row = spinel_view.split("\n")[cif.site_rows[2]].split(" ")
    assert decode([ids[p] for p in site]) == "".join(row[3:6])
    cell = mask_cell(spinel_view)
    assert decode([ids[p] for p in cell]) == "8.08008.08008.080090.000090.000090.0000"
    text = masked_text(ids, cell)
    assert f"_cell_length_a {MASK_TEXT}\n" in text and "_cell_volume 527.5141" in text
    with pytest.raises(InputError, match="--site 3: the CIF has 3 atom-site rows"):
        mask_site(spinel_view, 3)

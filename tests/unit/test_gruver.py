"""Gruver et al.'s crystal text: the format round-trips within its rounding, translation changes only the
coordinates, prompts and the training mix are as in the paper, and bad text is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from engine.crystal import gruver as g
from engine.crystal.canonical import structure_to_model_view
from engine.lab.errors import InputError


def _odd() -> Structure:
    """A triclinic cell with coordinates that are not on the 0.01 grid."""
    lattice = Lattice.from_parameters(4.137, 5.261, 6.049, 81.3, 95.6, 102.2)
    return Structure(lattice, ["Na", "Cl", "Cl"], [[0.1234, 0.5678, 0.9012], [0.4, 0.05, 0.33], [0.999, 0.7, 0.2]])


def _frac_close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    d = np.abs(a - b) % 1.0
    return bool(np.all(np.minimum(d, 1.0 - d) <= tol))


def test_the_format_round_trips_a_structure_within_its_rounding():
    s = _odd()
    text = g.structure_to_text(s)
    lines = text.splitlines()
    assert lines[0] == "4.1 5.3 6.0" and lines[1] == "81 96 102"
    assert lines[2:4] == ["Na", "0.12 0.57 0.90"] and lines[6:8] == ["Cl", "0.00 0.70 0.20"]  # 0.999 wraps to 0
    back = g.text_to_structure(text)
    assert [x.symbol for x in back.species] == ["Na", "Cl", "Cl"]
    assert np.allclose(back.lattice.abc, s.lattice.abc, atol=0.05 + 1e-9)
    assert np.allclose(back.lattice.angles, s.lattice.angles, atol=0.5 + 1e-9)
    assert _frac_close(back.frac_coords, s.frac_coords, 0.005 + 1e-9)
    assert g.structure_to_text(back) == text  # a parsed text writes itself again


def test_translation_changes_the_coordinates_and_nothing_else():
    s = _odd()
    plain = g.structure_to_text(s).splitlines()
    moved = g.structure_to_text(s, np.random.default_rng(7)).splitlines()
    again = g.structure_to_text(s, np.random.default_rng(7)).splitlines()
    assert moved == again  # seeded
    assert moved != plain and moved[:2] == plain[:2] and moved[2::2] == plain[2::2]  # lattice and elements kept
    a = np.array([[float(x) for x in line.split()] for line in plain[3::2]])
    b = np.array([[float(x) for x in line.split()] for line in moved[3::2]])
    shift = (b - a) % 1.0  # one shift for all atoms (up to the 0.01 rounding of each coordinate)
    assert _frac_close(shift, shift[:1].repeat(len(shift), 0), 0.011)
    assert not _frac_close(shift[:1], np.zeros((1, 3)), 0.02)
    fresh = {g.structure_to_text(s, np.random.default_rng(k)) for k in range(5)}
    assert len(fresh) == 5  # a fresh translation each time an example is used


def test_generated_text_becomes_the_labs_canonical_cif():
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    text = g.generation_prompt("Na4Cl4", 225) + g.structure_to_text(nacl, np.random.default_rng(1))
    assert g.text_to_cif(text) == structure_to_model_view(nacl)


def test_prompts_state_their_conditions_and_infill_names_the_masked_element():
    assert g.generation_prompt() == g.GENERATION_HEAD + g.GENERATION_TAIL
    p = g.generation_prompt("Na4Cl4", 225, 0.01234)
    assert "The chemical formula is Na4Cl4." in p and "The spacegroup number is 225." in p
    assert "The energy above the convex hull is 0.012." in p and p.endswith("within the lattice:\n")
    assert g.prompt_for("Na4Cl4", "Fm-3m") == g.generation_prompt("Na4Cl4", 225)
    body = g.structure_to_text(_odd())
    masked = g.mask_element(body, "Cl")
    assert masked.count("[MASK]") == 2 and "\nNa\n" in masked and "Cl" not in masked
    prompt = g.infill_prompt(masked)
    assert prompt.startswith(g.INFILL_HEAD) and prompt.endswith(g.INFILL_TAIL)
    assert g.parse_infill_answer(prompt + "Cl\n") == "Cl"
    assert g.parse_infill_answer(prompt + "0.1 0.2\n") is None


def test_the_training_mix_is_two_thirds_generation_one_third_infill():
    ex = g.Example(_odd(), "Na1Cl2", 2)
    texts = [g.training_text(ex, np.random.default_rng(k)) for k in range(600)]
    infill = sum(t.startswith(g.INFILL_HEAD) for t in texts)
    assert 160 <= infill <= 240  # 1/3 of 600 = 200
    gen = [t for t in texts if not t.startswith(g.INFILL_HEAD)]
    with_formula = sum("chemical formula" in t for t in gen)
    assert 0.35 * len(gen) <= with_formula <= 0.65 * len(gen)  # conditions are stated half the time
    for t in gen[:20]:
        assert g.text_to_structure(g.body_of(t)).composition.reduced_formula == "NaCl2"


@pytest.mark.parametrize("text, words", [
    ("4.1 5.3\n90 90 90\nNa\n0.1 0.2 0.3\n", "lattice lengths"),
    ("4.1 5.3 6.0\n90 90 90\nXx\n0.1 0.2 0.3\n", "element symbol"),
    ("4.1 5.3 6.0\n90 90 190\nNa\n0.1 0.2 0.3\n", "impossible cell"),
    ("4.1 5.3 6.0\n90 90 90\nNa\n0.1 0.2 0.3\nCl\n", "without coordinates"),
    ("4.1 5.3 6.0\n90 90 90\n", "at least one atom"),
])
def test_bad_text_is_refused_with_a_reason(text, words):
    with pytest.raises(InputError, match=words):
        g.text_to_structure(text)

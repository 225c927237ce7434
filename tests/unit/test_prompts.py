"""Prompt building: exact prompt text and ids, formula/Z rules, space-group spellings and the errors users see."""

from __future__ import annotations

import pytest

from engine.crystal.prompts import (
    DEFAULT_ZS,
    Prompt,
    build_prompts,
    cell_prompt,
    normalize_spacegroup,
    parse_formula_spec,
    spacegroup_choices,
)
from engine.crystal.tokenizer import encode
from engine.crystal.vocab import NEWLINE_ID, SPACE_GROUPS, STOI
from engine.lab.errors import PromptError

# The NaCl example of crystallm-format.md section 1, up to and including its H-M line.
NACL_FM3M_PREFIX = """data_Na4Cl4
loop_
_atom_type_symbol
_atom_type_electronegativity
_atom_type_radius
_atom_type_ionic_radius
Na 0.9300 1.8000 1.1600
Cl 3.1600 1.0000 0.7800
_symmetry_space_group_name_H-M Fm-3m
"""


def test_formula_unit_with_z_gives_the_cell_prompt_and_its_ids():
    (prompt,) = build_prompts("NaCl", z=2)
    assert prompt.text == "data_Na2Cl2\n"
    assert encode(prompt.text) == [124, 54, 91, 5, 91, 142]
    assert (prompt.formula, prompt.z, prompt.spacegroup) == ("Na2Cl2", 2, None)


def test_cell_composition_without_z_is_taken_as_the_cell():
    assert build_prompts("Na2Cl2") == build_prompts("NaCl", z=2)


def test_reduced_formula_without_z_tries_the_default_zs():
    prompts = build_prompts("BaTiO3")
    assert [p.z for p in prompts] == list(DEFAULT_ZS)
    assert prompts[0].text == "data_Ba1Ti1O3\n"  # explicit 1s, electronegativity order
    assert prompts[-1].text == "data_Ba8Ti8O24\n"


def test_space_group_prompt_matches_the_reference_example_exactly():
    (prompt,) = build_prompts("NaCl", z=4, spacegroup="Fm-3m")
    assert prompt.text == NACL_FM3M_PREFIX
    assert encode(prompt.text)[-2:] == [STOI["Fm-3m_sg"], NEWLINE_ID]
    assert build_prompts("NaCl", z=4, spacegroup=225) == [prompt]
    assert build_prompts("Na4Cl4", spacegroup="F m -3 m") == [prompt]


def test_prompts_are_token_prefixes_of_the_upstream_golden_cifs(golden_canonical):
    """Prompts built from each golden structure's composition and space group start its upstream token ids."""
    checked = 0
    for record in golden_canonical:
        if "error" in record:
            continue
        lines = record["model_view"].splitlines()
        formula = lines[0].removeprefix("data_")
        sg = next(ln.split()[1] for ln in lines if ln.startswith("_symmetry_space_group_name_H-M"))
        if sg not in SPACE_GROUPS:
            continue  # one of the three groups without a token: the model saw it spelled out
        prompt = next(p for p in build_prompts(formula, spacegroup=sg) if p.formula == formula)
        ids = encode(prompt.text)
        assert record["ids"][: len(ids)] == ids, record["id"]
        (plain,) = [p for p in build_prompts(formula) if p.formula == formula]
        assert record["ids"][: len(encode(plain.text))] == encode(plain.text), record["id"]
        checked += 1
    assert checked > 300


def test_unconditional_prompt():
    (prompt,) = build_prompts(None)
    assert prompt.text == "data_" and prompt.formula is None and prompt.elements == []


def test_prompt_round_trips_through_a_dict():
    (prompt,) = build_prompts("NaCl", z=1, spacegroup="Fm-3m")
    assert Prompt.from_dict(prompt.to_dict()) == prompt
    assert prompt.elements == ["Na", "Cl"]


def test_parse_formula_spec_handles_groups_spaces_and_repeats():
    assert parse_formula_spec("Ca3(PO4)2") == {"Ca": 3, "P": 2, "O": 8}
    assert parse_formula_spec("Na2 Cl2") == {"Na": 2, "Cl": 2}
    assert parse_formula_spec("NaClNa") == {"Na": 2, "Cl": 1}


@pytest.mark.parametrize(
    ("formula", "z", "sg", "fragment"),
    [
        ("Xx2O", None, None, "Xx is not one of the 89 elements in the CrystaLLM vocabulary"),
        ("PoO2", None, None, "Po is not one of the 89 elements"),
        ("Na2Cl)", None, None, "malformed"),
        ("Na2(Cl", None, None, "never closed"),
        ("2Na", None, None, "malformed"),
        ("Na0.5Cl0.5", None, None, "fractional"),
        ("NaCl", 0, None, "out of range"),
        ("NaCl", 99, None, "out of range"),
        ("Na2Cl2", 2, None, "give the formula unit NaCl with Z"),
        ("NaCl", 1, "Fm3m", "did you mean Fm-3m"),
        ("NaCl", 1, "231", "use 1-230"),
        (None, 2, None, "need a composition"),
        (None, None, "Fm-3m", "need a composition"),
    ],
)
def test_bad_inputs_raise_prompt_errors_naming_the_input(formula, z, sg, fragment):
    with pytest.raises(PromptError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_prompts(formula, z=z, spacegroup=sg)


@pytest.mark.parametrize(
    ("sg", "number", "options"),
    [("P432", 207, ["P4_232", "I432"]), ("P6", 168, ["P6_1", "P6_3"]), ("P4_222", 93, ["P4_12_12", "P4_22_12"])],
)
def test_space_groups_without_a_token_are_refused_with_same_point_group_options(sg, number, options):
    for spelling in (sg, str(number)):
        with pytest.raises(PromptError) as info:
            build_prompts("NaCl", z=1, spacegroup=spelling)
        message = str(info.value)
        assert "has no token" in message and f"No. {number}" in message
        assert all(f"{opt} (" in message for opt in options)


@pytest.mark.parametrize(
    ("spelling", "symbol"),
    [("P21/c", "P2_1/c"), ("p 21/c", "P2_1/c"), ("P 1 21/c 1", "P2_1/c"), ("14", "P2_1/c"), ("Cmca", "Cmce"),
     ("fm-3m", "Fm-3m"), ("Pm", "Pm"), ("R-3mH", "R-3m")],
)
def test_space_group_spellings_map_to_the_token_symbol(spelling, symbol):
    assert normalize_spacegroup(spelling) == symbol


def test_spacegroup_choices_are_the_227_tokens_by_number():
    choices = spacegroup_choices()
    assert len(choices) == 227 and {s for _, s in choices} == set(SPACE_GROUPS)
    assert choices[0] == (1, "P1") and (225, "Fm-3m") in choices and choices[-1] == (230, "Ia-3d")
    assert all(normalize_spacegroup(n) == s for n, s in choices)


def test_a_cell_no_cif_within_the_largest_context_can_hold_is_refused_naming_the_limit():
    from engine.crystal.prompts import MAX_CIF_TOKENS

    for formula in ("Na1000000Cl1000000", "Fe100000"):
        with pytest.raises(PromptError, match=rf"needs at least [\d,]+ tokens, more than the {MAX_CIF_TOKENS:,}-token "
                                              r"context \(block_size\).*at most about [\d,]+ atoms"):
            build_prompts(formula)
    with pytest.raises(PromptError, match="cannot be expressed"):
        cell_prompt("Na1000000Cl1000000")
    assert build_prompts("Na192Cl192")[0].formula == "Na192Cl192"  # large, but a CIF of it fits


def test_the_shortest_cif_bound_never_exceeds_a_real_canonical_cif(golden_canonical):
    from engine.crystal.prompts import min_cif_tokens, parse_formula_spec

    for rec in golden_canonical:
        cell = rec["decoded"].split("\n", 1)[0].removeprefix("data_")
        assert min_cif_tokens(parse_formula_spec(cell)) <= len(rec["ids"]), rec["id"]

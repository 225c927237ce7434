"""Tests of the built-in corpus: families, determinism, distinctness, chemistry and CrystaLLM validity."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from pymatgen.core import Element, Structure

from engine.crystal.canonical import structure_to_model_view
from engine.crystal.postprocess import postprocess
from engine.crystal.vocab import ELEMENTS
from engine.data.corpus import corpus_cifs, corpus_size, families, generate_structures
from engine.data.prototypes import PROTOTYPES
from engine.evaluate.checks import check_cif
from engine.lab.errors import InputError

REQUIRED_FAMILIES = {
    "rocksalt", "cscl", "zincblende", "wurtzite", "nias", "fluorite", "rutile", "cdi2", "corundum", "perovskite",
    "spinel", "layered", "heusler", "alb2", "l12",
}  # fmt: skip


def _family(sid: str) -> str:
    return sid.split("-", 1)[0]


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, Structure]]:
    return generate_structures(5000, seed=0)


def test_families_cover_the_required_prototypes():
    names = families()
    assert len(names) >= 15
    assert REQUIRED_FAMILIES <= set(names)
    assert len(set(names)) == len(names)


def test_5000_distinct_structures_every_family_present(corpus):
    assert corpus_size() >= 5000
    ids = [sid for sid, _ in corpus]
    assert len(ids) == 5000 == len(set(ids))
    # Distinct also by what the id claims: prototype + composition.
    keys = {(s.properties["prototype"], s.composition.reduced_formula) for _, s in corpus}
    assert len(keys) == 5000
    assert {_family(sid) for sid in ids} == set(families())
    for sid, structure in corpus[:200]:
        assert sid == f"{structure.properties['prototype']}-{structure.composition.reduced_formula}"


def test_same_seed_same_list_other_seed_other_order():
    first = generate_structures(120, seed=7)
    again = generate_structures(120, seed=7)
    assert [sid for sid, _ in first] == [sid for sid, _ in again]
    for (_, a), (_, b) in zip(first, again):
        assert a == b and a.lattice == b.lattice
    other = generate_structures(120, seed=8)
    assert [sid for sid, _ in other] != [sid for sid, _ in first]


def test_only_vocabulary_elements_and_sane_cells(corpus):
    vocab = set(ELEMENTS)
    for sid, structure in corpus:
        assert {el.symbol for el in structure.composition} <= vocab, sid
        assert 1.5 < structure.lattice.a < 20, sid
        assert 3 < structure.volume / len(structure) < 80, sid  # angstrom^3 per atom: dense to open solids


def test_ionic_families_are_charge_balanced_with_common_oxidation_states(corpus):
    ionic = [(sid, s) for sid, s in corpus if s.properties["oxidation_states"] is not None]
    assert len(ionic) > 1000
    for sid, structure in ionic:
        states = structure.properties["oxidation_states"]
        assert set(states) == {el.symbol for el in structure.composition}, sid
        total = sum(states[el.symbol] * n for el, n in structure.composition.items())
        assert total == 0, sid
        for symbol, q in states.items():
            if q > 0:
                assert q in Element(symbol).common_oxidation_states, (sid, symbol, q)
            else:  # pyrite holds X2^2- dimers, -1 per atom
                assert q in Element(symbol).common_oxidation_states or _family(sid) == "pyrite", (sid, symbol, q)


def test_cifs_parse_back_to_the_same_structure():
    structures = dict(generate_structures(30, seed=0))
    for sid, cif in corpus_cifs(30, seed=0):
        parsed = Structure.from_str(cif, fmt="cif")
        assert parsed.composition == structures[sid].composition, sid
        assert parsed.lattice.abc == pytest.approx(structures[sid].lattice.abc, abs=1e-4)


@pytest.mark.parametrize("n", [-1, 10**7, 2.5])
def test_impossible_sizes_are_user_errors(n):
    with pytest.raises(InputError, match="corpus size"):
        generate_structures(n)


def test_sample_across_families_passes_crystallm_checks():
    """3 random structures per family through canonical CIF -> post-processing -> the real CrystaLLM checks."""
    spacegroup = {p.name: p.spacegroup for p in PROTOTYPES}
    by_family = defaultdict(list)
    for sid, structure in generate_structures(21 * 40, seed=11):
        by_family[_family(sid)].append((sid, structure))
    rng = random.Random(0)
    sample = [item for f in families() for item in rng.sample(by_family[f], 3)]
    valid, failures = 0, []
    for sid, structure in sample:
        result = postprocess(structure_to_model_view(structure))
        assert result.cif is not None, (sid, result.error)
        row = check_cif(result.cif)
        # Exact Wyckoff positions: the symmetry found is the prototype's own space group.
        assert row["spacegroup"] == spacegroup[_family(sid)], (sid, row["spacegroup"])
        if row["is_valid"]:
            valid += 1
        else:
            failures.append((sid, row["bond_length_score"], row["space_group_consistent"]))
    assert valid / len(sample) >= 0.95, failures

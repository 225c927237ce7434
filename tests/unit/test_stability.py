"""Stability with a real potential (CHGNet on CPU): relaxation, hulls, E_hull, the stability table and CLI.

The potential is loaded once per test session (`engine.evaluate.relax.get_potential` keeps it); the structures
are two- and three-atom cells, so each test takes about a second on a shared 2-core machine.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from engine.cli import main
from engine.evaluate.hull import Hull, build_hull, import_hull, load_hull
from engine.evaluate.potentials import load_potential, mp2020_corrected
from engine.evaluate.relax import get_potential, relax_one
from engine.evaluate.stability import COLUMNS, run_stability, stability_job_argv
from engine.lab.errors import ConfigError, InputError


def rocksalt(a: float = 5.64) -> Structure:
    """Primitive rock-salt NaCl with conventional lattice parameter ``a`` (Å)."""
    return Structure(Lattice.cubic(a).matrix @ [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]], ["Na", "Cl"],
                     [[0, 0, 0], [0.5, 0.5, 0.5]])


def conventional_a(cif: str) -> float:
    """Conventional cubic lattice parameter of a relaxed primitive rock-salt cell (Å)."""
    return Structure.from_str(cif, fmt="cif").lattice.a * math.sqrt(2)


@pytest.fixture(scope="session")
def chgnet():
    return get_potential("chgnet", "cpu")


@pytest.fixture(scope="session")
def nacl_hull(chgnet, tmp_path_factory) -> Hull:
    """A hull of Na, Cl (ase reference solids) and rock-salt NaCl, relaxed by CHGNet."""
    root = tmp_path_factory.mktemp("hull")
    (root / "src").mkdir()
    (root / "src" / "NaCl.cif").write_text(rocksalt().to(fmt="cif"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYSTALLAB_RUNS", str(root / "runs"))
        hulls = build_hull([str(root / "src")], "chgnet", "nacl", device="cpu", workers=1)
    return hulls[0]


def test_rocksalt_relaxes_to_its_lattice_parameter_and_lies_on_the_hull(chgnet, nacl_hull):
    row = relax_one(rocksalt(5.64).to(fmt="cif"), chgnet)
    assert row["failure_reason"] is None and row["converged"]
    assert 5.6 <= conventional_a(row["relaxed_cif"]) <= 5.8
    verdict = nacl_hull.evaluate(row["formula"], row["energy_per_atom"])
    assert abs(verdict["e_hull"]) <= 0.05 and verdict["hull_covered"]
    assert -2.3 < verdict["formation_energy_per_atom"] < -1.9  # MP (DFT, MP2020): -2.11 eV/atom
    assert nacl_hull.describe()["chemical_systems"] == ["Cl-Na"] and nacl_hull.elements == ["Cl", "Na"]


def test_compressed_cell_relaxes_back(chgnet):
    compressed = rocksalt()
    compressed.scale_lattice(compressed.volume * 0.85)
    row = relax_one(compressed.to(fmt="cif"), chgnet)
    assert row["failure_reason"] is None and row["converged"] and row["steps"] > 0
    assert 5.6 <= conventional_a(row["relaxed_cif"]) <= 5.8
    assert row["volume_change"] > 0.12 and row["initial_energy_per_atom"] > row["energy_per_atom"]


def test_unstable_composition_lands_well_above_the_hull(chgnet, nacl_hull):
    na2cl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Cl", "Na"],
                                      [[0, 0, 0], [0.25, 0.25, 0.25]]).get_primitive_structure()
    row = relax_one(na2cl.to(fmt="cif"), chgnet, steps=200)
    assert row["failure_reason"] is None
    assert nacl_hull.evaluate(row["formula"], row["energy_per_atom"])["e_hull"] > 0.15


@pytest.mark.parametrize("structure, reason, named", [
    (Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]]), "overlapping_atoms", "0.20 Å"),
    (Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]), "disordered", ""),
    (Structure(Lattice.cubic(4.0), ["Am", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]), "element_unsupported", "Am"),
    (rocksalt().make_supercell(6, in_place=False), "too_large", "432 sites"),
    (Structure(Lattice.cubic(40.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]), "absurd_cell", "volume per atom"),
])
def test_bad_structures_come_back_with_a_reason(chgnet, structure, reason, named):
    row = relax_one(structure.to(fmt="cif"), chgnet)
    assert row["failure_reason"] == reason and named in row["failure_detail"]
    assert row["energy_per_atom"] is None


def test_unparseable_text_is_a_reason_not_a_crash(chgnet):
    assert relax_one("data_x\n_cell_length_a 3\n", chgnet)["failure_reason"] == "parse_failed"


def test_element_outside_the_hull_is_named(nacl_hull):
    verdict = nacl_hull.evaluate("KCl", -3.4)
    assert verdict["failure_reason"] == "element_unsupported" and "K" in verdict["failure_detail"]
    assert "nacl" in verdict["failure_detail"]


def test_unknown_potential_is_one_line():
    with pytest.raises(ConfigError, match="unknown potential 'mace'.*chgnet, sevennet-0, sevennet-l3i5"):
        load_potential("mace")


def test_batched_single_points_match_the_calculator(chgnet):
    structures = [rocksalt(5.5), rocksalt(5.7), Structure(Lattice.cubic(3.4), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])]
    batched = chgnet.single_points(structures, batch_size=2)
    one_by_one = [relax_one(s.to(fmt="cif"), chgnet, relax=False)["raw_energy_per_atom"] * len(s) for s in structures]
    assert batched == pytest.approx(one_by_one, abs=2e-3)


def test_mp2020_corrections_apply_to_oxides_of_u_elements():
    fe2o3 = Structure.from_spacegroup("R-3c", Lattice.hexagonal(5.03, 13.75), ["Fe", "O"],
                                      [[0, 0, 0.3553], [0.3059, 0, 0.25]])
    raw = -6.0 * len(fe2o3)
    corrected = mp2020_corrected(fe2o3, raw)
    # MP2020: -0.687 eV per O (oxide) and -2.256 eV per Fe (GGA+U), per atom of Fe2O3 about -1.31 eV
    assert (corrected - raw) / len(fe2o3) == pytest.approx(-(2 * 2.256 + 3 * 0.687) / 5, abs=0.02)
    nacl = rocksalt()
    assert mp2020_corrected(nacl, -7.0) < -7.0  # the Cl anion correction


def test_hull_files_that_are_not_hulls_are_one_line_errors(tmp_path, nacl_hull):
    with pytest.raises(InputError, match="not found"):
        load_hull("nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "hull.json").write_text("[1, 2]")
    (bad / "entries.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="is not a hull"):
        load_hull(bad)
    (tmp_path / "x.json").write_text("not json")
    with pytest.raises(InputError, match="is not a hull: not \\(gzipped\\) JSON"):
        import_hull(tmp_path / "x.json", "x")
    (tmp_path / "y.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(InputError, match="is not a hull: expected a pymatgen PhaseDiagram"):
        import_hull(tmp_path / "y.json", "y")


def test_hull_round_trips_and_imports_from_a_phase_diagram(tmp_path, nacl_hull):
    from monty.json import MontyEncoder
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    folder = nacl_hull.save(tmp_path / "saved")
    again = load_hull(folder)
    assert again.evaluate("NaCl", -3.6)["e_hull"] == pytest.approx(nacl_hull.evaluate("NaCl", -3.6)["e_hull"])
    pd_ = PhaseDiagram([PDEntry(f, e * (2 if f == "NaCl" else 1))
                        for f, e in zip(nacl_hull.entries["formula"], nacl_hull.entries["energy_per_atom"])])
    (tmp_path / "pd.json").write_text(json.dumps(pd_.as_dict(), cls=MontyEncoder))
    imported = import_hull(tmp_path / "pd.json", "imported")
    assert imported.kind == "imported" and imported.chemical_systems == ["Cl-Na"]
    assert imported.evaluate("NaCl", -3.6)["e_hull"] == pytest.approx(nacl_hull.evaluate("NaCl", -3.6)["e_hull"])


def test_hull_covered_is_false_without_a_competing_compound(chgnet, nacl_hull):
    only_elements = Hull("elements", "potential", "chgnet", nacl_hull.entries[nacl_hull.entries["kind"] == "element"])
    verdict = only_elements.evaluate("NaCl", -3.7)
    assert verdict["hull_covered"] is False and verdict["e_hull"] < 0


def test_stability_over_a_sample_set_keeps_every_row(chgnet, nacl_hull, tmp_path):
    sset = tmp_path / "set"
    (sset / "raw").mkdir(parents=True)
    (sset / "processed").mkdir()
    cifs = {"0000": rocksalt().to(fmt="cif"), "0001": None,
            "0002": Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]]).to(fmt="cif"),
            "0003": Structure(Lattice.cubic(4.0), ["K", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(fmt="cif")}
    for stem, cif in cifs.items():
        (sset / "raw" / f"{stem}.txt").write_text("generated text")
        if cif:
            (sset / "processed" / f"{stem}.cif").write_text(cif)
    df, summary = run_stability([sset], "chgnet", nacl_hull, workers=1, timeout_s=60, device="cpu")
    table = pd.read_csv(sset / "stability.csv")
    assert list(table.columns) == list(COLUMNS) and list(table["file"]) == [f"{s}.txt" for s in cifs]
    assert list(table["failure_reason"].fillna("")) == ["", "no_processed_cif", "overlapping_atoms",
                                                        "element_unsupported"]
    assert bool(table["stable"].iat[0]) == bool(table["e_hull"].iat[0] <= 0) and table["metastable"].iat[0]
    assert (sset / table["relaxed_cif"].iat[0]).is_file()
    assert summary["n"] == 4 and summary["n_evaluated"] == 1 and summary["thresholds"] == {"stable": 0.0,
                                                                                         "metastable": 0.1}
    assert summary["metastable_rate"] == 0.25 and summary["hull"] == "nacl"


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["stability", str(tmp_path), "--potential", "mace", "--hull", "h", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["stability", str(tmp_path), "--potential", "chgnet", "--hull", "nowhere", "--out", "o"]) == 2
    assert "hull nowhere not found" in capsys.readouterr().err


def test_job_argv_is_the_cli():
    from engine.cli import build_parser

    argv = stability_job_argv(["runs/samples/s"], "chgnet", "mp20", "runs/samples/s", workers=2, timeout_s=60)
    args = build_parser("stability").parse_args(argv)
    assert args.potential == "chgnet" and args.hull == "mp20" and args.workers == 2 and args.timeout == 60


@pytest.mark.slow  # a detached process that imports torch and loads CHGNet itself (20-60 s on a busy 2-core machine)
def test_stability_runs_as_a_detached_job(nacl_hull, tmp_path):
    import time

    from engine.lab import jobs

    hull_dir = nacl_hull.save(tmp_path / "hull")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "NaCl.cif").write_text(rocksalt().to(fmt="cif"))
    out = tmp_path / "out"
    argv = stability_job_argv([tmp_path / "in"], "chgnet", str(hull_dir), out, workers=1, timeout_s=120)
    jobs.launch_job(argv, tmp_path / "job", kind="stability", target=out)
    deadline = time.monotonic() + 300
    while jobs.job_state(tmp_path / "job")["state"] == "running" and time.monotonic() < deadline:
        time.sleep(1)
    state = jobs.job_state(tmp_path / "job")
    assert state["state"] == "finished", jobs.tail_log(tmp_path / "job")
    table = pd.read_csv(out / "stability.csv")
    assert list(table["file"]) == ["NaCl.cif"] and abs(table["e_hull"].iat[0]) <= 0.05
    assert jobs.progress(tmp_path / "job") == (1, 1)


def test_evaluate_with_stability_joins_the_halves_end_to_end(chgnet, nacl_hull, tmp_path, capsys):
    """`crystallab evaluate SET --stability`: the stability pass, then S.U.N. over the same files, and the
    dashboard's reader finds each relaxed structure."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # pages/ is not an installed package
    from pages.stability_panels import stability_table

    hull_dir = nacl_hull.save(tmp_path / "hull")
    sset = tmp_path / "set"
    (sset / "raw").mkdir(parents=True)
    (sset / "processed").mkdir()
    for stem, s in {"0000": rocksalt(), "0001": rocksalt(5.5)}.items():
        (sset / "raw" / f"{stem}.txt").write_text(s.to(fmt="cif"))
        (sset / "processed" / f"{stem}.cif").write_text(s.to(fmt="cif"))
    code = main(["evaluate", str(sset), "--out", str(sset / "eval.csv"), "--processed", "--workers", "1",
                 "--stability", "--hull", str(hull_dir), "--potential", "chgnet"])
    assert code == 0, capsys.readouterr().err
    stab = pd.read_csv(sset / "stability.csv")
    ev = pd.read_csv(sset / "eval.csv")
    assert set(stab["file"]) <= set(ev["file"]) and len(stab) == 2
    summary = json.loads((sset / "eval_summary.json").read_text())
    assert summary["stable_rate"]["value"] == 1.0  # both relax onto the NaCl hull
    assert summary["sun_rate"]["value"] is None  # novelty needs a training set (--train), so S.U.N. is n/a
    table = stability_table(sset)
    assert table["relaxed_cif"].iat[0].startswith("# generated") or "data_" in table["relaxed_cif"].iat[0]


def test_sulfur_reference_is_the_s8_ring_not_a_one_atom_cell(chgnet):
    """ase's one-atom S cell sits ~0.7 eV/atom above alpha-S and made every sulfide look far too stable."""
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    from engine.evaluate.hull import elemental_reference_cifs

    refs, missing = elemental_reference_cifs(["S", "Na"])
    assert not missing and Structure.from_str(refs["S"], fmt="cif").composition.reduced_formula == "S"
    assert len(Structure.from_str(refs["S"], fmt="cif")) == 8
    ring = relax_one(refs["S"], chgnet, steps=200)
    single = relax_one(AseAtomsAdaptor.get_structure(dcdft["S"]).to(fmt="cif"), chgnet, steps=200)
    assert ring["failure_reason"] is None and ring["energy_per_atom"] < single["energy_per_atom"] - 0.5

"""Distribution metrics (COV-R / COV-P, Wasserstein, diversity), S.U.N. from a stability table, the published-table
report and ``crystallab evaluate --reference``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.evaluate import distribution as D
from engine.evaluate.metrics import TrainingIndex
from engine.evaluate.sun import read_stability, sun_metrics
from engine.lab.errors import InputError


def _rocksalt(a: str, b: str, x: float) -> Structure:
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(x), [a, b], [[0, 0, 0], [0.5] * 3])
    return s.get_primitive_structure()


def _fcc(a: str, x: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(x), [a], [[0, 0, 0]]).get_primitive_structure()


def _cscl(a: str, b: str, x: float) -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(x), [a, b], [[0, 0, 0], [0.5] * 3])


def _items(structures: list[Structure], prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", str(CifWriter(s))) for i, s in enumerate(structures)]


@pytest.fixture(scope="module")
def fps() -> tuple[D.Fingerprints, D.Fingerprints]:
    """Ionic crystals (rock salt, CsCl) and fcc metals: fingerprinted once for the module."""
    ionic = [_rocksalt("Na", "Cl", 5.64), _rocksalt("Mg", "O", 4.21), _cscl("Cs", "Cl", 4.12)]
    metals = [_fcc("Cu", 3.61), _fcc("Al", 4.05), _fcc("Ni", 3.52)]
    return (D.fingerprint_cifs(_items(ionic, "g") + [("broken", "data_x\nnot a cif\n")], workers=1),
            D.fingerprint_cifs(_items(metals, "r"), workers=1))


def test_fingerprints_have_cdvae_shapes_and_reasons(fps):
    ionic, metals = fps
    assert ionic.struct.shape == (4, 61) and ionic.comp.shape == (4, 132)
    assert ionic.ok.tolist() == [True, True, True, False] and ionic.errors[3] == "parse_failed"
    assert ionic.n_elements[:3].tolist() == [2, 2, 2] and metals.n_elements.tolist() == [1, 1, 1]
    assert ionic.density[0] == pytest.approx(_rocksalt("Na", "Cl", 5.64).density)


def test_cov_of_a_set_against_itself_is_one_and_against_a_disjoint_set_zero(fps):
    ionic, metals = fps
    ok = ionic.subset(ionic.ok)
    assert D.coverage(ok, ok, struct_cutoff=0.4, comp_cutoff=10) == (1.0, 1.0)
    assert D.coverage(ok, metals, struct_cutoff=0.4, comp_cutoff=10) == (0.0, 0.0)
    # COV-P divides by all submitted samples: the unparsed one is a miss.
    assert D.coverage(ionic, ok, struct_cutoff=0.4, comp_cutoff=10) == (1.0, 0.75)
    # The nearest structural and compositional neighbours are taken independently.
    assert D.coverage(ok, ok.subset(np.array([True, False, False])), struct_cutoff=0.4, comp_cutoff=1e9)[1] == \
        pytest.approx(2 / 3)


def test_wasserstein_of_a_set_with_itself_is_zero(fps):
    ionic, metals = fps
    m = D.distribution_metrics(ionic, ionic, reference_label="self")
    assert m["wdist_density"]["value"] == 0.0 and m["wdist_n_elements"]["value"] == 0.0
    assert m["cov_recall"]["value"] == 1.0 and m["cov_precision"]["value"] == 0.75
    assert m["cov_cutoffs"]["value"] == {"struct": 0.4, "comp": 10.0}
    assert "reference set" in m["scaler"]["value"]
    other = D.distribution_metrics(ionic, metals, reference_label="metals", cutoffs="perov5")
    assert other["wdist_n_elements"]["value"] == pytest.approx(1.0)
    assert other["cov_cutoffs"]["value"] == {"struct": 0.2, "comp": 4.0}
    assert D.wasserstein([1.0, 2.0], [1.0, 2.0]) == 0.0 and D.wasserstein([], [1.0]) is None
    div_s, div_c = D.diversity(ionic)
    assert div_s > 0 and div_c > 0 and D.diversity(ionic.subset(np.array([1, 0, 0, 0], bool))) == (None, None)


def test_cutoff_presets_and_bad_cutoffs():
    assert D.resolve_cutoffs("MP-20") == (0.4, 10.0) and D.resolve_cutoffs("carbon_24") == (0.2, 4.0)
    assert D.resolve_cutoffs("0.3,5") == (0.3, 5.0)
    for bad in ("mp21", "0.3", "-1,4"):
        with pytest.raises(InputError, match="COV cutoffs"):
            D.resolve_cutoffs(bad)


def test_reference_csv_reads_e_hull_and_subsamples(tmp_path):
    rows = [{"material_id": f"m{i}", "e_above_hull": 0.01 * i, "cif": str(CifWriter(_fcc("Cu", 3.5 + 0.1 * i)))}
            for i in range(5)]
    path = tmp_path / "ref.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    ref = D.load_reference(path)
    assert ref.names == [f"m{i}" for i in range(5)] and ref.e_hull.tolist() == pytest.approx([0.0, 0.01, 0.02,
                                                                                              0.03, 0.04])
    sub = D.load_reference(path, limit=2, seed=1)
    assert len(sub.cifs) == 2 and "random subset" in sub.label and sub.names == sorted(sub.names)
    with pytest.raises(InputError, match="does not exist"):
        D.load_reference(tmp_path / "missing.csv")


# ----------------------------------------------------------------------------------------------------------------
# S.U.N.


def test_sun_of_a_constructed_set_is_exact(tmp_path):
    nacl = _rocksalt("Na", "Cl", 5.64)
    structures = {
        "s0": nacl,                              # stable, unique, novel: S.U.N.
        "s1": nacl.copy(),                       # stable but a duplicate of s0
        "s2": _rocksalt("Mg", "O", 4.21),        # stable but in the training set
        "s3": _cscl("Cs", "Cl", 4.12),           # metastable (0.05), unique, novel: M.S.U.N. only
        "s4": _rocksalt("K", "Br", 6.6),         # E_hull -0.01 but the hull does not cover K-Br
        "s5": None,                              # did not parse
        "s6": _rocksalt("Li", "F", 4.03),        # unstable (0.3)
        "s7": _rocksalt("Na", "Br", 5.97),       # missing from stability.csv (relaxation failed)
    }
    stability = pd.DataFrame({
        "file": ["s0", "s1", "s2", "s3", "s4", "s5", "s6"],
        "potential": "chgnet", "hull": "test",
        "e_hull": [0.0, -0.02, -0.05, 0.05, -0.01, np.nan, 0.3],
        "hull_covered": [True, True, True, True, False, False, True],
    })
    path = tmp_path / "stability.csv"
    stability.to_csv(path, index=False)
    train = TrainingIndex.from_cifs([_rocksalt("Mg", "O", 4.21)])
    m = sun_metrics(structures, read_stability(path), train)
    v = {k: e["value"] for k, e in m.items()}
    assert v["n_submitted"] == 8
    assert v["stable_rate"] == 3 / 8 and v["metastable_rate"] == 4 / 8
    assert v["unique_sample_rate"] == 6 / 8 and v["novel_rate"] == 6 / 8
    assert v["sun_rate"] == 1 / 8 and v["msun_rate"] == 2 / 8 and v["sun_uncovered"] == 1
    assert v["sun_thresholds"] == {"stable": 0.0, "metastable": 0.1}
    assert v["hull"] == {"potential": ["chgnet"], "hull": ["test"]}
    assert "0.0 eV/atom" in m["sun_rate"]["definition"] and "all submitted" in m["sun_rate"]["definition"]
    assert sun_metrics(structures, stability, None)["sun_rate"]["value"] is None


def test_a_stability_table_without_e_hull_is_refused(tmp_path):
    path = tmp_path / "stability.csv"
    pd.DataFrame({"file": ["a"], "energy_per_atom": [-3.0]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="e_hull"):
        read_stability(path)


# ----------------------------------------------------------------------------------------------------------------
# crystallab evaluate --reference, and S.U.N. from a stability.csv beside the samples


def test_evaluate_cli_reports_distribution_and_sun_in_published_shapes(tmp_path, capsys):
    from engine.cli import main
    from engine.lab.fsutil import read_json

    samples = tmp_path / "samples"
    samples.mkdir()
    structures = [_rocksalt("Na", "Cl", 5.64), _rocksalt("Na", "Cl", 5.64), _cscl("Cs", "Cl", 4.12)]
    for i, s in enumerate(structures):
        (samples / f"{i}.cif").write_text(str(CifWriter(s)))
    pd.DataFrame({"file": ["0.cif", "1.cif", "2.cif"], "potential": "chgnet", "hull": "h",
                  "e_hull": [-0.01, -0.01, 0.2], "hull_covered": True}).to_csv(samples / "stability.csv", index=False)
    ref = tmp_path / "test.csv"
    pd.DataFrame({"material_id": ["a", "b"], "e_above_hull": [0.0, 0.02],
                  "cif": [str(CifWriter(s)) for s in structures[1:]]}).to_csv(ref, index=False)
    out = tmp_path / "eval.csv"
    rc = main(["evaluate", str(samples), "--out", str(out), "--processed", "--workers", "1",
               "--reference", str(ref), "--cutoffs", "mp20"])
    assert rc == 0
    summary = read_json(tmp_path / "eval_summary.json")
    assert summary["cov_recall"]["value"] == 1.0 and summary["cov_precision"]["value"] == 1.0
    assert summary["wdist_e_hull"]["value"] == pytest.approx(D.wasserstein([-0.01, -0.01, 0.2], [0.0, 0.02]))
    assert summary["stable_rate"]["value"] == pytest.approx(2 / 3)
    assert summary["unique_sample_rate"]["value"] == pytest.approx(2 / 3)
    assert summary["sun_rate"]["value"] is None  # novelty needs --train
    err = capsys.readouterr().err
    assert "CDVAE / Gruver" in err and "published figure under its own protocol" in err and "LLaMA-2 70B" in err
    assert "MatterGen-MP20" in err


def test_evaluate_cli_refuses_stability_without_a_hull_and_bad_cutoffs(tmp_path, capsys):
    from engine.cli import main

    (tmp_path / "a.cif").write_text(str(CifWriter(_cscl("Cs", "Cl", 4.12))))
    out = str(tmp_path / "eval.csv")
    assert main(["evaluate", str(tmp_path / "a.cif"), "--out", out, "--stability"]) == 2
    assert "--hull" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "a.cif"), "--out", out, "--cutoffs", "mp30"]) == 2
    assert "COV cutoffs" in capsys.readouterr().err

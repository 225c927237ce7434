"""The crystal-structure-prediction benchmark: targets, scoring of one sample, and whole runs that resume."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.cli import main
from engine.crystal.canonical import structure_to_model_view
from engine.evaluate.csp import load_targets, run_csp, score_candidate, summarize
from engine.lab.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def _mp20_rows(shared_dir: Path, n: int) -> pd.DataFrame:
    return pd.read_csv(shared_dir / "data" / "mp20_subset" / "test.csv").head(n)


def test_score_candidate_matches_the_target_itself_and_a_slightly_moved_copy(shared_dir):
    cif = _mp20_rows(shared_dir, 1).cif[0]  # Ce(CoAs)2, I4/mmm
    target = Structure.from_str(cif, fmt="cif")
    same = score_candidate(structure_to_model_view(target), cif)
    assert same["postprocess_ok"] and same["valid"] and same["matched"]
    assert same["rms"] == pytest.approx(0.0, abs=1e-3)  # the canonical text rounds coordinates to 4 decimals

    moved = target.copy()
    moved.perturb(0.1, min_distance=0.1)  # every site 0.1 A off, a lattice 2 % larger
    moved.scale_lattice(target.volume * 1.02**3)
    near = score_candidate(structure_to_model_view(moved), cif)
    assert near["matched"] and 0.01 < near["rms"] < 0.3


def test_score_candidate_rejects_other_structures_overlaps_and_garbage(shared_dir):
    rows = _mp20_rows(shared_dir, 3)
    target_cif, other_cif = rows.cif[0], rows.cif[2]
    other = score_candidate(structure_to_model_view(Structure.from_str(other_cif, fmt="cif")), target_cif)
    assert other["valid"] and not other["matched"] and other["rms"] is None

    crushed = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])  # 0.2 A apart
    row = score_candidate(structure_to_model_view(crushed), CifWriter(crushed).__str__())
    assert row["struct_valid"] is False and not row["valid"] and not row["matched"]

    perfect = structure_to_model_view(Structure.from_str(target_cif, fmt="cif"))
    cut = score_candidate(perfect, target_cif, finished=False)  # the sampler stopped it at its token budget
    assert cut["failure_reason"] == "truncated" and not cut["matched"] and cut["finished"] is False

    garbage = score_candidate("data_Na1Cl1\n_cell_length_a 4.0\n", target_cif)
    assert garbage["failure_reason"] in {"truncated", "postprocess_failed"} and not garbage["matched"]


def test_targets_are_prompted_with_their_canonical_cell_composition(shared_dir, tmp_path):
    csv = tmp_path / "targets.csv"
    rows = _mp20_rows(shared_dir, 6)
    disordered = Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    rows = pd.concat([rows, pd.DataFrame([{"material_id": "disordered", "cif": str(CifWriter(disordered))}])])
    rows.to_csv(csv, index=False)

    targets, rejects = load_targets(csv)
    assert [t.name for t in targets] == list(rows.material_id[:6])
    assert rejects == [{"name": "disordered", "reason": rejects[0]["reason"]}]
    assert "disordered" in rejects[0]["reason"]
    for t in targets:
        view = structure_to_model_view(Structure.from_str(t.cif, fmt="cif"))
        assert t.prompt_text == view.split("\n", 1)[0] + "\n"  # exactly the data_ line the model was trained on
        assert t.prompt_text == f"data_{t.cell_formula}\n"
    ce = targets[0]
    assert (ce.cell_formula, ce.z, ce.spacegroup) == ("Ce2Co4As4", 2, "I4/mmm")

    with_sg, _ = load_targets(csv, with_spacegroup=True)
    assert with_sg[0].prompt_text.startswith("data_Ce2Co4As4\nloop_\n_atom_type_symbol\n")
    assert with_sg[0].prompt_text.endswith("_symmetry_space_group_name_H-M I4/mmm\n")

    subset, _ = load_targets(csv, limit=3, subset_seed=7)
    again, _ = load_targets(csv, limit=3, subset_seed=7)
    assert [t.name for t in subset] == [t.name for t in again] and len(subset) == 3


def test_a_target_with_more_formula_units_than_a_typed_prompt_allows_is_still_prompted(shared_dir, tmp_path):
    rows = pd.read_csv(shared_dir / "data" / "carbon_24" / "test.csv")
    rows[rows.material_id == "C-150735-7115-7"].to_csv(tmp_path / "c.csv", index=False)
    (target,), rejects = load_targets(tmp_path / "c.csv")
    assert not rejects and target.z > 32  # its conventional cell holds 44 carbon atoms
    assert target.prompt_text == f"data_C{target.z}\n"


def test_bad_targets_sources_are_refused_with_the_input_named(tmp_path):
    no_cif = tmp_path / "props.csv"
    no_cif.write_text("material_id,formula\nmp-1,NaCl\n")
    with pytest.raises(InputError, match="no 'cif' column"):
        load_targets(no_cif)
    with pytest.raises(InputError, match="does not exist"):
        load_targets(tmp_path / "missing.csv")


# ---- whole runs, with the tiny lab's model that memorised three rock salts -----------------------------------


@pytest.fixture(scope="module")
def lab_runs(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("crystallab_test_lab", REPO / "tests" / "app" / "lab.py")
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    base = tmp_path_factory.getbasetemp()  # shared with tests/app, so a whole-suite run builds it once
    return lab.make_lab(base / "crystallab-lab", base / "crystallab-cache")


@pytest.fixture
def rock_salts(lab_runs) -> tuple[Path, Path]:
    """(checkpoint, folder of the three rock-salt CIFs the tiny model was trained on)."""
    return lab_runs / "train" / "tiny" / "ckpt" / "last.pt", lab_runs.parent / "cifs"


def test_memorised_structures_are_found_and_an_unseen_structure_type_is_not(rock_salts, tmp_path):
    ckpt, cifs = rock_salts
    targets = tmp_path / "targets"
    targets.mkdir()
    for cif in cifs.glob("*.cif"):
        (targets / cif.name).write_text(cif.read_text())
    b2 = Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    CifWriter(b2).write_file(targets / "CsCl.cif")  # caesium chloride type: never in the training data

    summary = run_csp(ckpt, targets, tmp_path / "run", k=2, temperature=0.0, max_new_tokens=400, device="cpu",
                      workers=1)
    results = pd.read_csv(tmp_path / "run" / "results.csv").set_index("name")
    assert results.loc[["KCl.cif", "MgO.cif", "NaCl.cif"], "matched"].all()
    assert not results.loc["CsCl.cif", "matched"]
    assert summary["match_rate"] == 0.75 and summary["n_targets"] == 4 and summary["complete"]
    assert summary["rmse"] < 1e-3
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "| 4 | 2 | 75.0 % |" in md and "stol 0.5, ltol 0.3, angle_tol 10" in md


def test_an_interrupted_run_continues_without_redoing_finished_targets(rock_salts, tmp_path):
    ckpt, cifs = rock_salts
    run = tmp_path / "run"
    first = run_csp(ckpt, cifs, run, k=2, temperature=0.5, max_new_tokens=400, device="cpu", workers=1)
    files = sorted((run / "targets").glob("*.json"))
    assert len(files) == 3
    kept = {p.name: p.stat().st_mtime_ns for p in files[1:]}
    lost = json.loads(files[0].read_text())
    files[0].unlink()  # as if the run had been killed before writing its first target
    (run / "summary.json").unlink()

    again = run_csp(ckpt, cifs, run, k=2, temperature=0.5, max_new_tokens=400, device="cpu", workers=1)
    for name, mtime in kept.items():
        assert (run / "targets" / name).stat().st_mtime_ns == mtime  # not redone
    assert json.loads(files[0].read_text())["samples"] == lost["samples"]  # redone: same seed, same samples
    assert {k: again[k] for k in ("match_rate", "rmse", "valid_sample_rate")} == \
        {k: first[k] for k in ("match_rate", "rmse", "valid_sample_rate")}  # same seeds, same samples

    with pytest.raises(InputError, match="different sampling"):
        run_csp(ckpt, cifs, run, k=3, temperature=0.5, max_new_tokens=400, device="cpu", workers=1)
    assert summarize(run)["n_targets"] == 3


def test_a_csp_run_is_owned_by_one_live_process(rock_salts, tmp_path):
    import subprocess
    import sys

    from engine.lab.settings import REPO_ROOT

    ckpt, cifs = rock_salts
    code = ("import sys, time; from engine.lab.jobs import hold_folder; hold_folder(sys.argv[1], 'CSP run'); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"CSP run .* is in use by process {holder.pid} on "):
            run_csp(ckpt, cifs, tmp_path / "run", k=1, temperature=0.5, max_new_tokens=40, device="cpu", workers=1)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "run" / "targets").exists(), "nothing was written by the refused run"


def test_cli_runs_under_the_runs_root_and_reports_bad_input_in_one_line(rock_salts, lab_runs, tmp_path,
                                                                        monkeypatch, capsys):
    ckpt, cifs = rock_salts
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "train").symlink_to(lab_runs / "train")  # the relative --ckpt below is looked up under the runs root
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(runs))
    code = main(["csp", "--ckpt", "train/tiny/ckpt/last.pt", "--targets", str(cifs), "--k", "1",
                 "--temperature", "0", "--max-new-tokens", "400", "--device", "cpu", "--workers", "1",
                 "--out", "cli-test"])
    out = capsys.readouterr().out
    assert code == 0 and "match rate 100.0 %" in out
    assert (runs / "csp" / "cli-test" / "summary.md").exists()
    code = main(["csp", "--ckpt", str(ckpt), "--targets", str(cifs / "nothing.csv"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nothing.csv" in err and "Traceback" not in err
    assert sorted(p.name for p in (runs / "csp").iterdir()) == ["cli-test"]  # the failed run left nothing

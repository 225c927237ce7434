"""Evaluation: killable time-boxed workers, deterministic order, set metrics, sample-set folders and the CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from engine.crystal.tokenizer import encode
from engine.crystal.vocab import meta_dict
from engine.evaluate.evaluation import add_cli, evaluate_sample_set, evaluate_texts
from engine.evaluate.metrics import METRIC_DEFINITIONS, TrainingIndex, macro_average, set_metrics
from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_json, read_json


def _texts(golden_canonical, n: int) -> list[tuple[str, str]]:
    return [(r["id"], r["decoded"]) for r in golden_canonical if r.get("decoded")][:n]


def _big_p1_cif() -> str:
    """A 216-atom jittered rock-salt supercell in P1: CrystalNN needs seconds on it (no equivalent sites)."""
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    s.make_supercell(3)
    s.perturb(0.05)
    rows = "\n".join(
        f"{x.specie} {x.specie}{i} 1 {x.frac_coords[0]:.4f} {x.frac_coords[1]:.4f} {x.frac_coords[2]:.4f} 1"
        for i, x in enumerate(s)
    )
    return (
        "data_Na108Cl108\n_symmetry_space_group_name_H-M P1\n_cell_length_a 16.9200\n_cell_length_b 16.9200\n"
        "_cell_length_c 16.9200\n_cell_angle_alpha 90.0000\n_cell_angle_beta 90.0000\n_cell_angle_gamma 90.0000\n"
        "_symmetry_Int_Tables_number 1\n_chemical_formula_structural NaCl\n_chemical_formula_sum 'Na108 Cl108'\n"
        "_cell_volume 4843.9000\n_cell_formula_units_Z 108\nloop_\n_symmetry_equiv_pos_site_id\n"
        "_symmetry_equiv_pos_as_xyz\n1 'x, y, z'\nloop_\n_atom_site_type_symbol\n_atom_site_label\n"
        "_atom_site_symmetry_multiplicity\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
        f"_atom_site_occupancy\n{rows}\n\n"
    )


def test_pool_matches_in_process_and_keeps_order(golden_canonical):
    items = _texts(golden_canonical, 5)
    items.insert(2, ("cut", items[0][1][:300]))
    seen = []
    pooled = evaluate_texts(items, workers=2, timeout_s=60, progress=lambda d, t: seen.append((d, t)))
    local = evaluate_texts(items, workers=1, timeout_s=None)
    assert list(pooled["file"]) == [name for name, _ in items]
    pd.testing.assert_frame_equal(pooled, local)
    assert seen[-1] == (6, 6) and len(seen) == 6
    assert pooled.loc[2, "failure_reason"] == "truncated" and not pooled.loc[2, "parse_ok"]
    assert pooled.loc[0, "generated_length"] == len(encode(items[0][1]))
    assert pooled["is_valid"].sum() == 5


def test_timeout_kills_the_worker_and_the_rest_still_get_evaluated(golden_canonical):
    good = _texts(golden_canonical, 3)
    items = [good[0], ("slow", _big_p1_cif()), good[1], good[2]]
    # 1.5 s: the 216-atom cell needs ~4 s (2-core Xeon); a golden CIF ~0.1-0.4 s, which 0.5 s left too close under load
    df = evaluate_texts(items, workers=2, timeout_s=1.5, raw=True)
    assert df.loc[1, "failure_reason"] == "timeout" and df.loc[1, "is_valid"] == False  # noqa: E712
    assert list(df["is_valid"][[0, 2, 3]]) == [True, True, True]


def _dup_texts(golden_canonical) -> list[tuple[str, str]]:
    a, b = _texts(golden_canonical, 2)
    return [("a1", a[1]), ("a2", a[1]), ("b", b[1]), ("cut", a[1][:250])]


def test_set_metrics_uniqueness_novelty_and_definitions(golden_canonical):
    items = _dup_texts(golden_canonical)
    df = evaluate_texts(items, workers=1, timeout_s=None)
    training = TrainingIndex.from_cifs([items[2][1]])  # b is in the training set, a is not
    m = set_metrics(df, train_index=training)
    assert set(m) == set(METRIC_DEFINITIONS) and all(v["definition"] for v in m.values())
    assert m["n"]["value"] == 4
    assert m["parse_rate"]["value"] == 0.75 and m["validity"]["value"] == 0.75
    assert m["uniqueness_all"]["value"] == 0.5 and m["uniqueness_valid"]["value"] == 0.5
    assert m["novelty"]["value"] == 0.5 and m["unique_novel_valid_rate"]["value"] == 0.25
    assert m["failure_counts"]["value"] == {"truncated": 1}
    assert sum(m["formula_counts"]["value"].values()) == 3
    assert m["formula_hit_rate"]["value"] is None  # no prompt
    avg = macro_average([m, set_metrics(df.iloc[:1])])
    assert avg["validity"]["value"] == (0.75 + 1.0) / 2 and "macro-average" in avg["validity"]["definition"]
    assert sum(avg["formula_counts"]["value"].values()) == 4


def test_training_index_from_dataset_decodes_by_formula(tmp_path, golden_canonical):
    views = [r["model_view"] for r in golden_canonical if r.get("model_view")][:3]
    ids = np.array([t for v in views for t in encode(v)], dtype="<u2")
    ids.tofile(tmp_path / "train.bin")
    ids[:0].tofile(tmp_path / "val.bin")
    atomic_write_json(tmp_path / "meta.json", meta_dict())
    index = TrainingIndex.from_dataset(tmp_path)
    assert len(index) == 3
    items = [("x", r["decoded"]) for r in golden_canonical if r.get("model_view")][:1]
    df = evaluate_texts(items, workers=1, timeout_s=None)
    structure = TrainingIndex.from_cifs([df.loc[0, "processed_cif"]]).structures(df.loc[0, "reduced_formula"])[0]
    assert df.loc[0, "reduced_formula"] in index and not index.is_novel(structure)


def test_sample_set_folder_and_cli(tmp_path, golden_canonical):
    folder = tmp_path / "set"
    (folder / "raw").mkdir(parents=True)
    texts = [t for _, t in _dup_texts(golden_canonical)]
    for i, text in enumerate(texts):
        (folder / "raw" / f"{i:04d}.txt").write_text(text)
    first = texts[0].splitlines()[0].removeprefix("data_")
    atomic_write_json(folder / "config.json", {"prompt": {"text": f"data_{first}\n", "formula": first, "z": None,
                                                          "spacegroup": None, "label": first}})
    df, metrics = evaluate_sample_set(folder, workers=1, timeout_s=None)
    table = pd.read_csv(folder / "eval.csv")
    assert list(table["file"]) == ["0000.txt", "0001.txt", "0002.txt", "0003.txt"]
    assert "processed_cif" not in table.columns
    assert read_json(folder / "eval_summary.json")["validity"]["value"] == metrics["validity"]["value"] == 0.75
    assert sorted(p.name for p in (folder / "processed").iterdir()) == ["0000.cif", "0001.cif", "0002.cif"]
    assert metrics["formula_hit_rate"]["value"] == 0.5  # two of four samples have the prompt's composition

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "cli" / "eval.csv"
    args = parser.parse_args(["evaluate", str(folder), "--out", str(out), "--workers", "2", "--timeout", "60"])
    assert args.func(args) == 0
    cli_table = pd.read_csv(out)
    for column in ("file", "parse_ok", "is_valid", "formula_consistent", "multiplicity_consistent",
                   "space_group_consistent", "bond_length_score", "reduced_formula", "spacegroup"):
        assert column in cli_table.columns
    assert list(cli_table["is_valid"]) == list(table["is_valid"])
    assert read_json(out.with_name("eval_summary.json"))["n"]["value"] == 4


def _prompt_for(text: str) -> dict:
    formula = text.splitlines()[0].removeprefix("data_")
    return {"text": f"data_{formula}\n", "formula": formula, "z": None, "spacegroup": "Fm-3m", "label": formula}


def test_hit_rates_are_k_over_n_even_when_nothing_parses(golden_canonical):
    (_, text), (_, other) = _texts(golden_canonical, 2)
    prompt = _prompt_for(text)
    nothing = evaluate_texts([(f"cut{i}", text[:200]) for i in range(4)], prompt=prompt, workers=1, timeout_s=None)
    assert list(nothing["formula_hit"]) == [False] * 4  # a sample that did not parse did not hit the prompt
    a = set_metrics(nothing, prompt=prompt)
    assert a["formula_hit_rate"]["value"] == 0.0 and a["spacegroup_hit_rate"]["value"] == 0.0
    half = evaluate_texts([("h1", text), ("h2", text), ("o1", other), ("o2", other)], prompt=prompt, workers=1,
                          timeout_s=None)
    b = set_metrics(half, prompt=prompt)
    assert b["formula_hit_rate"]["value"] == 0.5
    # the macro-average counts the set where nothing parsed as 0, not as missing
    assert macro_average([a, b])["formula_hit_rate"]["value"] == 0.25
    # a prompt without a composition or space group has no hit rate, also when the table is passed alone
    no_prompt = set_metrics(nothing, prompt={"text": "data_", "formula": None, "spacegroup": None})
    assert no_prompt["formula_hit_rate"]["value"] is None and no_prompt["spacegroup_hit_rate"]["value"] is None
    assert set_metrics(nothing)["formula_hit_rate"]["value"] == 0.0  # the rows say the samples missed


def test_sample_set_uses_the_samplers_finished_flags(tmp_path, golden_canonical):
    """A text cut at max_new_tokens is truncated and never written to processed/, even if it looks complete."""
    folder = tmp_path / "set"
    (folder / "raw").mkdir(parents=True)
    (_, text), (_, other) = _texts(golden_canonical, 2)
    body, last = text.rstrip("\n").rsplit("\n", 1)
    malformed = f"{body}\n{last.split(' ', 1)[1]}\n\n"  # finished, but its last row lost a value
    two_blocks = text.rstrip("\n") + "\n" + other[:120]  # ran on into a second block, then cut
    for i, t in enumerate([text, text, malformed, two_blocks]):
        (folder / "raw" / f"{i:04d}.txt").write_text(t)
    flags = [True, False, True, False]
    (folder / "samples.jsonl").write_text(
        "".join(f'{{"name": "{i:04d}", "finished": {str(f).lower()}}}\n' for i, f in enumerate(flags))
    )
    atomic_write_json(folder / "config.json", {"prompt": _prompt_for(text)})
    df, metrics = evaluate_sample_set(folder, workers=1, timeout_s=None)
    assert list(df["failure_reason"].fillna("")) == ["", "truncated", "malformed", "truncated"]
    assert "max_new_tokens" in df.loc[1, "failure_detail"] and "fewer than" in df.loc[2, "failure_detail"]
    assert sorted(p.name for p in (folder / "processed").iterdir()) == ["0000.cif"]
    assert metrics["formula_hit_rate"]["value"] == 0.25


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_refuses_a_folder_as_out_and_a_non_positive_timeout(tmp_path, golden_canonical):
    src = tmp_path / "in.txt"
    src.write_text(_texts(golden_canonical, 1)[0][1])
    with pytest.raises(InputError, match="--out .* is a folder"):
        _cli(["evaluate", str(src), "--out", str(tmp_path)])
    for bad in ("0", "-1", "nan"):
        with pytest.raises(InputError, match="--timeout .* must be a positive number of seconds"):
            _cli(["evaluate", str(src), "--out", str(tmp_path / "e.csv"), "--timeout", bad])
    assert not (tmp_path / "e.csv").exists()


def test_cli_prints_every_set_metric_and_the_canonicalize_hint(tmp_path, golden_canonical, capsys):
    """pymatgen P1 files of symmetric crystals are never valid as they are: the summary says to canonicalize."""
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    files = []
    for i in range(2):
        path = tmp_path / f"p1_{i}.cif"
        s.to(filename=str(path))  # what Materials Project / pymatgen write: space group P 1
        files.append(str(path))
    assert _cli(["evaluate", *files, "--out", str(tmp_path / "e.csv"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    for name in METRIC_DEFINITIONS:
        if name != "n":
            assert f"  {name} " in err, name
    assert "crystallab cif canonicalize" in err and "state space group P 1" in err
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["evaluate"].format_help()
    assert "crystallab cif canonicalize" in " ".join(help_text.split())


def test_a_disordered_cif_gets_the_reason_disordered_without_a_traceback(tmp_path, capfd):
    s = Structure(Lattice.cubic(5.64), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [0.5] * 3])
    path = tmp_path / "disordered.cif"
    s.to(filename=str(path))
    assert _cli(["evaluate", str(path), "--processed", "--out", str(tmp_path / "e.csv"), "--workers", "1"]) == 0
    row = pd.read_csv(tmp_path / "e.csv").iloc[0]
    assert row["failure_reason"] == "disordered" and "site 0" in row["failure_detail"] and not row["is_valid"]
    assert "Traceback" not in capfd.readouterr().err


def test_a_check_that_raises_is_reported_per_file_and_fails_the_command(tmp_path, capfd, monkeypatch):
    import engine.evaluate.checks

    real = engine.evaluate.checks.bond_length_score

    def broken(structure):
        if structure.composition.reduced_formula == "NaCl":
            return real(structure)  # the workers' warm-up CIF (NaCl) still passes, so the workers start
        raise AttributeError("a check broke")

    monkeypatch.setattr(engine.evaluate.checks, "bond_length_score", broken)  # the forked worker inherits the patch
    src = tmp_path / "kcl.cif"
    Structure.from_spacegroup("Fm-3m", Lattice.cubic(6.3), ["K", "Cl"], [[0, 0, 0], [0.5] * 3]).to(filename=str(src))
    assert _cli(["evaluate", str(src), "--processed", "--out", str(tmp_path / "e.csv"), "--workers", "1"]) == 1
    row = pd.read_csv(tmp_path / "e.csv").iloc[0]
    assert row["failure_reason"] == "check_error" and "a check broke" in row["failure_detail"]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "1 file(s) could not be checked" in err

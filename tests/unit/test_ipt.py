"""The IPT probe: a translation-invariant model scores ~0, a tiny GPT scores >= 0 and the same for a seed, the CLI
writes its files and refuses bad input in one line; only `FamilyModel.sequence_log_likelihood` is used."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Lattice, Structure

from engine.cli import main
from engine.crystal.canonical import translated
from engine.evaluate.ipt import ipt_table, load_structures, probe_model, run_probe, translations_for
from engine.models.checkpoint import save_checkpoint
from engine.models.crystallm import CrystaLLMGPT
from engine.models.family import SequenceScore
from engine.models.gpt import GPT, GPTConfig


def _structures() -> list[Structure]:
    return [
        Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        Structure(Lattice.orthorhombic(3.1, 4.2, 5.3), ["Ti", "O", "O"],
                  [[0.1, 0.2, 0.3], [0.4, 0.1, 0.7], [0.8, 0.6, 0.2]]),
        Structure(Lattice.hexagonal(3.2, 5.1), ["Zn", "S"], [[1 / 3, 2 / 3, 0.0], [1 / 3, 2 / 3, 0.375]]),
    ]


@pytest.fixture()
def cif_dir(tmp_path) -> Path:
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i, s in enumerate(_structures()):
        s.to(filename=str(folder / f"s{i}.cif"))
    return folder


class CoordinateBlind(CrystaLLMGPT):
    """A stand-in family whose log-likelihood ignores every number in the text (so coordinates cannot matter)."""

    def __init__(self) -> None:
        self.path = None

    def sequence_log_likelihood(self, texts):
        return [SequenceScore(-0.01 * len(re.sub(r"[0-9.\-]", "", t)), 10) for t in texts]


def _tiny_gpt(path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    return save_checkpoint(path, model=model, iter_num=1, best_val_loss=None, config={}, meta={"run": "tiny"})


def test_translation_moves_every_atom_and_keeps_the_crystal():
    s = _structures()[1]
    t = translated(s, np.array([0.5, 0.25, 0.9]))
    assert np.allclose((s.frac_coords + [0.5, 0.25, 0.9]) % 1.0, t.frac_coords)
    assert s.lattice == t.lattice and [x.specie for x in s] == [x.specie for x in t]


def test_a_translation_invariant_model_has_ipt_zero_and_a_tiny_gpt_has_ipt_at_least_zero(tmp_path):
    structures = [(f"s{i}", s) for i, s in enumerate(_structures())]
    cache: dict = {}  # both read canonical CIF text: the translated texts are written once
    rows, skipped = probe_model(CoordinateBlind(), "blind", structures, translations=4, seed=0, texts_cache=cache)
    assert not skipped and len(rows) == 3
    assert all(abs(r.ipt) < 1e-9 for r in rows), [r.ipt for r in rows]
    gpt = CrystaLLMGPT.load(_tiny_gpt(tmp_path / "tiny.pt"), "cpu")
    rows, _ = probe_model(gpt, "tiny", structures, translations=4, seed=0, texts_cache=cache)
    assert all(r.ipt >= 0 and math.isfinite(r.ppl_mean) for r in rows)
    assert any(r.ipt > 1e-6 for r in rows)  # a random GPT reads coordinates: translations change its perplexity
    again, _ = probe_model(gpt, "tiny", structures, translations=4, seed=0)  # texts written anew
    assert again == rows
    assert not np.allclose(translations_for(0, 1, 4), translations_for(1, 1, 4))


def test_cli_writes_rows_and_summary_and_the_compare_table_reads_them(tmp_path, cif_dir, capsys):
    ckpt = _tiny_gpt(tmp_path / "tiny.pt")
    out = tmp_path / "runs_ipt" / "probe1"
    assert main(["ipt", "--ckpt", str(ckpt), "--structures", str(cif_dir), "--translations", "3", "--n", "2",
                 "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    assert "IPT mean" in capsys.readouterr().out
    rows = pd.read_csv(out / "ipt.csv")
    assert len(rows) == 2 and (rows["ipt"] >= 0).all()
    summary = json.loads((out / "ipt_summary.json").read_text())
    (c,) = summary["checkpoints"]
    assert c["n_structures"] == 2 and c["family"] == "crystallm-gpt" and c["sha256"]
    assert c["ipt_mean"] == pytest.approx(rows["ipt"].mean())
    table = ipt_table(tmp_path / "runs_ipt")
    assert list(table["checkpoint"]) == ["tiny.pt"] and table["IPT mean"][0] == pytest.approx(c["ipt_mean"])


def test_structures_come_from_an_mp20_style_csv_by_a_seeded_choice(tmp_path):
    df = pd.DataFrame({"material_id": [f"m{i}" for i in range(3)], "cif": [s.to(fmt="cif") for s in _structures()]})
    df.loc[len(df)] = ["broken", "data_x\n_cell_length_a 1\n"]
    df.to_csv(tmp_path / "t.csv", index=False)
    got, bad = load_structures(tmp_path / "t.csv", 10, seed=0)
    assert [sid for sid, _ in got] == ["m0", "m1", "m2"] and [b["id"] for b in bad] == ["broken"]
    a, _ = load_structures(tmp_path / "t.csv", 2, seed=5)
    b, _ = load_structures(tmp_path / "t.csv", 2, seed=5)
    assert [x for x, _ in a] == [x for x, _ in b]


def test_bad_input_is_a_one_line_error_with_exit_2(tmp_path, cif_dir, capsys):
    ckpt = _tiny_gpt(tmp_path / "tiny.pt")
    (tmp_path / "nocif.csv").write_text("a,b\n1,2\n")
    for argv, expected in (
        (["--structures", str(tmp_path / "missing")], "does not exist"),
        (["--structures", str(tmp_path / "nocif.csv")], "has no 'cif' column"),
        (["--structures", str(cif_dir), "--translations", "1"], "at least 2 translations"),
    ):
        assert main(["ipt", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expected in err and "\n" not in err
    with pytest.raises(Exception, match="does not exist"):
        run_probe([tmp_path / "nope.pt"], cif_dir, out=tmp_path / "o2")

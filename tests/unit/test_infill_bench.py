"""Smoke run of bench/infill_recovery.py: two structures, a tiny model; the JSON carries every scorer's row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.models.checkpoint import save_checkpoint
from engine.models.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]


def test_the_recovery_benchmark_reports_top1_top5_for_each_scorer(tmp_path):
    cifs = [str(CifWriter(Structure(Lattice.orthorhombic(3.9, 4.1, 4.3 + i / 10), [a, b],
                                    [[0, 0, 0], [0.5, 0.5, 0.5]]))) for i, (a, b) in enumerate([("Na", "Cl"), ("Mg", "O")])]
    pd.DataFrame({"material_id": ["x-1", "x-2"], "cif": cifs}).to_csv(tmp_path / "t.csv", index=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "t.pt", model=GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=320)),
                           iter_num=0, best_val_loss=None, config={}, meta={})
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "infill_recovery.py"), "--csv", str(tmp_path / "t.csv"),
                           "--ckpt", str(ckpt), "--n", "2", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["scorer"]: r for r in result["rows"]}
    assert set(rows) == {"random", "pymatgen", "likelihood", "random (expected)"}
    assert all(rows[s]["n"] == 2 and 0 <= rows[s]["top1"] <= rows[s]["top5"] <= 1 for s in rows), rows
    assert rows["random (expected)"]["top1"] == 1 / 88
    assert {r["formula"] for r in result["per_structure"]} == {"NaCl", "MgO"} and result["skipped"] == []

"""A tiny but real lab for the dashboard tests: dataset, trained checkpoint, evaluated sample set, sweep and a
structure-prediction (CSP) run.

Everything is made by the engine's own functions on CPU in well under a minute: three rock-salt CIFs are
tokenized, a 2-layer model memorises them (60 steps), samples are drawn and evaluated, a two-prompt sweep runs,
and the CSP benchmark recalls the three structures. Memorising keeps the samples parseable, so 3D views and
validity tables have real content.
Built once per pytest session under the session's base temp folder (shared by tests/app and tests/e2e).
"""

from __future__ import annotations

import os
from pathlib import Path

from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

REPO_ROOT = Path(__file__).resolve().parents[2]
ROCK_SALTS = {"NaCl": ("Na", "Cl", 5.64), "KCl": ("K", "Cl", 6.29), "MgO": ("Mg", "O", 4.21)}
"""name -> (cation, anion, cubic cell length in Å) of the structures the tiny model memorises."""
CKPT = "train/tiny/ckpt/last.pt"
"""The tiny checkpoint, relative to the runs root."""
SWEEP_PROMPTS = ["Na4Cl4", "Mg4O4"]


def _write_cifs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (cation, anion, a) in ROCK_SALTS.items():
        s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])
        CifWriter(s).write_file(folder / f"{name}.cif")


def make_lab(base: Path, cache: Path) -> Path:
    """Build the lab under ``base`` (once: a completed lab is reused) and return its runs root."""
    runs = base / "runs"
    done = base / "lab.done"
    if done.exists():
        return runs
    import torch

    from engine.crystal.prompts import build_prompts
    from engine.data.datasets import build_dataset
    from engine.evaluate.csp import run_csp
    from engine.evaluate.evaluation import evaluate_sample_set
    from engine.evaluate.sweep_config import config_from_dict
    from engine.evaluate.sweeps import run_sweep
    from engine.sample.sample_sets import sample_to_dir
    from engine.train.config import load_config
    from engine.train.trainer import train

    old_env = {k: os.environ.get(k) for k in ("CRYSTALLAB_RUNS", "CRYSTALLAB_CACHE")}
    old_threads = torch.get_num_threads()
    os.environ["CRYSTALLAB_RUNS"], os.environ["CRYSTALLAB_CACHE"] = str(runs), str(cache)
    torch.set_num_threads(1)  # on a shared 2-core machine, one thread is several times faster than two
    try:
        _write_cifs(base / "cifs")
        build_dataset([str(base / "cifs")], runs / "data" / "tiny", workers=1, dedup=False, val_fraction=0.0)
        config = load_config(REPO_ROOT / "configs" / "tiny_cpu.yaml", [
            "dataset=tiny", "name=tiny", "max_iters=60", "eval_interval=30", "eval_iters=1", "log_interval=10",
            "warmup_iters=5", "batch_size=4", "learning_rate=3e-3", "min_lr_ratio=0.3", "dropout=0.0"])
        train(config, run_dir=runs / "train" / "tiny", progress=False)
        ckpt = runs / CKPT
        prompt = build_prompts("NaCl", z=4)[0]
        nacl = sample_to_dir(ckpt, prompt, runs / "samples" / "nacl", n=4, temperature=0.3,
                             max_new_tokens=300, device="cpu", evaluate=False)
        evaluate_sample_set(nacl, workers=1)
        sweep = config_from_dict({"name": "tiny", "checkpoints": {"tiny": CKPT}, "prompts": SWEEP_PROMPTS,
                                  "temperatures": [0.3], "n": [2], "seeds": [1], "max_new_tokens": 300,
                                  "device": "cpu", "eval_workers": 1})
        run_sweep(sweep, runs / "sweeps" / "tiny")
        run_csp(ckpt, base / "cifs", runs / "csp" / "rocksalts", k=2, temperature=0.0, max_new_tokens=400,
                device="cpu", workers=1)
    finally:
        torch.set_num_threads(old_threads)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    done.write_text("ok\n")
    return runs

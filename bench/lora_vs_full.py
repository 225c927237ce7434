"""LoRA against full fine-tuning of one base GPT on the seeds' two tasks (issue 16), small scale, on CPU.

Tasks: NaCl-10 (ten rock-salt cells, a = 5.50 ... 5.77 A, 9 train / 1 validation, as the seeds' experiment 1) and
a mixed set of 150 MP-20 training structures (seeded choice, 10 % validation). For each task, a full fine-tune and a
LoRA fine-tune (rank 8, alpha 32, attention + MLP projections) run the same number of steps from the same base;
each run is its own process so its peak resident memory (``ru_maxrss``) is its own. Reported: trainable
parameters, peak RSS (and the RSS before training: imports and data), step-0 and best validation loss, training
time, and validity / formula hit rate of samples from the best checkpoint (NaCl: prompt NaCl, Z=4; mixed: the cell
compositions of the last three chosen structures, as formula unit + Z).

    uv run python bench/lora_vs_full.py --base /work/artifacts/runs/train/demo_cpu/ckpt/best.pt --out /tmp/lora_bench

Prints one JSON line per run and a markdown table; writes ``results_<tasks>.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _nacl10(root: Path) -> tuple[Path, list[tuple[str, int]]]:
    from pymatgen.core import Lattice, Structure

    from engine.data.datasets import build_dataset

    cifs = root / "nacl10_cifs"
    cifs.mkdir(parents=True, exist_ok=True)
    for k in range(10):
        s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.50 + 0.03 * k), ["Na", "Cl"],
                                      [[0, 0, 0], [0.5, 0.5, 0.5]])
        s.to(filename=str(cifs / f"nacl_{k}.cif"))
    if not (root / "nacl10").exists():
        build_dataset([str(cifs)], root / "nacl10", val_fraction=0.1, dedup=False, workers=1)
    return root / "nacl10", [("NaCl", 4)]


def _mixed150(root: Path, mp20: Path, seed: int) -> tuple[Path, list[tuple[str, int]]]:
    import pandas as pd
    from pymatgen.core import Structure

    from engine.data.datasets import build_dataset

    df = pd.read_csv(mp20 / "train.csv")
    rows = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), size=150, replace=False))]
    cifs = root / "mixed150_cifs"
    cifs.mkdir(parents=True, exist_ok=True)
    for mid, cif in zip(rows["material_id"], rows["cif"]):
        (cifs / f"{mid}.cif").write_text(cif)
    if not (root / "mixed150").exists():
        build_dataset([str(cifs)], root / "mixed150", val_fraction=0.1, dedup=False, workers=1)
    last = [Structure.from_str(c, fmt="cif") for c in rows["cif"].iloc[-3:]]
    reduced = [s.composition.get_reduced_composition_and_factor() for s in last]
    return root / "mixed150", [(comp.reduced_formula, int(z)) for comp, z in reduced]


def run_one(spec: dict) -> dict:
    """One fine-tune + sampling, in this process (called as ``--one JSON``)."""
    import torch

    from engine.crystal.prompts import build_prompts
    from engine.lab.runs import RunFolder
    from engine.models.family import load_family_model, resolve_knobs
    from engine.sample.sample_sets import write_sample_set
    from engine.train.config import load_config
    from engine.train.trainer import train

    torch.set_num_threads(spec["threads"])
    sets = [f"dataset={spec['dataset']}", "init_from=finetune", f"init_ckpt={spec['base']}",
            f"max_iters={spec['steps']}", f"eval_interval={spec['steps']}", "eval_iters=4", "batch_size=8",
            "warmup_iters=5", "dropout=0.0", "device=cpu", "dtype=float32", f"cpu_threads={spec['threads']}",
            "log_interval=10", f"seed={spec['seed']}"]
    if spec["mode"] == "lora":
        sets += ["lora_rank=8", "lora_alpha=32", "learning_rate=1e-3"]
    else:
        sets += ["learning_rate=1e-4"]
    config = load_config(None, sets)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    t0 = time.perf_counter()
    run = train(config, run_dir=spec["run_dir"], progress=False)
    seconds = time.perf_counter() - t0
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = RunFolder(run).read_status()
    val = [r["loss"] for r in RunFolder(run).metrics() if r.get("split") == "val"]
    log = (run / "log.txt").read_text()
    trainable = next(line.split("trainable parameters: ")[1].split(";")[0] for line in log.splitlines()
                     if "trainable parameters: " in line)
    model = load_family_model(run / "ckpt" / "best.pt")
    knobs = resolve_knobs(type(model), {"temperature": 0.8, "top_k": 10, "max_new_tokens": 600})
    valid, hits, n = 0.0, 0.0, 0
    for i, (formula, z) in enumerate(spec["prompts"]):
        (prompt,) = build_prompts(formula, z)
        out = write_sample_set(model, prompt, run / "samples" / f"p{i}", n=spec["n"], knobs=knobs, seed=1,
                               batch_size=spec["n"], evaluate=True, progress=None)
        summary = json.loads((out / "eval_summary.json").read_text())
        valid += (summary["validity"]["value"] or 0.0) * spec["n"]
        hits += (summary["formula_hit_rate"]["value"] or 0.0) * spec["n"]
        n += spec["n"]
    return {"task": spec["task"], "mode": spec["mode"], "trainable": trainable, "rss_before_mib": round(rss_before),
            "rss_peak_train_mib": round(rss_train), "val_step0": round(val[0], 4), "val_best": status.get("best_val_loss"),
            "train_s": round(seconds, 1), "steps": spec["steps"], "valid": f"{valid:.0f}/{n}", "formula_hits": f"{hits:.0f}/{n}",
            "ckpt_bytes": (run / "ckpt" / "best.pt").stat().st_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="base checkpoint (a whole GPT)")
    p.add_argument("--out", type=Path, default=Path("/tmp/lora_bench"))
    p.add_argument("--mp20", type=Path, default=REPO.parent / "shared" / "data" / "mp20_subset")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n", type=int, default=6, help="samples per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="nacl10,mixed150", help="comma-separated: nacl10, mixed150")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    make = {"nacl10": lambda: _nacl10(args.out), "mixed150": lambda: _mixed150(args.out, args.mp20, args.seed)}
    tasks = {t: make[t]() for t in args.tasks.split(",")}
    results = []
    for task, (dataset, prompts) in tasks.items():
        for mode in ("full", "lora"):
            spec = {"task": task, "mode": mode, "dataset": str(dataset), "prompts": prompts, "base": str(args.base),
                    "steps": args.steps, "n": args.n, "threads": args.threads, "seed": args.seed,
                    "run_dir": str(args.out / f"{task}_{mode}")}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=REPO)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(line[len("RESULT "):]))
            print(json.dumps(results[-1]), flush=True)
    (args.out / f"results_{'_'.join(tasks)}.json").write_text(json.dumps(results, indent=2))
    cols = list(results[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does translation augmentation, and does model size, lower IPT? A 2 x 2 grid on MP-20 (issue 16, section 3).

Gruver et al. observe that larger models and translation augmentation give lower IPT (translation-invariance
probe). This script tests that shape with the lab's GPT on data the models are probed in distribution:

- two datasets built from the same MP-20 training CSV: plain, and with ``--augment`` randomly translated canonical
  copies of each training CIF (`engine.data.datasets.build_dataset(augment_translations=...)`); the validation
  CIFs are the same in both;
- two GPT sizes (``--small`` and ``--large``, ``n_layer/n_head/n_embd``), each trained from scratch on each dataset
  for the same ``--steps`` (same batch, window, schedule and seed: the same token budget; the augmented run sees
  more distinct texts, not more tokens);
- one IPT probe of all four best checkpoints on the same held-out MP-20 test structures and translations
  (`engine.evaluate.ipt.run_probe`).

Reported per model: parameters, final validation loss (on the shared, unaugmented validation CIFs), IPT mean and
median, and mean perplexity over the translated texts.

    uv run python bench/ipt_augmentation.py --steps 600 --n 30 --translations 5 --out runs/bench/ipt_augmentation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from engine.data.datasets import build_dataset  # noqa: E402
from engine.evaluate.ipt import run_probe  # noqa: E402
from engine.lab.runs import RunFolder  # noqa: E402
from engine.models.family import load_family_model  # noqa: E402
from engine.train.config import load_config  # noqa: E402
from engine.train.trainer import train  # noqa: E402

MP20 = REPO.parent / "shared" / "data" / "mp20_subset"


def _shape(text: str) -> list[str]:
    n_layer, n_head, n_embd = (int(x) for x in text.split("/"))
    return [f"n_layer={n_layer}", f"n_head={n_head}", f"n_embd={n_embd}"]


def _dataset(out: Path, source: Path, augment: int, workers: int) -> Path:
    if not (out / "train.bin").exists():
        build_dataset([source], out, val_fraction=0.1, workers=workers, augment_translations=augment)
    return out


def paired(ipt_csv: Path, pairs: list[tuple[str, str]], seed: int, draws: int = 5000) -> list[dict[str, Any]]:
    """Per-structure IPT differences ``b - a`` for each pair of checkpoint labels: mean, a bootstrap 95 %
    interval over structures, and how many structures got a lower IPT under ``b``."""
    import numpy as np
    import pandas as pd

    table = pd.read_csv(ipt_csv).pivot_table(index="structure_id", columns="checkpoint", values="ipt")
    rng = np.random.default_rng(seed)
    out = []
    for a, b in pairs:
        both = table[[a, b]].dropna()
        diff = (both[b] - both[a]).to_numpy()  # (structures,)
        boot = diff[rng.integers(len(diff), size=(draws, len(diff)))].mean(axis=1)  # (draws,)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out.append({"from": a, "to": b, "mean_diff": round(float(diff.mean()), 4), "ci95_low": round(float(lo), 4),
                    "ci95_high": round(float(hi), 4), "lower_under_to": int((diff < 0).sum()),
                    "structures": len(diff)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-csv", type=Path, default=MP20 / "train.csv")
    p.add_argument("--test-csv", type=Path, default=MP20 / "test.csv", help="held-out structures for the probe")
    p.add_argument("--augment", type=int, default=3, help="translated copies per training CIF (augmented arm)")
    p.add_argument("--small", default="2/2/128", help="n_layer/n_head/n_embd of the small model")
    p.add_argument("--large", default="4/4/192", help="n_layer/n_head/n_embd of the large model")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256, help="training window (scoring slides over longer texts)")
    p.add_argument("--n", type=int, default=30, help="test structures probed")
    p.add_argument("--translations", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes for building the datasets")
    p.add_argument("--out", type=Path, default=benchlib.default_out("ipt_augmentation").with_suffix(""))
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    info = benchlib.machine_info("cpu")
    out = args.out.resolve()
    data = {"plain": _dataset(out / "data" / "plain", args.train_csv, 0, args.workers),
            "augmented": _dataset(out / "data" / f"aug{args.augment}", args.train_csv, args.augment, args.workers)}
    common = [f"max_iters={args.steps}", f"eval_interval={max(1, args.steps // 3)}", f"batch_size={args.batch_size}",
              f"block_size={args.block_size}", "dropout=0.0", "device=cpu", "dtype=float32", "learning_rate=2e-3",
              f"warmup_iters={min(50, args.steps // 4)}", "eval_iters=8", "log_interval=50", f"seed={args.seed}",
              "cpu_threads=1", "preset=tiny"]
    models: dict[str, dict[str, Any]] = {}
    for size, shape in (("small", args.small), ("large", args.large)):
        for arm, ds in data.items():
            name = f"{size}-{arm}"
            run_dir = out / "train" / name
            t0 = time.perf_counter()
            if not (run_dir / "ckpt" / "best.pt").exists():
                train(load_config(None, [f"dataset={ds}", *_shape(shape), *common]), run_dir=run_dir, progress=False)
            val = [r for r in RunFolder(run_dir).metrics() if r.get("split") == "val"]
            models[name] = {"size": size, "shape": shape, "augmented": arm == "augmented",
                            "val_loss": val[-1]["loss"] if val else None, "train_s": round(time.perf_counter() - t0),
                            "ckpt": run_dir / "ckpt" / "best.pt"}
            print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in models[name].items()}), flush=True)
    summary = run_probe([m["ckpt"] for m in models.values()], args.test_csv, translations=args.translations, n=args.n,
                        seed=args.seed, out=out / "ipt")
    by_label = {c["label"]: c for c in summary["checkpoints"]}
    rows = []
    for name, m in models.items():
        c = by_label[f"{name}-best"]
        params = load_family_model(m["ckpt"], "cpu").describe()["n_params"]
        rows.append({"model": name, "params": params, "augmented": m["augmented"],
                     "val_loss": m["val_loss"], "ipt_mean": c["ipt_mean"], "ipt_median": c["ipt_median"],
                     "ppl_mean": c["ppl_mean"], "structures": c["n_structures"]})
    benchlib.print_table(rows, list(rows[0]), title=f"IPT on {args.n} MP-20 test structures x {args.translations} "
                                                    "translations")
    pairs = [("small-plain-best", "small-augmented-best"), ("large-plain-best", "large-augmented-best"),
             ("small-plain-best", "large-plain-best"), ("small-augmented-best", "large-augmented-best")]
    effects = paired(out / "ipt" / "ipt.csv", pairs, args.seed)
    benchlib.print_table(effects, list(effects[0]), title="paired IPT differences (to - from), bootstrap over "
                                                          "structures")
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows,
              "paired": effects,
              "datasets": {k: json.loads((v / "stats.json").read_text()).get("train_cifs") for k, v in data.items()},
              "machine": benchlib.finish(info)}
    benchlib.write_result(out / "ipt_augmentation.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

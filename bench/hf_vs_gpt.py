"""A tiny Hugging Face Llama (Gruver text) next to a lab GPT of the same size (CrystaLLM CIF text), on CPU.

Both train through the lab's trainer on the same token dataset of built-in corpus structures, with the same
optimizer steps, batch size and learning rate (the HF model fully fine-tuned from random weights, so the budget is
comparable; ``--lora`` trains it with Gruver's LoRA instead). Then each draws ``--n`` samples for one prompt
through the family seam (`engine.sample.sample_sets.sample_to_dir`), which post-processes and evaluates them.
Reported: parameters, wall time of the whole run (setup, evaluations, checkpoints included) and the step time of
the second half of training (batch 8), sampling samples/s and generated tokens/s (each model's own tokens), final validation loss (nats per own token: not comparable across tokenizers), and validity.

    uv run python bench/hf_vs_gpt.py --steps 150 --n 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from engine.crystal.prompts import build_prompts  # noqa: E402
from engine.lab.fsutil import read_jsonl  # noqa: E402
from engine.models.hf_tiny import build_tiny_model  # noqa: E402
from engine.sample.sample_sets import sample_to_dir  # noqa: E402
from engine.train.config import load_config  # noqa: E402
from engine.train.trainer import train  # noqa: E402


def build_data(root: Path, n: int) -> Path:
    from engine.data.corpus import corpus_cifs
    from engine.data.datasets import build_dataset

    cifs = root / "cifs"
    cifs.mkdir(parents=True)
    for name, text in corpus_cifs(n, 0):
        (cifs / f"{name}.cif").write_text(text, encoding="utf-8")
    build_dataset([str(cifs)], root / "data", val_fraction=0.1, dedup=False, workers=1)
    return root / "data"


def run_one(label: str, overrides: list[str], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    common = ["batch_size=8", f"max_iters={args.steps}", f"eval_interval={args.steps}", "eval_iters=4",
              f"log_interval={max(1, args.steps // 2)}", f"warmup_iters={min(10, args.steps)}", f"learning_rate={args.lr}",
              "dropout=0.0", "device=cpu", "dtype=float32", f"out_dir={root / label}"]
    t0 = time.perf_counter()
    run = train(load_config(None, [*overrides, *common]), progress=False)
    train_s = time.perf_counter() - t0
    metrics = list(read_jsonl(run / "metrics.jsonl"))
    logged = [r for r in metrics if r.get("split") == "train"]  # at steps/2 and steps: the second half is timed
    step_s = (logged[-1]["elapsed_s"] - logged[-2]["elapsed_s"]) / (logged[-1]["step"] - logged[-2]["step"])
    val = ([r for r in metrics if r.get("split") == "val"] or [{"loss": float("nan")}])[-1]
    ckpt = run / "ckpt" / ("best" if (run / "ckpt" / "best").is_dir() else "best.pt")
    prompt = build_prompts(args.formula, args.z)[0]
    t0 = time.perf_counter()
    out = sample_to_dir(ckpt, prompt, root / f"{label}-samples", n=args.n, temperature=1.0, top_k=None, top_p=0.9,
                        max_new_tokens=args.max_new_tokens, seed=1, batch_size=args.n, device="cpu",
                        evaluate=False)
    sample_s = time.perf_counter() - t0
    from engine.evaluate.evaluation import evaluate_sample_set

    evaluate_sample_set(out, workers=1)
    records = list(read_jsonl(out / "samples.jsonl"))
    import pandas as pd

    ev = pd.read_csv(out / "eval.csv")
    from engine.models.family import load_family_model

    n_params = load_family_model(ckpt).describe()["n_params"]
    return {
        "model": label, "params": n_params, "steps": args.steps, "train_s": round(train_s, 1),
        "step_s": round(step_s, 3),
        "val_loss": round(val["loss"], 3), "sample_s": round(sample_s, 1),
        "samples_per_s": round(args.n / sample_s, 3),
        "gen_tokens_per_s": round(sum(r["n_new_tokens"] for r in records) / sample_s, 1),
        "finished": sum(r["finished"] for r in records), "parsed": int(ev["parse_ok"].sum()),
        "valid": int(ev["is_valid"].fillna(False).astype(bool).sum()), "n": args.n,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--n", type=int, default=16, help="samples per model")
    p.add_argument("--structures", type=int, default=60, help="built-in corpus structures in the dataset")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lora", action="store_true", help="train the HF model with LoRA (Gruver's defaults)")
    p.add_argument("--formula", default="NaCl")
    p.add_argument("--z", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = benchlib.machine_info("cpu")
    with tempfile.TemporaryDirectory(prefix="hf-vs-gpt-") as tmp:
        root = Path(tmp)
        data = build_data(root, args.structures)
        hf = build_tiny_model(root / "tiny-llama", n_layer=args.n_layer, n_embd=args.n_embd, n_head=4)
        rows = [
            run_one("lab-gpt", [f"dataset={data}", f"n_layer={args.n_layer}", "n_head=4", f"n_embd={args.n_embd}",
                                "block_size=512"], root, args),
            run_one("hf-llama", [f"dataset={data}", "objective=hf-causal-lm", f"hf_model={hf}", "block_size=512",
                                 f"hf_lora_rank={8 if args.lora else 0}"], root, args),
        ]
    benchlib.print_table(rows, list(rows[0]), title="tiny HF Llama (Gruver text) vs lab GPT (CIF text), CPU")
    result = {"machine": benchlib.finish(info), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    benchlib.write_result(args.out or benchlib.default_out("hf_vs_gpt"), result)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPT vs masked diffusion initialised from it vs masked diffusion from scratch, at an equal token budget.

Three models of one shape train through the real trainer on one dataset, each for the same number of tokens
(``--steps`` optimizer steps x batch x window):

- ``gpt``: next-token objective, ``--steps`` steps from scratch;
- ``diff_from_ar``: a GPT trained ``--steps / 2`` steps, then turned into a masked-diffusion model
  (`engine.train.diffusion`, ``--variant``) and trained ``--steps / 2`` more;
- ``diff_scratch``: the masked-diffusion objective from scratch, ``--steps`` steps.

The headline table: each model samples ``--n`` CIFs per prompt through the lab's sample sets (same
post-processing and evaluation as the GPT; the GPT with its default knobs, the diffusion models at 64 denoising
steps without guidance), all at batch ``--batch``. The sweep: ``diff_from_ar`` samples ``--sweep-n`` CIFs of the
first prompt at every ``--diff-steps`` x ``--cfg`` setting. Reported per row: the final validation loss (the GPT's
NLL; the diffusion models' bound on it, nats/token, NOT comparable as a perplexity), validity, uniqueness among
valid, formula and space-group hit rates, and samples/s. The validation curves (``--curve-points`` evaluations per
model) go into the JSON.

    uv run python bench/diffusion_compare.py --steps 200 --n 16 --prompts Na4Cl4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from engine.crystal.prompts import cell_prompt  # noqa: E402
from engine.lab.runs import RunFolder  # noqa: E402
from engine.models.family import load_family_model, resolve_knobs  # noqa: E402
from engine.sample.sample_sets import write_sample_set  # noqa: E402
from engine.train.config import load_config  # noqa: E402
from engine.train.trainer import train  # noqa: E402


def _train(name: str, root: Path, common: list[str], more: list[str]) -> tuple[Path, dict[str, Any]]:
    run = root / name
    if RunFolder(run).read_status().get("state") != "completed":  # --reuse: a finished model is not retrained
        run = train(load_config(None, [*common, *more]), run_dir=run, progress=False)
    metrics = RunFolder(run).metrics()
    rows = [r for r in metrics if r.get("split") == "val"]
    last = rows[-1] if rows else {}
    curve = [[r["step"], round(r["loss"], 4)] for r in rows]
    elapsed = max((r.get("elapsed_s") or 0.0 for r in metrics), default=0.0)  # the run's own clock, also on reuse
    return run / "ckpt" / "last.pt", {"val_loss": last.get("loss"), "loss_kind": last.get("loss_kind"),
                                      "train_s": round(elapsed, 1), "curve": curve}


def _sample(ckpt: Path, prompt_text: str, knobs: dict, n: int, out: Path, seed: int, batch: int) -> dict[str, Any]:
    done = out / "config.json"
    if done.is_file() and (out / "eval_summary.json").is_file() and json.loads(done.read_text())["sampling"].get(
            "n") == n:  # --reuse: this set is already drawn and evaluated
        d = out
    else:
        shutil.rmtree(out, ignore_errors=True)
        model = load_family_model(ckpt, "cpu")
        resolved = resolve_knobs(type(model), knobs)
        d = write_sample_set(model, cell_prompt(prompt_text), out, n=n, knobs=resolved, seed=seed, batch_size=batch,
                             evaluate=True, progress=None)
    summary = json.loads((d / "eval_summary.json").read_text())
    config = json.loads((d / "config.json").read_text())
    pick = ("validity", "uniqueness_valid", "formula_hit_rate", "spacegroup_hit_rate", "parse_rate")
    metrics = summary.get("metrics", summary)
    values = {k: (v.get("value") if isinstance(v := metrics.get(k), dict) else v) for k in pick}
    return {**values, "samples_per_s": config.get("samples_per_s"),
            "canvas_length": config["sampling"].get("canvas_length")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="builtin", help="token dataset (default: the built-in corpus)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per model (the token budget)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=384)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="training batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--variant", default="shift", choices=("direct", "shift"))
    p.add_argument("--prompts", default="Na4Cl4", help="comma-separated cell compositions")
    p.add_argument("--n", type=int, default=16, help="samples per prompt and model (the headline table)")
    p.add_argument("--sweep-n", type=int, default=16, help="samples per steps x CFG setting (first prompt); 0: none")
    p.add_argument("--batch", type=int, default=16, help="sampling batch, the same for every model")
    p.add_argument("--curve-points", type=int, default=4, help="validation evaluations per model")
    p.add_argument("--diff-steps", type=benchlib.int_list, default=[16, 32, 64, 128])
    p.add_argument("--cfg", default="0,1.5", help="comma-separated guidance scales")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=benchlib.default_out("diffusion_compare"))
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--reuse", type=Path, default=None,
                   help="a kept folder of an earlier run with the same settings: finished models are not retrained "
                        "and finished sample sets (same n) are not redrawn")
    p.add_argument("--gpt-max-new-tokens", type=int, default=1024,
                   help="the GPT's sampling limit (a sample that never writes its end stops here)")
    args = p.parse_args()
    torch.set_num_threads(1)
    info = benchlib.machine_info("cpu")
    root = args.reuse.resolve() if args.reuse else Path(tempfile.mkdtemp(prefix="diffcmp-"))
    if args.reuse:
        for partial in (root / "samples").glob(".*.partial"):  # a killed run's unfinished set starts again
            shutil.rmtree(partial, ignore_errors=True)
        args.keep = True
    common = [f"dataset={args.dataset}", f"n_layer={args.n_layer}", f"n_head={args.n_head}", f"n_embd={args.n_embd}",
              f"block_size={args.block_size}", f"batch_size={args.batch_size}", "dropout=0.0", "device=cpu",
              "dtype=float32", f"learning_rate={args.lr}", f"warmup_iters={min(50, args.steps // 4)}", "eval_iters=4",
              "log_interval=20", f"seed={args.seed}", "preset=tiny", "cpu_threads=1"]
    half = max(1, args.steps // 2)

    def every(n_steps: int) -> str:
        return f"eval_interval={max(1, n_steps // max(1, args.curve_points))}"

    models: dict[str, dict[str, Any]] = {}
    try:
        ckpt, rec = _train("gpt", root, common, [f"max_iters={args.steps}", every(args.steps)])
        models["gpt"] = {"ckpt": ckpt, **rec}
        ar, rec_half = _train("gpt_half", root, common, [f"max_iters={half}", every(half)])
        ft = [c for c in common if not c.startswith(("n_layer", "n_head", "n_embd", "preset"))]
        ckpt, rec = _train("diff_from_ar", root, ft, [
            "init_from=finetune", f"init_ckpt={ar}", "objective=masked-diffusion", f"diffusion_variant={args.variant}",
            f"max_iters={args.steps - half}", every(args.steps - half)])
        models["diff_from_ar"] = {"ckpt": ckpt, **rec, "train_s": rec["train_s"] + rec_half["train_s"],
                                  "curve_ar_half": rec_half["curve"]}
        ckpt, rec = _train("diff_scratch", root, common, ["objective=masked-diffusion",
                                                          f"diffusion_variant={args.variant}",
                                                          f"max_iters={args.steps}", every(args.steps)])
        models["diff_scratch"] = {"ckpt": ckpt, **rec}
        rows, sweep = [], []
        prompts = [s.strip() for s in args.prompts.split(",") if s.strip()]

        def one(name: str, prompt: str, knobs: dict, n: int, into: list) -> None:
            m = models[name]
            tag = f"{name}-{prompt}-" + "-".join(f"{k}{v}" for k, v in knobs.items())
            res = _sample(m["ckpt"], prompt, knobs, n, root / "samples" / tag, args.seed, min(n, args.batch))
            into.append({"model": name, "prompt": prompt, "n": n, **knobs, "val_loss": m["val_loss"],
                         "loss_kind": m["loss_kind"], "train_s": m["train_s"], **res})
            print(json.dumps(into[-1]), flush=True)

        for prompt in prompts:
            for name in models:
                knobs = ({"max_new_tokens": args.gpt_max_new_tokens} if name == "gpt"
                         else {"steps": 64, "cfg_scale": 0.0})
                one(name, prompt, knobs, args.n, rows)
        cfgs = [float(c) for c in args.cfg.split(",") if c.strip()]
        for steps in args.diff_steps if args.sweep_n > 0 else []:  # --sweep-n 0: headline table only
            for w in cfgs:
                one("diff_from_ar", prompts[0], {"steps": steps, "cfg_scale": w}, args.sweep_n, sweep)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "tokens_per_model": args.steps * args.batch_size * args.block_size, "rows": rows, "sweep": sweep,
              "curves": {name: {k: v for k, v in m.items() if k.startswith("curve")} for name, m in models.items()},
              "machine": benchlib.finish(info)}
    cols = ["model", "prompt", "n", "steps", "cfg_scale", "val_loss", "loss_kind", "parse_rate", "validity",
            "uniqueness_valid", "formula_hit_rate", "spacegroup_hit_rate", "samples_per_s"]
    benchlib.print_table(rows, cols, title="models at an equal token budget")
    if sweep:
        benchlib.print_table(sweep, cols, title=f"diff_from_ar: denoising steps x CFG, {prompts[0]}")
    for name, m in models.items():
        print(name, "val curve (step, loss):", m["curve"])
    benchlib.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

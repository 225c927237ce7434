"""Scored decoding against plain sampling (issue 17): the same checkpoint, prompts and number of completed CIFs.

For each prompt, plain sampling draws ``--budget`` samples and MCTS runs ``--budget`` simulations with one rollout
each (one completed text per simulation), both at the same temperature / top-k / seed. Every text of both methods
goes through the same judge (`engine.sample.mcts.CrystalJudge`: post-processing, CrystaLLM validity, distinct
crystals by `SAME_CRYSTAL`, the scorer once per distinct crystal), with the same scorer: E_hull against ``--hull``
(single-point CHGNet energies, MP2020 footing) or, without a hull, energy per atom. Reported per method and prompt:
validity (valid texts / texts), uniqueness (distinct valid crystals / valid texts), mean score over the distinct
valid crystals, the metastable share (E_hull <= 0.1 eV/atom among distinct valid crystals; E_hull scorer only),
the best score, wall time (generation + judging + scoring) and simulations (or samples) per second.

Usage::

    uv run python bench/mcts_vs_sampling.py --ckpt runs/train/demo_cpu/ckpt/best.pt --hull bench-mcts \
        --prompts Na4Cl4,Mg4O4 --budget 16 --out bench/results/mcts_vs_sampling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.crystal.prompts import build_prompts  # noqa: E402
from engine.evaluate.scorers import load_scorer  # noqa: E402
from engine.models.crystallm import CrystaLLMGPT  # noqa: E402
from engine.models.family import load_family_model, resolve_knobs  # noqa: E402
from engine.sample.mcts import CrystalJudge, mcts_search  # noqa: E402
from engine.sample.mcts_tree import MCTSConfig  # noqa: E402

METASTABLE_EV = 0.1


def _metrics(verdicts: list[dict], judge: CrystalJudge, elapsed: float, n: int, ehull: bool) -> dict:
    valid = [v for v in verdicts if v["status"] in ("rewarded", "score_failed")]
    keys = {v["key"] for v in valid}
    scores = [judge.scores[k]["score"] for k in keys if judge.scores[k]["score"] is not None]
    return {
        "texts": len(verdicts), "validity": len(valid) / len(verdicts) if verdicts else None,
        "uniqueness": len(keys) / len(valid) if valid else None, "distinct_valid": len(keys),
        "mean_score_distinct": statistics.fmean(scores) if scores else None,
        "best_score": min(scores) if scores else None,
        "metastable_share": (sum(s <= METASTABLE_EV for s in scores) / len(scores)) if ehull and scores else None,
        "reasons": dict(Counter(v["reason"] or v["status"] for v in verdicts)),
        "scorer_calls": judge.scorer_calls, "elapsed_s": round(elapsed, 2), "per_s": round(n / elapsed, 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--prompts", default="Na4Cl4,Mg4O4", help="comma-separated cell compositions")
    ap.add_argument("--budget", type=int, default=16, help="completed texts per method and prompt")
    ap.add_argument("--hull", default=None, help="hull for the ehull scorer (else: energy per atom)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=600)
    ap.add_argument("--c", type=float, default=MCTSConfig.c)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_family_model(args.ckpt, "cpu")
    knobs = resolve_knobs(CrystaLLMGPT, {"temperature": args.temperature, "top_k": args.top_k,
                                          "max_new_tokens": args.max_new_tokens})
    scorer = load_scorer("ehull" if args.hull else "energy", hull=args.hull, device="cpu")
    config = MCTSConfig(simulations=args.budget, c=args.c, seed=args.seed)
    results = {"scorer": scorer.describe(), "knobs": knobs, "mcts": config.as_dict(), "prompts": {}}
    for spec in args.prompts.split(","):
        prompt = build_prompts(spec.strip())[0]
        scorer.check_prompt(prompt.elements)
        t0 = time.perf_counter()
        gens = model.generate(prompt, args.budget, knobs, seed=args.seed, batch_size=args.budget)
        judge = CrystalJudge(scorer, prompt, config)
        plain = [judge.judge(g.text, g.finished) for g in gens]
        plain_m = _metrics(plain, judge, time.perf_counter() - t0, args.budget, bool(args.hull))
        t0 = time.perf_counter()
        result = mcts_search(model, prompt, scorer, config, knobs)
        mcts_m = _metrics(result.records, result.judge, time.perf_counter() - t0, args.budget, bool(args.hull))
        results["prompts"][prompt.label] = {"plain": plain_m, "mcts": mcts_m}
        for name, m in (("plain", plain_m), ("mcts", mcts_m)):
            print(f"{prompt.label:8s} {name:5s} validity {m['validity']:.2f} uniqueness "
                  f"{m['uniqueness'] if m['uniqueness'] is None else round(m['uniqueness'], 2)} distinct "
                  f"{m['distinct_valid']} mean {scorer.name} {m['mean_score_distinct']} best {m['best_score']} "
                  f"metastable {m['metastable_share']} scorer calls {m['scorer_calls']} {m['elapsed_s']} s "
                  f"({m['per_s']} /s) {m['reasons']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Element-infill recovery on real structures: hide one element of each structure and ask where it ranks.

For each of ``--n`` structures of a CSV with a ``cif`` column (default: the MP-20 subset's test split), drawn with
``--seed``, one of its elements is hidden (seeded choice) and the vocabulary's elements (minus the structure's
other elements) are ranked as replacements by

- ``likelihood``: ``--ckpt``'s log-likelihood of the canonical CIF rewritten with each candidate
  (`engine.sample.infill.rank_replacements`, Gruver et al.'s way);
- ``diffusion``: ``--diffusion-ckpt``'s masked prediction (only when given);
- ``random``: a seeded uniform permutation of the candidates (expected top-k = k / candidates);
- ``pymatgen``: pymatgen's data-mined ion statistics (Hautier et al. 2011, `SubstitutionProbability`). The
  hidden element is unknown, so its pair substitution probabilities cannot be used; a candidate scores the best
  charge-neutral assignment of oxidation states (candidate's and the other elements') weighted by the data-mined
  prior probability of each ion, ``max prod_i p(ion_i)``. Candidates with no neutral assignment share the last
  places in a seeded random order.

Reports top-1 / top-5 recovery (share of structures whose hidden element ranks first / in the first five) and the
mean rank. Usage::

    python bench/infill_recovery.py --ckpt runs/train/demo_cpu/ckpt/best.pt --n 50
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import default_out, finish, machine_info, print_table, write_result  # noqa: E402

from engine.crystal.substitution import candidate_elements  # noqa: E402
from engine.lab.errors import CrystallabError  # noqa: E402
from engine.models.family import load_family_model, provenance  # noqa: E402
from engine.sample.infill import rank_replacements, read_structure  # noqa: E402

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "mp20_subset" / "test.csv"


class IonPrior:
    """pymatgen's data-mined ion probabilities, used to rank elements for a hidden site under charge balance."""

    def __init__(self) -> None:
        from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability

        self.sp = SubstitutionProbability()
        self.states: dict[str, list[tuple[int, float]]] = {}
        for species in self.sp.species:
            symbol = species.element.symbol
            self.states.setdefault(symbol, []).append((int(species.oxi_state), float(self.sp.get_px(species))))

    def log_score(self, counts: dict[str, float], hidden: str, candidate: str) -> float:
        """log of the best prod p(ion) over charge-neutral assignments with ``candidate`` on the hidden sites;
        -inf when none is neutral."""
        others = [el for el in counts if el != hidden]
        best = -math.inf
        choices = [self.states.get(el, []) for el in others]
        for q_c, p_c in self.states.get(candidate, []):
            for combo in itertools.product(*choices):
                charge = q_c * counts[hidden] + sum(q * counts[el] for (q, _), el in zip(combo, others))
                if abs(charge) < 1e-6:
                    best = max(best, math.log(p_c) + sum(math.log(p) for _, p in combo))
        return best


def _rank(order: list[str], hidden: str) -> int:
    return order.index(hidden) + 1


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    table = pd.read_csv(args.csv)
    rng = random.Random(args.seed)
    picks = rng.sample(range(len(table)), min(args.n, len(table)))
    gpt = load_family_model(args.ckpt) if args.ckpt else None
    diffusion = load_family_model(args.diffusion_ckpt) if args.diffusion_ckpt else None
    prior = IonPrior()
    scorers = ["random", "pymatgen"] + (["likelihood"] if gpt else []) + (["diffusion"] if diffusion else [])
    ranks: dict[str, list[int]] = {s: [] for s in scorers}
    skipped, n_candidates, per_row = [], [], []
    seconds = {s: 0.0 for s in scorers}
    for row in picks:
        label = str(table.iloc[row].get("material_id", row))
        try:
            structure = read_structure(table.iloc[row]["cif"], label)
            hidden = rng.choice(sorted(el.symbol for el in structure.composition.elements))
            candidates = candidate_elements(structure, hidden)
        except CrystallabError as exc:
            skipped.append({"row": row, "reason": str(exc)})
            continue
        n_candidates.append(len(candidates))
        record = {"id": label, "formula": structure.composition.reduced_formula, "hidden": hidden}
        t = time.perf_counter()
        ranks["random"].append(_rank(rng.sample(candidates, len(candidates)), hidden))
        seconds["random"] += time.perf_counter() - t
        t = time.perf_counter()
        counts = structure.composition.get_el_amt_dict()
        tiebreak = {c: rng.random() for c in candidates}
        scored = {c: prior.log_score(counts, hidden, c) for c in candidates}
        ranks["pymatgen"].append(_rank(sorted(candidates, key=lambda c: (-scored[c], tiebreak[c])), hidden))
        seconds["pymatgen"] += time.perf_counter() - t
        for name, model in (("likelihood", gpt), ("diffusion", diffusion)):
            if model is None:
                continue
            t = time.perf_counter()
            try:
                result = rank_replacements(structure, hidden, model, scorer=name, label=label)
            except CrystallabError as exc:
                skipped.append({"row": row, "scorer": name, "reason": str(exc)})
                continue
            ranks[name].append(result.rank_of(hidden))
            seconds[name] += time.perf_counter() - t
        record.update({s: ranks[s][-1] for s in scorers if len(ranks[s]) == len(n_candidates)})
        per_row.append(record)
        print(f"{len(per_row):>4} {label:<12} {record['formula']:<14} hide {hidden:<3} "
              + " ".join(f"{s} {record.get(s, '-')}" for s in scorers), flush=True)
    rows = []
    for s in scorers:
        r = ranks[s]
        rows.append({"scorer": s, "n": len(r), "top1": sum(x == 1 for x in r) / len(r) if r else None,
                     "top5": sum(x <= 5 for x in r) / len(r) if r else None,
                     "mean_rank": sum(r) / len(r) if r else None, "s_per_structure": seconds[s] / max(len(r), 1)})
    mean_c = sum(n_candidates) / max(len(n_candidates), 1)
    rows.append({"scorer": "random (expected)", "n": len(n_candidates),
                 "top1": sum(1 / c for c in n_candidates) / max(len(n_candidates), 1),
                 "top5": sum(min(5, c) / c for c in n_candidates) / max(len(n_candidates), 1),
                 "mean_rank": sum((c + 1) / 2 for c in n_candidates) / max(len(n_candidates), 1)})
    return {"machine": None, "csv": str(args.csv), "n": args.n,
            "seed": args.seed, "mean_candidates": mean_c, "rows": rows, "per_structure": per_row,
            "skipped": skipped, "likelihood_ckpt": provenance(gpt) if gpt else None,
            "diffusion_ckpt": provenance(diffusion) if diffusion else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="CSV with a 'cif' column (default MP-20 test)")
    p.add_argument("--ckpt", default=None, help="checkpoint for the likelihood scorer (any family)")
    p.add_argument("--diffusion-ckpt", default=None, help="masked-diffusion checkpoint for the diffusion scorer")
    p.add_argument("--n", type=int, default=50, help="structures (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the structure and hidden-element draws")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default runs/bench/infill_recovery.json)")
    args = p.parse_args(argv)
    info = machine_info("cpu")
    result = run(args)
    result["machine"] = finish(info)
    print_table(result["rows"], ["scorer", "n", "top1", "top5", "mean_rank", "s_per_structure"],
                title=f"infill recovery, {args.n} structures of {args.csv.name}, "
                f"{result['mean_candidates']:.1f} candidates each on average")
    write_result(args.out or default_out("infill_recovery"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

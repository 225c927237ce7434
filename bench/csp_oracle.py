"""Benchmark of the CSP scorer with an oracle: every target "generates" its own canonical CIF.

For each target of a test set (a CSV with a ``cif`` column), the text a perfect model would write for the target's
prompt is its canonical model view (``engine.crystal.canonical``). Scoring those texts against the targets
(`engine.evaluate.csp.score_candidate` on the killable worker pool, the path `crystallab csp` takes) measures:

- the oracle's match rate and RMSE, i.e. the ceiling of the benchmark under its validity filter (targets that fail
  SMACT can never be found, nor can the few whose 4-decimal canonical text parses into near-duplicate sites on
  special positions) and the RMSE floor left by that rounding;
- scoring throughput (samples/s) with 1 and with N worker processes.

    uv run python bench/csp_oracle.py --targets ../shared/data/mp20_subset/test.csv --workers 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchlib import default_out, finish, machine_info, print_table, write_result

from engine.crystal.canonical import canonicalize, model_view
from engine.evaluate.csp import load_targets, score_candidate
from engine.evaluate.evaluation import run_pool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_targets = Path(__file__).resolve().parents[2] / "shared" / "data" / "mp20_subset" / "test.csv"
    parser.add_argument("--targets", default=str(default_targets),
                        help="test set: a CSV with a 'cif' column (default ../shared/data/mp20_subset/test.csv)")
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many targets")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the parallel run (default 2)")
    parser.add_argument("--timeout", type=float, default=30.0, help="time box per sample, s (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default <runs>/bench/csp_oracle.json)")
    args = parser.parse_args(argv)
    info = machine_info("cpu")

    start = time.perf_counter()
    targets, rejects = load_targets(args.targets, limit=args.limit)
    load_s = time.perf_counter() - start
    texts = [model_view(canonicalize(t.cif)) for t in targets]
    tasks = [(i, text, t.cif, 500) for i, (t, text) in enumerate(zip(targets, texts))]
    runs = []
    for workers in sorted({1, args.workers}):
        start = time.perf_counter()
        rows = run_pool(score_candidate, tasks, workers, args.timeout)
        seconds = time.perf_counter() - start
        runs.append({"workers": workers, "seconds": round(seconds, 2), "samples_per_s": round(len(tasks) / seconds, 2)})
    matched = [r for r in rows if r["matched"]]
    not_found = [(t.name, r) for t, r in zip(targets, rows) if not r["matched"]]
    reasons: dict[str, int] = {}
    for _, r in not_found:
        why = r["failure_reason"] or ("smact" if r["struct_valid"] and r["comp_valid"] is False else
                                      "smact_undecided" if r["comp_valid"] is None else
                                      "structural" if not r["struct_valid"] else "no_match")
        reasons[why] = reasons.get(why, 0) + 1
    # Targets that pass the filter as given but not as the text a model writes: the rounding's cost, by name.
    lost = [{"name": t.name, "cell_formula": t.cell_formula, "spacegroup": t.spacegroup, "sites_given": t.n_sites,
             "sites_parsed": r["n_sites"], "struct_valid": r["struct_valid"], "comp_valid": r["comp_valid"]}
            for t, r in zip(targets, rows) if t.target_valid and not r["matched"]]
    result = {
        "machine": finish(info),
        "targets_source": str(Path(args.targets).resolve()),
        "n_targets": len(targets),
        "n_rejected": len(rejects),
        "load_s": round(load_s, 2),
        "oracle_match_rate": len(matched) / len(targets),
        "oracle_rmse": statistics.fmean(r["rms"] for r in matched) if matched else None,
        "oracle_rms_max": max((r["rms"] for r in matched), default=None),
        "target_valid_rate": sum(t.target_valid for t in targets) / len(targets),
        "not_found_reasons": reasons,
        "valid_targets_not_found": lost,
        "runs": runs,
    }
    print(f"{len(targets)} targets ({len(rejects)} rejected) from {args.targets}, loaded in {load_s:.1f} s")
    print(f"oracle match rate {result['oracle_match_rate']:.3f} (targets passing the CDVAE filter: "
          f"{result['target_valid_rate']:.3f}); oracle RMSE {result['oracle_rmse']}; not found: {reasons}")
    if lost:
        print_table(lost, list(lost[0]), title="valid targets the oracle's text does not find")
    print_table(runs, ["workers", "seconds", "samples_per_s"], title="scoring throughput")
    write_result(args.out or default_out("csp_oracle"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

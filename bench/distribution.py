"""Benchmark of the distribution metrics: MP-20 training rows against test rows (the "Train" row of CDVAE's table).

Treats a seeded random subset of the training rows as if it were a generated set and computes COV-R / COV-P (CDVAE
definitions, `engine.evaluate.distribution`) and the Wasserstein distances of density and number of elements
against a seeded random subset of the test rows; the Wasserstein distances are also computed on every row of both
files (they need no fingerprint). CrystalNN fingerprints cost about 0.2-1 s per structure, so the default subsets
(150 / 150) finish in a few minutes on 2 shared cores. Fingerprints are not cached here (``--cache`` to reuse).

    uv run python bench/distribution.py --n-train 150 --n-test 150 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from engine.evaluate import distribution as D  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mp20_subset"


def _all_values(ref: D.Reference) -> tuple[list[float], list[int]]:
    from engine.evaluate.metrics import _load_cif

    density, n_el = [], []
    for cif in ref.cifs:
        s = _load_cif(cif)
        if s is not None:
            density.append(float(s.density))
            n_el.append(len(s.composition.elements))
    return density, n_el


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=SHARED / "train.csv", help="CSV with a cif column")
    parser.add_argument("--test", type=Path, default=SHARED / "test.csv", help="CSV with a cif column")
    parser.add_argument("--n-train", type=int, default=150, help="training rows fingerprinted (seeded subset)")
    parser.add_argument("--n-test", type=int, default=150, help="test rows fingerprinted (seeded subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cutoffs", default="mp20", help="COV cutoffs preset or STRUCT,COMP (default mp20)")
    parser.add_argument("--no-full-wdist", action="store_true", help="skip the Wasserstein distances on all rows")
    parser.add_argument("--cache", action="store_true", help="reuse cached fingerprints (timing then meaningless)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default <runs>/bench/distribution.json)")
    args = parser.parse_args(argv)

    info = benchlib.machine_info()
    train = D.load_reference(args.train, limit=args.n_train, seed=args.seed)
    test = D.load_reference(args.test, limit=args.n_test, seed=args.seed + 1)
    t0 = time.perf_counter()
    train_fp = D.reference_fingerprints(train, workers=args.workers, cache=args.cache)
    test_fp = D.reference_fingerprints(test, workers=args.workers, cache=args.cache)
    fp_s = time.perf_counter() - t0
    m = D.distribution_metrics(train_fp, test_fp, reference_label=test.label, cutoffs=args.cutoffs)
    row = {"set": f"train subset ({len(train.cifs)}) vs test subset ({len(test.cifs)})",
           **{k: m[k]["value"] for k in ("cov_recall", "cov_precision", "wdist_density", "wdist_n_elements",
                                         "diversity_struct", "diversity_comp")}}
    rows = [row]
    if not args.no_full_wdist:
        full_train, full_test = D.load_reference(args.train), D.load_reference(args.test)
        (d_tr, n_tr), (d_te, n_te) = _all_values(full_train), _all_values(full_test)
        rows.append({"set": f"all train ({len(d_tr)}) vs all test ({len(d_te)})",
                     "wdist_density": D.wasserstein(d_tr, d_te), "wdist_n_elements": D.wasserstein(n_tr, n_te)})
    n_fp = len(train_fp) + len(test_fp)
    benchlib.print_table(rows, ["set", "cov_recall", "cov_precision", "wdist_density", "wdist_n_elements",
                       "diversity_struct", "diversity_comp"], title="MP-20 train against test (CDVAE definitions)")
    print(f"\nfingerprints: {n_fp} structures in {fp_s:.1f} s ({fp_s / n_fp:.2f} s each, {args.workers} workers); "
          f"failed: {int((~train_fp.ok).sum() + (~test_fp.ok).sum())}; cutoffs {m['cov_cutoffs']['value']}; "
          f"{m['scaler']['value']}")
    result = {"machine": benchlib.finish(info), "rows": rows, "fingerprint_seconds": fp_s, "n_fingerprinted": n_fp,
              "cutoffs": m["cov_cutoffs"]["value"], "scaler": m["scaler"]["value"],
              "train_label": train.label, "test_label": test.label}
    benchlib.write_result(args.out or benchlib.default_out("distribution"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

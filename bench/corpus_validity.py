"""Benchmark of the built-in corpus: generation time and CrystaLLM validity of its structures.

Generates the corpus (`engine.data.corpus.generate_structures`), then sends a seeded random sample of it (or all of it)
through the same path a generated text takes: canonical model view (`engine.crystal.canonical`), post-processing
(`engine.crystal.postprocess`) and the CrystaLLM checks (`engine.evaluate.checks.check_cif`). Prints a per-family table and writes
the figures as JSON.

    uv run python bench/corpus_validity.py --corpus-n 5000 --check-n 1000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from pymatgen.core import Structure

from engine.crystal.canonical import structure_to_model_view
from engine.crystal.postprocess import postprocess
from engine.data.corpus import families, generate_structures
from engine.evaluate.checks import check_cif
from engine.lab.fsutil import atomic_write_json
from engine.lab.settings import get_settings


def check_structure(structure: Structure) -> dict:
    """CrystaLLM check row of one structure, after canonicalization and post-processing like a generated text."""
    result = postprocess(structure_to_model_view(structure))
    if result.cif is None:
        return {"is_valid": False, "failure_reason": f"postprocess:{result.reason}"}
    return check_cif(result.cif)


def _why(row: dict) -> str:
    """Short label of the first failed check."""
    if row.get("failure_reason"):
        return row["failure_reason"]
    for key in ("formula_consistent", "multiplicity_consistent", "space_group_consistent"):
        if not row.get(key):
            return key
    return "bond_length_score"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-n", type=int, default=5000, help="structures to generate (timed); default 5000")
    parser.add_argument("--check-n", type=int, default=1000,
                        help="structures to check, a seeded random sample of the generated ones; 0 = all")
    parser.add_argument("--per-family", type=int, default=0,
                        help="instead of --check-n: check this many structures of every family (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--sample-seed", type=int, default=1, help="seed of the sample that is checked")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default <runs>/bench/corpus_validity.json)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    corpus = generate_structures(args.corpus_n, args.seed)
    gen_s = time.perf_counter() - start
    print(f"generated {len(corpus)} structures in {gen_s:.1f} s ({len(families())} families)")

    rng = random.Random(args.sample_seed)
    if args.per_family > 0:
        by_family: dict[str, list] = defaultdict(list)
        for item in corpus:
            by_family[item[0].split("-", 1)[0]].append(item)
        sample = [x for f in families() for x in rng.sample(by_family[f], min(args.per_family, len(by_family[f])))]
    elif args.check_n > 0:
        sample = rng.sample(corpus, min(args.check_n, len(corpus)))
    else:
        sample = corpus
    per_family: dict[str, Counter] = defaultdict(Counter)
    failures = []
    start = time.perf_counter()
    for sid, structure in sample:
        family = sid.split("-", 1)[0]
        row = check_structure(structure)
        per_family[family]["n"] += 1
        if row["is_valid"]:
            per_family[family]["valid"] += 1
        else:
            why = _why(row)
            per_family[family][why] += 1
            failures.append({"id": sid, "why": why, "bond_length_score": row.get("bond_length_score"),
                             "stated": row.get("stated_spacegroup"), "found": row.get("spacegroup")})
    check_s = time.perf_counter() - start

    total = sum(c["n"] for c in per_family.values())
    valid = sum(c["valid"] for c in per_family.values())
    print(f"\n{'family':<14}{'checked':>8}{'valid':>7}{'rate':>8}  failures")
    for family in families():
        c = per_family.get(family, Counter())
        why = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("n", "valid"))
        rate = c["valid"] / c["n"] if c["n"] else float("nan")
        print(f"{family:<14}{c['n']:>8}{c['valid']:>7}{rate:>8.1%}  {why}")
    print(f"{'all':<14}{total:>8}{valid:>7}{valid / max(total, 1):>8.1%}   (checked in {check_s:.0f} s)")

    out = args.out or get_settings().runs_dir / "bench" / "corpus_validity.json"
    atomic_write_json(out, {
        "corpus_n": len(corpus), "seed": args.seed, "generation_s": round(gen_s, 2),
        "checked": total, "valid": valid, "valid_rate": valid / max(total, 1), "sample_seed": args.sample_seed,
        "check_s": round(check_s, 1), "per_family": {f: dict(c) for f, c in per_family.items()},
        "failures": failures,
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

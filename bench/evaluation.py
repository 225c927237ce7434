"""Evaluation throughput: ``engine.evaluate.evaluation.evaluate_texts`` in parallel against one process, and a per-check profile.

Inputs are generated-looking texts: by default the model view (what a trained model writes) of the first
``--n`` CIFs of the shared MP-20 training subset, which a well-trained model's samples resemble (most parse and
pass); ``--source`` can instead name another CSV with a ``cif`` column, ``builtin`` (the generated corpus) or a
sample-set folder (its ``raw/*.txt``, real model output). Preparing the texts is not timed.

Timed, on the same texts:

- single process: ``evaluate_texts(workers=1, timeout_s=None)``, every check in this process;
- parallel: ``evaluate_texts(workers=--workers, timeout_s=--timeout)``, the path ``crystallab evaluate`` takes;
  the two alternate over ``--rounds`` chunks of the texts so that load from other processes hits both alike,
  and their CPU seconds per CIF are recorded next to the wall-clock rates;
- ``set_metrics`` (uniqueness: re-parse plus StructureMatcher grouping, single process, after the checks);
- a per-check profile of ``--profile-n`` texts: post-processing, text checks, parse, symmetry, bond-length
  score, CDVAE structure, SMACT and token count, timed one by one the way `engine.evaluate.checks.check_cif` runs them.

The two tables must agree cell for cell (``identical_verdicts``); differences are listed.

    uv run python bench/evaluation.py --n 1000 --workers 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from engine.crystal.postprocess import find_truncation, postprocess  # noqa: E402
from engine.crystal.tokenizer import encode  # noqa: E402
from engine.evaluate.checks import (  # noqa: E402
    VOLUME_PER_ATOM,
    bond_length_score,
    cdvae_struct_valid,
    detect_spacegroup,
    parse_structure,
    smact_valid,
    text_checks,
)
from engine.evaluate.evaluation import COLUMNS, evaluate_one, evaluate_texts, set_metrics  # noqa: E402
from engine.lab.errors import InputError  # noqa: E402
from engine.lab.settings import REPO_ROOT  # noqa: E402

DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "mp20_subset" / "train.csv"
STAGES = ("postprocess", "text_checks", "parse", "symmetry", "bond_length", "cdvae_struct", "smact", "token_count")


def load_texts(source: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Up to ``n`` ``(name, generated-looking text)`` pairs from a CSV, ``builtin`` or a sample-set folder."""
    from engine.crystal.canonical import canonicalize, model_view, structure_to_model_view

    path = Path(source).expanduser()
    if source == "builtin":
        from engine.data.corpus import generate_structures

        return [(sid, structure_to_model_view(s)) for sid, s in generate_structures(n, seed)]
    if path.is_dir():
        files = sorted((path / "raw").glob("*.txt"))[:n]
        if not files:
            raise SystemExit(f"{path} has no raw/*.txt: give a sample-set folder, a CSV or 'builtin'")
        return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if not path.is_file():
        raise SystemExit(f"--source {source} is neither 'builtin', a CSV with a cif column nor a sample-set folder")
    frame = pd.read_csv(path, usecols=lambda c: c in ("cif", "material_id"))
    items = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, cif in enumerate(frame["cif"]):
            if len(items) == n:
                break
            try:
                items.append((str(frame["material_id"].iloc[i]) if "material_id" in frame else f"row{i}",
                              model_view(canonicalize(cif))))
            except InputError:  # disordered or out-of-vocabulary rows cannot be model output
                continue
    return items


def _cells(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with every missing value (None, NaN) as None, so tables compare cell by cell."""
    return [{k: (None if pd.isna(v) else v) if not isinstance(v, (list, dict)) else v for k, v in row.items()}
            for row in df.loc[:, list(COLUMNS)].astype(object).to_dict("records")]


def compare_tables(a: pd.DataFrame, b: pd.DataFrame) -> list[dict[str, Any]]:
    """Cells that differ between two evaluation tables of the same items: ``[{file, column, a, b}]``."""
    diffs = []
    for ra, rb in zip(_cells(a), _cells(b)):
        for column in COLUMNS:
            if ra[column] != rb[column]:
                diffs.append({"file": ra["file"], "column": column, "a": str(ra[column])[:80],
                              "b": str(rb[column])[:80]})
    return diffs


def profile_checks(texts: list[str], max_sites: int = 500) -> dict[str, Any]:
    """Seconds spent in each check over ``texts``, run in the order and under the guards of ``check_cif``."""
    totals = dict.fromkeys(STAGES, 0.0)
    counts = dict.fromkeys(STAGES, 0)

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        totals[stage] += time.perf_counter() - t0
        counts[stage] += 1
        return value

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in texts:
            timed("token_count", encode, text)
            result = timed("postprocess", postprocess, text)
            cif = result.cif if result.cif is not None else text
            timed("text_checks", text_checks, cif)
            if result.cif is None or find_truncation(cif) is not None:
                continue
            structure, _, _ = timed("parse", parse_structure, cif)
            if structure is None or len(structure) > max_sites:
                continue
            if not VOLUME_PER_ATOM[0] <= structure.volume / len(structure) <= VOLUME_PER_ATOM[1]:
                continue
            timed("symmetry", detect_spacegroup, structure)
            try:
                timed("bond_length", bond_length_score, structure)
            except (TypeError, ValueError, ZeroDivisionError):
                pass
            timed("cdvae_struct", cdvae_struct_valid, structure)
            timed("smact", smact_valid, structure.composition)
    t0 = time.perf_counter()
    for text in texts:
        evaluate_one(text)
    whole = time.perf_counter() - t0
    total = sum(totals.values())
    out = {stage: {"seconds": totals[stage], "calls": counts[stage],
                    "ms_per_text": 1000 * totals[stage] / max(len(texts), 1),
                    "share": totals[stage] / total if total else None} for stage in STAGES}
    # The same texts through evaluate_one in one go: what the stages above leave out (row assembly, prompt hits).
    out["evaluate_one"] = {"seconds": whole, "calls": len(texts), "ms_per_text": 1000 * whole / max(len(texts), 1),
                           "share": None}
    return out


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished child processes (the workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="texts to evaluate (default 1000)")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE),
                        help="CSV with a cif column, 'builtin', or a sample-set folder (default: shared MP-20 train)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel workers (default: CPU count)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-item time box of the parallel run (s)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternate single and parallel over this many chunks of the texts (default 4)")
    parser.add_argument("--profile-n", type=int, default=300, help="texts in the per-check profile (default 300)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default <runs>/bench/evaluation.json)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    items = load_texts(args.source, args.n)
    print(f"prepared {len(items)} texts from {args.source} in {time.perf_counter() - t0:.1f} s", flush=True)
    info = benchlib.machine_info("cpu")
    evaluate_texts(items[:1], workers=1, timeout_s=None)  # first-use costs (element tables, spglib) off the clock

    # Rounds alternate the two paths over chunks of the texts, so a change in machine load (other users) hits both
    # alike; CPU seconds (this process and its reaped workers) show the work done whatever the load.
    chunks = [items[i::args.rounds] for i in range(args.rounds)]
    runs = {label: {"workers": w, "timeout_s": t, "seconds": 0.0, "cpu_s": 0.0, "load_1min": []}
            for label, w, t in (("single", 1, None), ("parallel", args.workers, args.timeout))}
    parts: dict[str, list[pd.DataFrame]] = {"single": [], "parallel": []}
    for r, chunk in enumerate(chunks):
        order = ("single", "parallel") if r % 2 == 0 else ("parallel", "single")
        for label in order:
            run = runs[label]
            load = benchlib.load_average()
            cpu0 = _cpu_seconds()
            with benchlib.Timer() as timer:
                parts[label].append(evaluate_texts(chunk, workers=run["workers"], timeout_s=run["timeout_s"]))
            run["seconds"] += timer.seconds
            run["cpu_s"] += _cpu_seconds() - cpu0
            run["load_1min"].append(load[0] if load else None)
        print(f"round {r + 1}/{len(chunks)}: " + ", ".join(
            f"{k} {v['seconds']:.1f} s" for k, v in runs.items()), flush=True)
    for run in runs.values():
        run["cifs_per_s"] = len(items) / run["seconds"]
        run["cpu_ms_per_cif"] = 1000 * run["cpu_s"] / len(items)
    tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    diffs = compare_tables(tables["single"], tables["parallel"])
    with benchlib.Timer() as timer:
        metrics = set_metrics(tables["parallel"])
    set_metrics_s = timer.seconds
    profile = profile_checks([t for _, t in items[: args.profile_n]])

    speedup = runs["parallel"]["cifs_per_s"] / runs["single"]["cifs_per_s"]
    rows = [{"path": k, **v} for k, v in runs.items()]
    benchlib.print_table(rows, ["path", "workers", "seconds", "cifs_per_s", "cpu_ms_per_cif"],
                         title=f"evaluation of {len(items)} texts: parallel / single = {speedup:.2f}x, "
                               f"identical verdicts: {not diffs}")
    prof_rows = [{"check": k, **v} for k, v in profile.items()]
    prof_rows.append({"check": "set_metrics (uniqueness)", "seconds": set_metrics_s, "calls": 1,
                      "ms_per_text": 1000 * set_metrics_s / len(items)})
    benchlib.print_table(prof_rows, ["check", "calls", "seconds", "ms_per_text", "share"],
                         title=f"per-check cost ({min(args.profile_n, len(items))} texts; set_metrics on all "
                               f"{len(items)})")
    benchlib.write_result(args.out or benchlib.default_out("evaluation"), {
        "benchmark": "evaluation", "machine": benchlib.finish(info), "source": args.source, "n": len(items),
        "runs": runs, "speedup": speedup, "identical_verdicts": not diffs, "differences": diffs[:50],
        "valid": int(tables["single"]["is_valid"].astype(bool).sum()),
        "parse_ok": int(tables["single"]["parse_ok"].fillna(False).astype(bool).sum()),
        "set_metrics_s": set_metrics_s, "uniqueness_all": metrics["uniqueness_all"]["value"],
        "profile_n": min(args.profile_n, len(items)), "profile": profile,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stability of generated crystals: relax with a potential, measure E_hull against a named hull, write a table.

`run_stability` takes inputs (sample-set folders, CIF files or folders, CSVs with a ``cif`` column), relaxes each
structure in the killable time-boxed pool (`engine.evaluate.relax.relax_many`), measures it against a `Hull`
(`engine.evaluate.hull`) and writes into ``out_dir``::

    stability.csv            one row per input structure, keyed by ``file`` (a sample set's ``eval.csv`` key),
                             columns `COLUMNS`; nothing is dropped: a structure without an energy or E_hull has a
                             ``failure_reason`` (and ``failure_detail``)
    stability_summary.json   {potential, hull, hull_kind, thresholds, n, n_evaluated, stable_rate,
                             metastable_rate, ..., failure_reasons, options}
    relaxed/NNNN.cif         relaxed structures (``relaxed_cif`` holds the path relative to ``out_dir``)

Definitions (printed with every rate): stable = E_hull <= 0.0 eV/atom, metastable = E_hull <= 0.1 eV/atom, both
only where the hull has a competing compound in the sample's chemical system (``hull_covered``; otherwise E_hull
is a lower bound and the sample is counted in ``n_hull_uncovered``, not as stable). Rates divide by all
submitted structures ``n`` (failures count as not stable), as MatterGen's S.U.N. does; ``*_of_evaluated`` rates
divide by those with an E_hull. A structure that did not converge within the step limit keeps its last energy:
an upper bound of its local minimum's, so its E_hull errs towards unstable.

CLI: ``crystallab stability IN... --potential P --hull NAME [--no-relax] [--workers N] [--timeout S] --out DIR``;
`stability_job_argv` is that command line for `engine.lab.jobs.launch_job` (a detached job).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from engine.evaluate.hull import Hull, load_hull
from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_json, atomic_write_text

THRESHOLDS = {"stable": 0.0, "metastable": 0.1}
"""E_hull thresholds in eV/atom: stable <= 0.0 (FlowMM, LeMat SUN), metastable <= 0.1 (Gruver, MatterGen)."""

COLUMNS = (
    "file", "potential", "hull", "formula", "n_sites", "energy_per_atom", "formation_energy_per_atom", "e_hull",
    "stable", "metastable", "hull_covered", "relaxed", "converged", "steps", "final_fmax", "volume_change", "rmsd",
    "relaxed_cif", "failure_reason", "failure_detail", "raw_energy_per_atom", "initial_energy_per_atom", "seconds",
)  # fmt: skip
"""Columns of stability.csv (energies eV/atom on the MP2020-corrected footing, ``final_fmax`` eV/Å, ``rmsd`` Å,
``volume_change`` relative, ``seconds`` wall per structure)."""


def is_sample_set(path: Path) -> bool:
    """A sample-set folder written by ``crystallab sample`` (``raw/`` with generated texts)."""
    return path.is_dir() and (path / "raw").is_dir()


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, str | None, str | None]]:
    """``(file, cif or None, reason when None)`` per structure from every input, in order.

    A sample-set folder gives one row per ``raw/*.txt`` with its post-processed ``processed/<stem>.cif`` (keyed
    like ``eval.csv``; a text that did not post-process gets ``no_processed_cif``); other inputs are read with
    `engine.data.sources.read_source` (CIF files and folders, CSVs with a ``cif`` column). With several inputs
    each key is prefixed by its input's name.

    Raises:
        InputError: an input does not exist or holds nothing.
    """
    from engine.data.sources import read_source

    rows: list[tuple[str, str | None, str | None]] = []
    for arg in inputs:
        path = Path(arg).expanduser()
        prefix = f"{path.name}/" if len(inputs) > 1 else ""
        if is_sample_set(path):
            raws = sorted((path / "raw").glob("*.txt"))
            if not raws:
                raise InputError(f"{path} has no raw/*.txt: point at a sample-set folder from `crystallab sample`")
            for raw in raws:
                cif = path / "processed" / f"{raw.stem}.cif"
                if cif.is_file():
                    rows.append((prefix + raw.name, cif.read_text(encoding="utf-8", errors="replace"), None))
                else:
                    rows.append((prefix + raw.name, None, "no_processed_cif"))
            continue
        if not path.exists():
            raise InputError(f"{path} does not exist: give sample-set folders, CIF files or folders, or CSVs with "
                             "a 'cif' column")
        for item in read_source(path):
            text = item.text if item.text is not None else (item.structure.to(fmt="cif") if item.structure else None)
            rows.append((prefix + item.name, text, None if text is not None else "parse_failed"))
    return rows


def _flag(value: Any, threshold: float, covered: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value <= threshold \
        and bool(covered)


def stability_table(relax_rows: Sequence[dict], files: Sequence[str], hull: Hull, potential: str) -> pd.DataFrame:
    """The stability table (`COLUMNS`) from relaxation rows (`engine.evaluate.relax.RELAX_FIELDS`) and a hull."""
    rows = []
    for name, r in zip(files, relax_rows):
        row = {c: r.get(c) for c in COLUMNS}
        row.update(file=name, potential=potential, hull=hull.name)
        energy = r.get("energy_per_atom")
        if energy is not None and r.get("formula") and r.get("failure_reason") in (None, "not_converged"):
            verdict = hull.evaluate(r["formula"], energy)
            row.update(formation_energy_per_atom=verdict["formation_energy_per_atom"], e_hull=verdict["e_hull"],
                       hull_covered=verdict["hull_covered"])
            if verdict["failure_reason"]:
                row.update(failure_reason=verdict["failure_reason"], failure_detail=verdict["failure_detail"])
        row["stable"] = _flag(row["e_hull"], THRESHOLDS["stable"], row["hull_covered"])
        row["metastable"] = _flag(row["e_hull"], THRESHOLDS["metastable"], row["hull_covered"])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarize(df: pd.DataFrame, hull: Hull, potential: str, options: dict) -> dict:
    """The stability_summary.json dict of a table."""
    n = int(len(df))
    has = df["e_hull"].notna()
    uncovered = has & (df["hull_covered"] == False)  # noqa: E712
    evaluated = int(has.sum())
    stable, meta = int(df["stable"].sum()), int(df["metastable"].sum())
    reasons = df["failure_reason"].dropna().value_counts()
    e = df.loc[has & ~uncovered, "e_hull"].astype(float)
    return {
        "potential": potential, "hull": hull.name, "hull_kind": hull.kind, "hull_potential": hull.potential,
        "thresholds": dict(THRESHOLDS), "units": "eV/atom",
        "definitions": {
            "stable": "E_hull <= 0.0 eV/atom against the named hull, with a competing compound in the hull",
            "metastable": "E_hull <= 0.1 eV/atom, same condition",
            "rates": "divided by all submitted structures n; *_of_evaluated divide by n_evaluated",
        },
        "n": n, "n_evaluated": evaluated, "n_hull_uncovered": int(uncovered.sum()),
        "n_failed": int(n - evaluated),
        "stable_rate": stable / n if n else None, "metastable_rate": meta / n if n else None,
        "stable_rate_of_evaluated": stable / evaluated if evaluated else None,
        "metastable_rate_of_evaluated": meta / evaluated if evaluated else None,
        "n_stable": stable, "n_metastable": meta,
        "e_hull_median": float(e.median()) if len(e) else None, "e_hull_mean": float(e.mean()) if len(e) else None,
        "failure_reasons": {str(k): int(v) for k, v in reasons.items()},
        "options": options, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def run_stability(
    inputs: Sequence[str | os.PathLike],
    potential: str,
    hull: str | Hull,
    out_dir: str | os.PathLike | None = None,
    *,
    relax: bool = True,
    fmax: float = 0.1,
    steps: int = 500,
    optimizer: str = "FIRE",
    max_sites: int = 200,
    device: str | None = "auto",
    workers: int | None = None,
    timeout_s: float | None = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Relax every input structure with ``potential``, measure E_hull against ``hull``, write the tables.

    Args:
        inputs: see `collect_inputs`.
        potential: potential name (`engine.evaluate.potentials.POTENTIALS`).
        hull: a hull name / folder, or a loaded `Hull`.
        out_dir: where to write; default the sample-set folder when ``inputs`` is exactly one sample set.
        relax, fmax, steps, optimizer, max_sites: see `engine.evaluate.relax.relax_one`.
        device, workers, timeout_s: see `engine.evaluate.relax.relax_many`.
        progress: ``progress(done, total)``.

    Raises:
        InputError / ConfigError: bad inputs, unknown potential, missing hull, no --out where one is needed.
    """
    from engine.evaluate.potentials import check_name
    from engine.evaluate.relax import empty_row, relax_many

    potential = check_name(potential)
    the_hull = hull if isinstance(hull, Hull) else load_hull(hull)
    if out_dir is None:
        if len(inputs) == 1 and is_sample_set(Path(inputs[0]).expanduser()):
            out_dir = Path(inputs[0]).expanduser()
        else:
            raise InputError("give --out DIR: the results go into the sample-set folder only when the input is "
                             "exactly one sample set")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder for stability.csv and relaxed/")
    items = collect_inputs(inputs)
    if not items:
        raise InputError(f"no structures in {', '.join(map(str, inputs))}")
    t0 = time.perf_counter()
    todo = [i for i, (_, cif, _) in enumerate(items) if cif is not None]
    done_rows = relax_many(
        [items[i][1] for i in todo], potential, device=device, workers=workers, timeout_s=timeout_s,
        progress=progress, relax=relax, fmax=fmax, steps=steps, optimizer=optimizer, max_sites=max_sites,
    )  # fmt: skip
    rows = [{**empty_row(), "failure_reason": reason} for _, _, reason in items]
    for i, row in zip(todo, done_rows):
        rows[i] = row
    df = stability_table(rows, [name for name, _, _ in items], the_hull, potential)
    out.mkdir(parents=True, exist_ok=True)
    for i, (row, cif) in enumerate(zip(rows, df["relaxed_cif"])):
        if isinstance(cif, str) and cif:
            rel = f"relaxed/{i:04d}.cif"
            atomic_write_text(out / rel, cif)
            df.at[i, "relaxed_cif"] = rel
    options = {"relax": relax, "fmax": fmax, "steps": steps, "optimizer": optimizer, "max_sites": max_sites,
               "timeout_s": timeout_s, "workers": workers, "device": device, "inputs": [str(p) for p in inputs],
               "seconds": round(time.perf_counter() - t0, 2)}
    summary = summarize(df, the_hull, potential, options)
    atomic_write_text(out / "stability.csv", df.to_csv(index=False))
    atomic_write_json(out / "stability_summary.json", summary)
    return df, summary


def stability_job_argv(inputs: Sequence[str | os.PathLike], potential: str, hull: str, out_dir: str | os.PathLike,
                       *, relax: bool = True, workers: int | None = None, timeout_s: float | None = None) -> list[str]:
    """The ``crystallab stability`` command line for `engine.lab.jobs.launch_job` (kind ``stability``)."""
    argv = ["stability", *map(str, inputs), "--potential", potential, "--hull", str(hull), "--out", str(out_dir)]
    if not relax:
        argv.append("--no-relax")
    if workers:
        argv += ["--workers", str(workers)]
    if timeout_s:
        argv += ["--timeout", str(timeout_s)]
    return argv


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _run_cli(args: argparse.Namespace) -> int:
    from engine.data.datasets import _Bar
    from engine.evaluate.relax import OPTIMIZERS

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers} must be at least 1 (default: the CPU count)")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InputError(f"--timeout {args.timeout} must be a positive number of seconds per structure")
    if args.optimizer.upper() not in OPTIMIZERS:
        raise InputError(f"--optimizer {args.optimizer} is not one of {', '.join(OPTIMIZERS)}")
    bar = _Bar("stability", unit="structure")
    try:
        df, s = run_stability(
            args.inputs, args.potential, args.hull, args.out, relax=not args.no_relax, fmax=args.fmax,
            steps=args.steps, optimizer=args.optimizer.upper(), max_sites=args.max_sites, device=args.device,
            workers=args.workers, timeout_s=args.timeout, progress=bar,
        )  # fmt: skip
    finally:
        bar.close()
    out = Path(args.out) if args.out else Path(args.inputs[0])
    lines = [
        f"{s['n']} structure(s), {s['n_evaluated']} with an E_hull against hull {s['hull']} ({s['hull_kind']}), "
        f"potential {s['potential']}",
        f"  stable (E_hull <= {THRESHOLDS['stable']} eV/atom)      {_rate(s['stable_rate'])} of all "
        f"({_rate(s['stable_rate_of_evaluated'])} of evaluated)",
        f"  metastable (E_hull <= {THRESHOLDS['metastable']} eV/atom)  {_rate(s['metastable_rate'])} of all "
        f"({_rate(s['metastable_rate_of_evaluated'])} of evaluated)",
    ]
    if s["n_hull_uncovered"]:
        lines.append(f"  {s['n_hull_uncovered']} sample(s) have no competing compound in the hull: their E_hull is "
                     "a lower bound and they are not counted as stable")
    if s["failure_reasons"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in s["failure_reasons"].items()))
    lines.append(f"wrote {out / 'stability.csv'} and {out / 'stability_summary.json'}")
    print("\n".join(lines), file=sys.stderr)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab stability``."""
    from engine.evaluate.potentials import POTENTIALS

    p = subparsers.add_parser(
        "stability", help="relax structures with a potential and measure E_hull against a hull",
        description="Writes stability.csv (one row per structure, failures with their reason), "
        "stability_summary.json and relaxed/*.cif into --out (default: the sample-set folder when the input is one "
        "sample set). Stable: E_hull <= 0.0 eV/atom; metastable: <= 0.1 eV/atom.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="sample-set folders, CIF files or folders, CSVs with a "
                   "'cif' column")
    p.add_argument("--potential", required=True, help=f"one of {', '.join(POTENTIALS)}")
    p.add_argument("--hull", required=True, help="hull name (under runs/hulls) or folder")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder")
    p.add_argument("--no-relax", action="store_true", help="single-point energies of the structures as given")
    p.add_argument("--fmax", type=float, default=0.1, help="relaxation force threshold, eV/Å (default 0.1)")
    p.add_argument("--steps", type=int, default=500, help="relaxation step limit (default 500)")
    p.add_argument("--optimizer", default="FIRE", help="FIRE or BFGS (ASE, with a Frechet cell filter)")
    p.add_argument("--max-sites", type=int, default=200, help="larger structures are rejected as too_large")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--workers", type=int, default=None, help="worker processes on CPU (default: CPU count)")
    p.add_argument("--timeout", type=float, default=120.0, help="time box per structure, seconds (default 120)")
    p.set_defaults(func=_run_cli)

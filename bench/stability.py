"""Stability calibration and speed per potential: formation-energy and E_hull error against DFT, seconds per structure.

Calibration (MP-20 rows with DFT ``formation_energy_per_atom`` and ``e_above_hull``, ``../shared/data/mp20_subset``):
``--targets`` rows whose chemical system holds at least one other MP-20 compound (deterministic: by material id)
and those competing compounds get single-point energies on their DFT-relaxed structures (``--calib-steps N``
relaxes them instead) through `engine.evaluate.relax.relax_many`, the path ``crystallab stability`` takes;
elemental references (ase's reference solids and MP-20's elemental rows, lowest per element) are relaxed.
Reported per potential:

- formation-energy MAE against DFT on the lab's footing (CHGNet as is, SevenNet with MP2020 corrections), and on
  the other footing (CHGNet with MP2020 applied again, SevenNet raw), which shows which footing is right;
- E_hull MAE against DFT ``e_above_hull`` for the targets, with the hull built from the *other* rows (leave one
  out) plus the elemental references; next to it the same leave-one-out hull made of the DFT formation energies,
  whose error is the floor set by the phases a 2,485-row subset lacks.

Speed, on ``--per-bin`` test rows per atoms-per-cell bin, rattled (0.05 Å) and strained (3 %) so that relaxation has
work to do, as generated crystals do:

- the lab's path: single points batched through the library (`Potential.single_points`, one thread), and
  relaxations in ``--workers`` time-boxed worker processes with one torch thread each;
- a naive loop: one structure at a time through the ASE calculator with torch's default threads, run last (after
  every fork), as ratio naive / lab in the same run;
- the projected wall-clock time of stability for 1,000 generated crystals on this machine (lab path).

    uv run python bench/stability.py --targets 4 --per-bin 1 --workers 2
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from engine.evaluate.hull import ENTRY_COLUMNS, Hull, elemental_reference_cifs  # noqa: E402
from engine.evaluate.potentials import POTENTIALS, mp2020_corrected  # noqa: E402
from engine.evaluate.relax import get_potential, parse_structure, relax_many  # noqa: E402

SHARED = Path(os.environ.get("CRYSTALLAB_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
BINS = ((1, 4), (5, 8), (9, 12), (13, 20))


def load_mp20() -> pd.DataFrame:
    df = pd.concat([pd.read_csv(SHARED / "data" / "mp20_subset" / f"{s}.csv").assign(split=s)
                    for s in ("train", "val", "test")], ignore_index=True)
    df["els"] = [frozenset(ast.literal_eval(s)) for s in df["elements"]]
    return df


def pick_calibration(df: pd.DataFrame, n_targets: int) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """Targets (rows with a competing compound among the other rows), the union of rows to evaluate, competitors."""
    els = list(df["els"])
    competitors = {i: [j for j in range(len(df)) if j != i and len(els[j]) >= 2 and els[j] <= els[i]]
                   for i in range(len(df))}
    order = sorted((i for i in competitors if competitors[i]), key=lambda i: df["material_id"].iat[i])
    targets, union = order[:n_targets], set()
    for i in targets:
        union |= {i, *competitors[i]}
    return targets, sorted(union), competitors


def pick_speed(df: pd.DataFrame, per_bin: int, seed: int) -> list[tuple[str, Any]]:
    """``per_bin`` test rows per atoms-per-cell bin, rattled and strained: ``[(bin label, structure)]``."""
    rng = np.random.default_rng(seed)
    test = df[df["split"] == "test"].sort_values("material_id")
    out = []
    for lo, hi in BINS:
        n = 0
        for cif in test["cif"]:
            s = parse_structure(cif)
            if lo <= len(s) <= hi:
                s.apply_strain(0.03)
                for k, shift in enumerate(rng.normal(0, 0.05, (len(s), 3))):
                    s.translate_sites([k], shift, frac_coords=False)
                out.append((f"{lo}-{hi}", s))
                n += 1
                if n == per_bin:
                    break
    return out


def _element_of(formula: str) -> str:
    from pymatgen.core import Composition

    return Composition(formula).elements[0].symbol


def _elements_of(formula: str) -> set[str]:
    from pymatgen.core import Composition

    return {el.symbol for el in Composition(formula).elements}


def calibrate(name: str, df: pd.DataFrame, targets: list[int], union: list[int], competitors: dict,
              refs: dict[str, str], workers: int, timeout: float, calib_steps: int) -> dict:
    t0 = time.perf_counter()
    rows = relax_many(list(df["cif"].iloc[union]), name, device="cpu", workers=workers, timeout_s=timeout,
                      relax=calib_steps > 0, steps=max(calib_steps, 1))
    ref_rows = relax_many(list(refs.values()), name, device="cpu", workers=workers, timeout_s=timeout, steps=200)
    seconds = time.perf_counter() - t0
    pot = get_potential(name, "cpu")
    mu: dict[str, float] = {}
    for r in ref_rows:  # the lowest elemental phase per element: ase's reference solid or an MP-20 row
        if r["energy_per_atom"] is not None and r["failure_reason"] in (None, "not_converged"):
            el = _element_of(r["formula"])
            mu[el] = min(mu.get(el, np.inf), r["energy_per_atom"])
    worst = []
    by_row, errs, errs_other = {}, [], []
    for i, r in zip(union, rows):
        if r["energy_per_atom"] is None or r["failure_reason"] not in (None, "not_converged"):
            continue
        from pymatgen.core import Composition

        comp = Composition(r["formula"])
        if any(el.symbol not in mu for el in comp.elements):
            continue
        ref = sum(comp.get_atomic_fraction(el) * mu[el.symbol] for el in comp.elements)
        raw = r["raw_energy_per_atom"]
        final = parse_structure(r["relaxed_cif"]) if r["relaxed_cif"] else parse_structure(df["cif"].iat[i])
        other = raw if pot.apply_mp2020 else mp2020_corrected(final, raw * len(final)) / len(final)
        dft = float(df["formation_energy_per_atom"].iat[i])
        by_row[i] = (r["formula"], r["energy_per_atom"])
        errs.append(abs(r["energy_per_atom"] - ref - dft))
        worst.append((errs[-1], r["formula"], dft, r["energy_per_atom"] - ref))
        errs_other.append(abs(other - ref - dft))
    e_err, e_err_dft, covered = [], [], 0
    for i in targets:
        if i not in by_row:
            continue
        others = [j for j in competitors[i] if j in by_row]
        elements = [{"id": f"mu:{el}", "formula": el, "energy_per_atom": e, "kind": "element", "source": "ref"}
                    for el, e in mu.items()]
        pot_hull = Hull("loo", "potential", name, pd.DataFrame(elements + [
            {"id": str(j), "formula": by_row[j][0], "energy_per_atom": by_row[j][1], "kind": "compound",
             "source": "mp20"} for j in others], columns=list(ENTRY_COLUMNS)))
        dft_hull = Hull("loo-dft", "dft", None, pd.DataFrame(
            [{**e, "energy_per_atom": 0.0} for e in elements] + [
                {"id": str(j), "formula": df["pretty_formula"].iat[j],
                 "energy_per_atom": float(df["formation_energy_per_atom"].iat[j]), "kind": "compound",
                 "source": "mp20"} for j in competitors[i]], columns=list(ENTRY_COLUMNS)))
        v = pot_hull.evaluate(*by_row[i])
        d = dft_hull.evaluate(df["pretty_formula"].iat[i], float(df["formation_energy_per_atom"].iat[i]))
        if v["e_hull"] is None or d["e_hull"] is None:
            continue
        covered += bool(v["hull_covered"])
        truth = float(df["e_above_hull"].iat[i])
        e_err.append(abs(v["e_hull"] - truth))
        e_err_dft.append(abs(d["e_hull"] - truth))
    failures = pd.Series([r["failure_reason"] for r in rows + ref_rows]).dropna().value_counts().to_dict()
    return {
        "potential": name, "n_compounds": len(union), "n_formation": len(errs), "n_elements": len(mu),
        "footing": "MP2020 applied" if pot.apply_mp2020 else "as predicted (carries MP2020)",
        "formation_mae": float(np.mean(errs)) if errs else None,
        "formation_mae_other_footing": float(np.mean(errs_other)) if errs_other else None,
        "n_targets": len(e_err), "targets_covered": covered,
        "e_hull_mae": float(np.mean(e_err)) if e_err else None,
        "e_hull_mae_dft_loo_floor": float(np.mean(e_err_dft)) if e_err_dft else None,
        "formation_error_by_element": dict(sorted(
            ((el, float(np.mean([e for e, f, _, _ in worst if el in _elements_of(f)]))) for el in
             {el for _, f, _, _ in worst for el in _elements_of(f)}), key=lambda kv: -kv[1])[:5]),
        "worst_formation": [{"formula": f, "dft": d, "predicted": p} for _, f, d, p in sorted(worst)[::-1][:5]],
        "failures": {str(k): int(v) for k, v in failures.items()}, "seconds": round(seconds, 1),
    }  # fmt: skip


def speed_lab(name: str, structures: list[tuple[str, Any]], workers: int, timeout: float, steps: int) -> dict:
    pot = get_potential(name, "cpu")
    structs = [s for _, s in structures]
    t0 = time.perf_counter()
    pot.single_points(structs, batch_size=16)
    sp = (time.perf_counter() - t0) / len(structs)
    t0 = time.perf_counter()
    rows = relax_many([s.to(fmt="cif") for s in structs], name, device="cpu", workers=workers, timeout_s=timeout,
                      steps=steps)
    relax_wall = (time.perf_counter() - t0) / len(structs)
    by_bin: dict[str, list] = {}
    for (label, _), r in zip(structures, rows):
        by_bin.setdefault(label, []).append(r)
    bins = {label: {"relax_s": float(np.mean([r["seconds"] or np.nan for r in rs])),
                    "steps": float(np.mean([r["steps"] or 0 for r in rs])), "n": len(rs)}
            for label, rs in by_bin.items()}
    return {"single_point_s_batched": sp, "relax_wall_s_per_structure": relax_wall, "relax_by_bin": bins,
            "relax_failures": [r["failure_reason"] for r in rows if r["failure_reason"]]}


def speed_naive(pot: Any, structures: list[tuple[str, Any]], steps: int) -> dict:
    """One structure at a time through the ASE calculator in this process (torch's default threads)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms_list = [AseAtomsAdaptor.get_atoms(s) for _, s in structures]
    t0 = time.perf_counter()
    for atoms in atoms_list:
        atoms.calc = pot.calculator
        atoms.get_potential_energy()
    sp = (time.perf_counter() - t0) / len(atoms_list)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for atoms in atoms_list:
            atoms.calc = pot.calculator
            FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=0.1, steps=steps)
    return {"single_point_s_naive": sp, "relax_s_naive": (time.perf_counter() - t0) / len(atoms_list)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--potentials", default=",".join(POTENTIALS), help="comma-separated (default: all)")
    ap.add_argument("--targets", type=int, default=4, help="calibration targets (E_hull rows)")
    ap.add_argument("--per-bin", type=int, default=1, help="speed structures per atoms-per-cell bin")
    ap.add_argument("--steps", type=int, default=100, help="relaxation step limit in the speed runs")
    ap.add_argument("--calib-steps", type=int, default=0, help="relax the MP-20 rows (0: single points on their "
                    "DFT-relaxed structures; elemental references are always relaxed, 200 steps)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    names = [n.strip() for n in args.potentials.split(",") if n.strip()]
    info = benchlib.machine_info("cpu")
    default_threads = info["torch_threads"]
    df = load_mp20()
    targets, union, competitors = pick_calibration(df, args.targets)
    elements = sorted(set().union(*(df["els"].iat[i] for i in union)))
    refs, _ = elemental_reference_cifs(elements)
    mp_elements = [i for i in range(len(df)) if len(df["els"].iat[i]) == 1 and next(iter(df["els"].iat[i])) in elements]
    refs.update({f"mp20:{df['material_id'].iat[i]}": df["cif"].iat[i] for i in mp_elements})
    print(f"calibration: {len(targets)} targets, {len(union)} compounds, {len(refs)} elemental references "
          f"({len(mp_elements)} from MP-20)", flush=True)
    speed_set = pick_speed(df, args.per_bin, args.seed)
    results, loaded = [], {}
    for name in names:
        t0 = time.perf_counter()
        loaded[name] = get_potential(name, "cpu")
        load_s = time.perf_counter() - t0
        print(f"{name}: loaded in {load_s:.1f} s", flush=True)
        row = calibrate(name, df, targets, union, competitors, refs, args.workers, args.timeout, args.calib_steps)
        print(f"{name}: calibration {row['seconds']} s", flush=True)
        t0 = time.perf_counter()
        row.update(load_s=round(load_s, 1), **speed_lab(name, speed_set, args.workers, args.timeout, args.steps))
        print(f"{name}: speed (lab path) {time.perf_counter() - t0:.1f} s", flush=True)
        results.append(row)
        print(f"{name}: formation MAE {benchlib.fmt(row['formation_mae'])} eV/atom, "
              f"E_hull MAE {benchlib.fmt(row['e_hull_mae'])}", flush=True)
    import torch

    torch.set_num_threads(default_threads)  # the naive loop: no forks after this point
    for row in results:
        t0 = time.perf_counter()
        row.update(speed_naive(loaded[row["potential"]], speed_set, args.steps))
        print(f"{row['potential']}: naive loop {time.perf_counter() - t0:.1f} s", flush=True)
        row["relax_ratio_naive_over_lab"] = row["relax_s_naive"] / row["relax_wall_s_per_structure"]
        row["single_point_ratio_naive_over_batched"] = row["single_point_s_naive"] / row["single_point_s_batched"]
        row["hours_per_1000_generated"] = row["relax_wall_s_per_structure"] * 1000 / 3600
    benchlib.print_table(results, ["potential", "footing", "n_formation", "formation_mae",
                                   "formation_mae_other_footing", "n_targets", "targets_covered", "e_hull_mae",
                                   "e_hull_mae_dft_loo_floor"], "calibration against DFT (eV/atom)")
    benchlib.print_table(results, ["potential", "load_s", "single_point_s_batched", "single_point_s_naive",
                                   "single_point_ratio_naive_over_batched", "relax_wall_s_per_structure",
                                   "relax_s_naive", "relax_ratio_naive_over_lab", "hours_per_1000_generated"],
                         f"speed (CPU, {args.workers} workers x 1 thread; naive: {default_threads} threads)")
    for row in results:
        print(f"{row['potential']} relaxation by atoms per cell: " + ", ".join(
            f"{k}: {v['relax_s']:.2f} s, {v['steps']:.0f} steps" for k, v in row["relax_by_bin"].items()))
    result = {"machine": benchlib.finish(info), "args": vars(args) | {"out": str(args.out)},
              "calibration_rows": len(union), "targets": len(targets), "speed_structures": len(speed_set),
              "results": results}
    benchlib.write_result(args.out or benchlib.default_out("stability"), result)


if __name__ == "__main__":
    main()

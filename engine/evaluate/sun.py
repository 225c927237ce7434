"""S.U.N. (stable, unique, novel) of a sample set, from its ``stability.csv`` (the stability half of issue 13).

MatterGen's definition: a sample counts when it is stable AND unique AND novel; the count is divided by *all
submitted* samples (unparsed ones, failed relaxations and duplicates stay in the denominator).

- stable: ``e_hull <= threshold`` in ``stability.csv`` (this lab's stable threshold is 0.0 eV/atom; MatterGen calls
  ``<= 0.1`` stable, which this module reports as M.S.U.N., metastable-unique-novel, LeMat-GenBench's MetaSUN).
  A sample whose hull holds no competing compound in its chemical system (``hull_covered`` false) has only a lower
  bound on E_hull; it is never counted as stable, and the count of such would-be S.U.N. samples is reported as
  ``sun_uncovered``. A row without an E_hull (failed, timed out) is not stable.
- unique: the first sample (in file order) of each group of matching generated structures; later members are
  duplicates. Groups as `engine.evaluate.metrics` forms them: pymatgen ``StructureMatcher()`` defaults (ltol 0.2,
  stol 0.3, angle_tol 5) inside reduced-formula buckets, on the generated (not relaxed) structures.
- novel: no training structure of the same reduced formula matches (`engine.evaluate.metrics.TrainingIndex`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from engine.evaluate.checks import parse_structure
from engine.evaluate.metrics import TrainingIndex, _group
from engine.lab.errors import InputError

STABLE_EV = 0.0
"""Stable: E_hull <= this (eV/atom)."""
METASTABLE_EV = 0.1
"""Metastable: E_hull <= this (eV/atom); MatterGen's 'stable'."""

SUN_DEFINITIONS: dict[str, str] = {
    "stable_rate": "samples with E_hull <= {stable} eV/atom against a hull covering their chemical system / all "
                   "submitted samples",
    "metastable_rate": "samples with E_hull <= {metastable} eV/atom against a hull covering their chemical system / "
                       "all submitted samples",
    "unique_sample_rate": "samples that are the first of their group of matching structures (StructureMatcher() "
                          "defaults in reduced-formula buckets) / all submitted samples",
    "novel_rate": "parsed samples with no matching training structure of the same reduced formula / all submitted "
                  "samples",
    "sun_rate": "S.U.N. (MatterGen): samples stable (E_hull <= {stable} eV/atom, hull covering the chemical "
                "system) AND unique AND novel / all submitted samples",
    "msun_rate": "metastable S.U.N.: E_hull <= {metastable} eV/atom (MatterGen's own stability threshold) AND "
                 "unique AND novel / all submitted samples",
    "sun_uncovered": "samples that would be S.U.N. but whose chemical system has no competing compound in the hull "
                     "(E_hull only a lower bound; not counted as stable)",
    "n_submitted": "all submitted samples (the denominator)",
    "sun_thresholds": "E_hull thresholds in eV/atom: stable, metastable",
    "hull": "the hull the E_hull values were measured against (potential, hull name)",
}

STABILITY_COLUMNS = ("file", "e_hull", "hull_covered")
"""Columns of ``stability.csv`` this module needs (the contract of issue 13 lists the rest)."""


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value is True or value == True)  # noqa: E712 (numpy / pandas booleans; NaN is False)


def read_stability(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``stability.csv``.

    Raises:
        InputError: the file is missing or lacks a needed column (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist: run `crystallab stability` on the sample set first")
    df = pd.read_csv(path)
    missing = [c for c in STABILITY_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path} lacks column(s) {', '.join(missing)}: it is not a stability table written by "
                         "`crystallab stability`; run it again")
    return df


def sun_metrics(
    structures: dict[str, Structure | None],
    stability: pd.DataFrame,
    train_index: TrainingIndex | None,
    *,
    n_submitted: int | None = None,
    stable_ev: float = STABLE_EV,
    metastable_ev: float = METASTABLE_EV,
) -> dict[str, dict[str, Any]]:
    """S.U.N. and its parts, each as ``{"value": ..., "definition": ...}`` (module docstring).

    Args:
        structures: every submitted sample's key (the ``file`` column) -> its generated structure (None: did not
            parse). File order is the dict's order.
        stability: a ``stability.csv`` table (``file``, ``e_hull``, ``hull_covered``; ``potential`` / ``hull`` named
            when present). Samples absent from it are not stable.
        train_index: training structures for novelty; None makes the novel and S.U.N. entries None.
        n_submitted: the denominator (default ``len(structures)``).
        stable_ev, metastable_ev: E_hull thresholds in eV/atom.
    """
    names = list(structures)
    n = len(names) if n_submitted is None else n_submitted
    table = stability.assign(file=stability["file"].astype(str)).drop_duplicates("file").set_index("file")
    e_hull = pd.to_numeric(table["e_hull"].reindex(names), errors="coerce").to_numpy(dtype=float)
    covered = table["hull_covered"].reindex(names).map(_flag).to_numpy(dtype=bool)
    parsed = [i for i, f in enumerate(names) if structures[f] is not None]
    matcher = StructureMatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = _group([structures[names[i]] for i in parsed], matcher)
    unique = np.zeros(len(names), dtype=bool)
    for g in groups:
        unique[parsed[min(g)]] = True
    novel = np.zeros(len(names), dtype=bool)
    if train_index is not None:
        for i in parsed:
            novel[i] = train_index.is_novel(structures[names[i]], matcher)
    finite = np.isfinite(e_hull)
    below = np.where(finite, e_hull, np.inf)
    stable, metastable = (below <= stable_ev) & covered, (below <= metastable_ev) & covered
    uncovered = (below <= stable_ev) & ~covered & unique & novel

    def rate(mask: np.ndarray) -> float | None:
        return float(mask.sum()) / n if n else None

    with_training = train_index is not None
    hull = {k: sorted({str(v) for v in stability[k].dropna()}) for k in ("potential", "hull") if k in stability}
    values = {
        "stable_rate": rate(stable), "metastable_rate": rate(metastable), "unique_sample_rate": rate(unique),
        "novel_rate": rate(novel) if with_training else None,
        "sun_rate": rate(stable & unique & novel) if with_training else None,
        "msun_rate": rate(metastable & unique & novel) if with_training else None,
        "sun_uncovered": int(uncovered.sum()) if with_training else None,
        "n_submitted": n, "sun_thresholds": {"stable": stable_ev, "metastable": metastable_ev}, "hull": hull,
    }
    fmt = {"stable": stable_ev, "metastable": metastable_ev}
    return {k: {"value": values[k], "definition": SUN_DEFINITIONS[k].format(**fmt)} for k in SUN_DEFINITIONS}


def structures_from_table(df: pd.DataFrame) -> dict[str, Structure | None]:
    """``file`` -> generated structure of an evaluation table held in memory (its ``processed_cif`` column)."""
    out: dict[str, Structure | None] = {}
    for name, cif, ok, reason in zip(df["file"], df["processed_cif"], df["parse_ok"], df["failure_reason"]):
        analysed = _flag(ok) and (reason is None or (isinstance(reason, float) and np.isnan(reason)))
        out[str(name)] = parse_structure(cif)[0] if analysed and isinstance(cif, str) else None
    return out

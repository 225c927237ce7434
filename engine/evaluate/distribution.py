"""Distribution metrics of a sample set against a reference set: COV-R / COV-P, Wasserstein distances, diversity.

Definitions follow CDVAE (Xie et al. 2021) as shared/reference/evaluation.md states them:

- fingerprints (matminer): a structure's fingerprint is the mean over its sites of
  ``CrystalNNFingerprint.from_preset("ops")`` (61 numbers); a composition's is
  ``ElementProperty.from_preset("magpie")`` (132 numbers).
- standardisation: CDVAE standardises the composition fingerprints with fixed scaler constants from its own code
  (``CompScalerMeans`` / ``CompScalerStds``). No installed package carries those constants, so this module
  standardises with the mean and standard deviation of the *reference set's* composition fingerprints (a feature
  with zero spread is divided by 1; NaN becomes 0 after scaling, as CDVAE's ``replace_nan_token=0``). Structure
  fingerprints are not scaled (as in CDVAE). COV numbers therefore match CDVAE's definition but not its exact
  scale; the `SCALER_NOTE` travels with every result.
- COV-R (recall): the fraction of reference structures that have a generated structure within the structural
  cutoff AND a generated structure within the compositional cutoff (Euclidean distances; the two nearest
  neighbours are taken independently). COV-P (precision): the number of generated structures with a reference
  structure within both cutoffs, divided by *all submitted* samples (samples without a fingerprint count as
  misses). Cutoffs (structural / compositional): MP-20 0.4 / 10, Perov-5 and Carbon-24 0.2 / 4 (`CUTOFFS`).
- Wasserstein distances (``scipy.stats.wasserstein_distance``) of density (g/cm^3) and of the number of elements
  between CDVAE-valid generated samples and the reference set; of E_hull (eV/atom) when both sides carry one.
- diversity: the mean pairwise Euclidean distance between the generated structures' structure fingerprints, and
  between their standardised composition fingerprints.

Fingerprinting costs about 0.2-1 s per structure (CrystalNN), so it runs in the killable, time-boxed worker pool
of `engine.evaluate.evaluation.run_pool`, and a reference set's fingerprints are cached under
``Settings.cache_dir / "fingerprints"`` keyed by the sha256 of its CIF texts.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_text

CUTOFFS: dict[str, tuple[float, float]] = {"mp20": (0.4, 10.0), "perov5": (0.2, 4.0), "carbon24": (0.2, 4.0)}
"""CDVAE's COV cutoffs per dataset: (structural fingerprint distance, standardised composition distance)."""
DEFAULT_CUTOFFS = "mp20"

SCALER_NOTE = ("composition fingerprints standardised with the reference set's own mean and standard deviation "
               "(CDVAE's fixed scaler constants are not available in any installed package), so COV is CDVAE's "
               "definition on a different scale")

DISTRIBUTION_DEFINITIONS: dict[str, str] = {
    "cov_recall": "reference structures with a generated structure within the structural cutoff (CrystalNN 'ops' "
                  "site fingerprints averaged over sites) and one within the compositional cutoff (Magpie "
                  "fingerprints, standardised), neighbours taken independently / reference structures (CDVAE COV-R)",
    "cov_precision": "generated structures with a reference structure within both cutoffs / all submitted samples "
                     "(CDVAE COV-P)",
    "wdist_density": "Wasserstein distance between the densities (g/cm^3) of CDVAE-valid generated samples and of "
                     "the reference set (CDVAE)",
    "wdist_n_elements": "Wasserstein distance between the numbers of elements of CDVAE-valid generated samples and "
                        "of the reference set (CDVAE)",
    "wdist_e_hull": "Wasserstein distance between the generated samples' E_hull (eV/atom, stability.csv) and the "
                    "reference set's E_hull column (e_above_hull; n/a when either side has none)",
    "diversity_struct": "mean pairwise Euclidean distance between the generated structures' structure fingerprints",
    "diversity_comp": "mean pairwise Euclidean distance between the generated structures' standardised composition "
                      "fingerprints",
    "n_reference": "structures of the reference set with a fingerprint",
    "n_fingerprinted": "generated samples with a fingerprint (parsed, and CrystalNN finished in its time box)",
    "cov_cutoffs": "COV cutoffs: structural fingerprint distance, standardised composition distance",
    "scaler": "how the composition fingerprints were standardised",
    "reference": "the reference set the distribution metrics compare with",
}


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints


@dataclass
class Fingerprints:
    """Fingerprints and descriptors of a list of structures (one row each, in input order)."""

    names: list[str]
    struct: np.ndarray
    """(N, 61) site-averaged CrystalNN "ops" fingerprints; NaN rows where none was computed."""
    comp: np.ndarray
    """(N, 132) Magpie composition fingerprints (unscaled); NaN rows where none was computed."""
    density: np.ndarray
    """(N,) density in g/cm^3 (NaN where the structure did not parse)."""
    n_elements: np.ndarray
    """(N,) number of distinct elements."""
    n_atoms: np.ndarray
    """(N,) sites in the cell."""
    errors: list[str | None] = field(default_factory=list)
    """Per row: why no fingerprint (``parse_failed``, ``timeout``, ``fingerprint_failed: ...``) or None."""

    @property
    def ok(self) -> np.ndarray:
        """(N,) rows with both fingerprints."""
        return ~(np.isnan(self.struct).all(axis=1) | np.isnan(self.comp).all(axis=1))

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, mask: np.ndarray) -> Fingerprints:
        idx = np.flatnonzero(mask)
        return Fingerprints([self.names[i] for i in idx], self.struct[idx], self.comp[idx], self.density[idx],
                            self.n_elements[idx], self.n_atoms[idx], [self.errors[i] for i in idx])

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, names=np.array(self.names, dtype=str), struct=self.struct, comp=self.comp,
                            density=self.density, n_elements=self.n_elements, n_atoms=self.n_atoms,
                            errors=np.array([e or "" for e in self.errors], dtype=str))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Fingerprints:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["names"].tolist(), z["struct"], z["comp"], z["density"], z["n_elements"], z["n_atoms"],
                       [e or None for e in z["errors"].tolist()])


_FEATURIZERS: tuple[Any, Any] | None = None
_N_STRUCT, _N_COMP = 61, 132


def _featurizers() -> tuple[Any, Any]:
    global _FEATURIZERS
    if _FEATURIZERS is None:
        from matminer.featurizers.composition import ElementProperty
        from matminer.featurizers.site import CrystalNNFingerprint

        _FEATURIZERS = (CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie"))
    return _FEATURIZERS


def fingerprint_one(cif: str) -> dict:
    """Fingerprints and descriptors of one CIF (a full CIF, or CrystaLLM's semi-symmetrized form).

    Returns:
        ``{"struct": list | None, "comp": list | None, "density", "n_elements", "n_atoms", "error"}``.
    """
    from engine.evaluate.metrics import _load_cif

    out: dict[str, Any] = {"struct": None, "comp": None, "density": math.nan, "n_elements": math.nan,
                           "n_atoms": math.nan, "error": None}
    structure = _load_cif(cif) if isinstance(cif, str) else None
    if structure is None:
        out["error"] = "parse_failed"
        return out
    out.update(density=float(structure.density), n_elements=len(structure.composition.elements),
               n_atoms=len(structure))
    site_fp, comp_fp = _featurizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["comp"] = [float(v) for v in comp_fp.featurize(structure.composition)]
            out["struct"] = np.mean([site_fp.featurize(structure, i) for i in range(len(structure))],
                                    axis=0).tolist()
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:  # CDVAE counts such a crystal as invalid
            out["struct"] = None
            out["error"] = f"fingerprint_failed: {type(exc).__name__}: {exc}"[:300]
    return out


def _fingerprint_task(cif: str) -> dict:
    return fingerprint_one(cif)


def fingerprint_cifs(
    items: Sequence[tuple[str, str | None]],
    *,
    workers: int | None = None,
    timeout_s: float | None = 60.0,
    progress: Callable[[int, int], None] | None = None,
) -> Fingerprints:
    """Fingerprint ``(name, cif)`` pairs in killable, time-boxed worker processes (None CIFs get no fingerprint).

    Args:
        items: names and CIF texts; a None text is a sample that did not parse.
        workers: worker processes (default: CPU count).
        timeout_s: time box per structure in seconds; a structure over it gets the error ``timeout``.
        progress: ``progress(done, total)`` after each structure.
    """
    from engine.evaluate.evaluation import run_pool

    n = len(items)
    struct = np.full((n, _N_STRUCT), np.nan)
    comp = np.full((n, _N_COMP), np.nan)
    scalars = np.full((3, n), np.nan)
    errors: list[str | None] = ["parse_failed"] * n
    todo = [(i, cif) for i, (_, cif) in enumerate(items) if isinstance(cif, str)]
    if todo:
        _featurizers()  # loaded once here, inherited by forked workers
        rows = run_pool(_fingerprint_task, [(k, cif) for k, (_, cif) in enumerate(todo)],
                        max(1, workers or os.cpu_count() or 1), timeout_s, progress)
        for (i, _), row in zip(todo, rows):
            errors[i] = row.get("error") or row.get("failure_reason")
            if row.get("struct") is not None:
                struct[i] = row["struct"]
            if row.get("comp") is not None and row.get("struct") is not None:
                comp[i] = row["comp"]
            scalars[:, i] = [row.get(k, math.nan) if row.get(k) is not None else math.nan
                             for k in ("density", "n_elements", "n_atoms")]
    return Fingerprints([name for name, _ in items], struct, comp, scalars[0], scalars[1], scalars[2], errors)


# ----------------------------------------------------------------------------------------------------------------
# Reference sets


@dataclass
class Reference:
    """A reference set: its CIF texts, optional per-structure E_hull, and a label for reports."""

    label: str
    names: list[str]
    cifs: list[str]
    e_hull: np.ndarray | None = None
    """(N,) E_hull in eV/atom from the source's ``e_above_hull`` / ``e_hull`` column, or None."""

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for text in self.cifs:
            h.update(text.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


def load_reference(source: str | os.PathLike, *, limit: int | None = None, seed: int = 0) -> Reference:
    """Read a reference set: a CSV with a ``cif`` column, a folder / archive of CIFs, a .cif file, or a token
    dataset (a folder or a name under ``runs/data``; its validation split).

    Args:
        limit: keep at most this many structures, drawn at random with ``seed`` (the order is kept).

    Raises:
        InputError: the source does not exist, holds no CIF, or ``limit`` is not positive.
    """
    from engine.data.sources import read_source

    if limit is not None and limit < 1:
        raise InputError(f"reference limit {limit} must be at least 1 structure")
    text = str(source)
    path = Path(text).expanduser()
    e_hull = None
    if not path.exists() and "/" not in text and not text.endswith((".csv", ".cif")):
        from engine.data.datasets import resolve_dataset_dir

        path = resolve_dataset_dir(text)
    if path.is_dir() and (path / "val.bin").exists():
        from engine.data.tokens import iter_cifs, load_token_dataset

        cifs = list(iter_cifs(load_token_dataset(path), "val"))
        names = [f"val-{i}" for i in range(len(cifs))]
    else:
        if not path.exists():
            raise InputError(f"reference {source} does not exist: give a CSV with a 'cif' column (e.g. MP-20's "
                             "test.csv), a folder of CIFs or a dataset name under runs/data")
        items = [it for it in read_source(path) if it.text]
        names, cifs = [it.name for it in items], [it.text for it in items]
        for column in ("e_above_hull", "e_hull"):
            values = [(it.meta or {}).get(column) for it in items]
            if items and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                e_hull = np.asarray(values, dtype=float)
                break
    if not cifs:
        raise InputError(f"reference {source} holds no CIF text")
    if limit is not None and limit < len(cifs):
        keep = np.sort(np.random.default_rng(seed).choice(len(cifs), size=limit, replace=False))
        names, cifs = [names[i] for i in keep], [cifs[i] for i in keep]
        e_hull = e_hull[keep] if e_hull is not None else None
    label = f"{path.name if path.name else text} ({len(cifs)} structures" + (
        f", random subset, seed {seed})" if limit is not None and limit <= len(cifs) else ")")
    return Reference(label, names, cifs, e_hull)


def reference_fingerprints(reference: Reference, *, workers: int | None = None, timeout_s: float | None = 60.0,
                           cache: bool = True, progress: Callable[[int, int], None] | None = None) -> Fingerprints:
    """The reference set's fingerprints, read from the cache when the same CIF texts were fingerprinted before."""
    from engine.lab.settings import get_settings

    folder = get_settings().cache_dir / "fingerprints"
    path = folder / f"{reference.sha256}.npz"
    if cache and path.exists():
        return Fingerprints.load(path)
    fps = fingerprint_cifs(list(zip(reference.names, reference.cifs)), workers=workers, timeout_s=timeout_s,
                           progress=progress)
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        fps.save(path)
    return fps


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def composition_scaler(reference_comp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(means, stds) of the reference composition fingerprints; a zero or undefined spread becomes 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        means = np.nanmean(reference_comp, axis=0)
        stds = np.nanstd(reference_comp, axis=0)
    means = np.where(np.isfinite(means), means, 0.0)
    stds = np.where(np.isfinite(stds) & (stds > 1e-12), stds, 1.0)
    return means, stds


def _scale(comp: np.ndarray, scaler: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    scaled = (comp - scaler[0]) / scaler[1]
    return np.where(np.isnan(scaled), 0.0, scaled)  # CDVAE: replace_nan_token=0


def coverage(generated: Fingerprints, reference: Fingerprints, *, struct_cutoff: float, comp_cutoff: float,
             n_submitted: int | None = None,
             scaler: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float | None, float | None]:
    """(COV-R, COV-P) as CDVAE defines them (module docstring).

    Args:
        generated, reference: fingerprints; rows without a fingerprint are left out (and count as misses in COV-P).
        n_submitted: the denominator of COV-P (default: the rows of ``generated``).
        scaler: composition (means, stds) (default: `composition_scaler` of the reference).
    """
    from scipy.spatial.distance import cdist

    gen, ref = generated.subset(generated.ok), reference.subset(reference.ok)
    n_submitted = len(generated) if n_submitted is None else n_submitted
    if len(ref) == 0:
        return None, None
    if len(gen) == 0:
        return 0.0, (0.0 if n_submitted else None)
    scaler = scaler or composition_scaler(ref.comp)
    struct_d = cdist(gen.struct, ref.struct)  # (G, R)
    comp_d = cdist(_scale(gen.comp, scaler), _scale(ref.comp, scaler))  # (G, R)
    recall = (struct_d.min(axis=0) <= struct_cutoff) & (comp_d.min(axis=0) <= comp_cutoff)
    precision = (struct_d.min(axis=1) <= struct_cutoff) & (comp_d.min(axis=1) <= comp_cutoff)
    return float(recall.mean()), (float(precision.sum()) / n_submitted if n_submitted else None)


def wasserstein(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float | None:
    """``scipy.stats.wasserstein_distance`` of the finite values of ``a`` and ``b`` (None when either is empty)."""
    from scipy.stats import wasserstein_distance

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return None
    return float(wasserstein_distance(a, b))


def diversity(fps: Fingerprints, scaler: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float | None,
                                                                                               float | None]:
    """(structural, compositional) mean pairwise Euclidean distance among fingerprinted rows (None below 2)."""
    from scipy.spatial.distance import pdist

    ok = fps.subset(fps.ok)
    if len(ok) < 2:
        return None, None
    scaler = scaler or composition_scaler(ok.comp)
    return float(pdist(ok.struct).mean()), float(pdist(_scale(ok.comp, scaler)).mean())


def resolve_cutoffs(cutoffs: str | tuple[float, float] | None) -> tuple[float, float]:
    """A preset name (mp20, perov5, carbon24) or a (structural, compositional) pair.

    Raises:
        InputError: unknown preset, or a cutoff that is not a positive number.
    """
    cutoffs = DEFAULT_CUTOFFS if cutoffs is None else cutoffs
    given = cutoffs
    if isinstance(cutoffs, str):
        key = cutoffs.lower().replace("-", "").replace("_", "")
        if key in CUTOFFS:
            return CUTOFFS[key]
        try:
            cutoffs = tuple(float(v) for v in cutoffs.split(","))
        except ValueError:
            cutoffs = ()
    if len(cutoffs) != 2:
        raise InputError(f"COV cutoffs {given!r}: give a preset (mp20, perov5, carbon24) or two numbers "
                         "STRUCT,COMP such as 0.4,10")
    s, c = (float(v) for v in cutoffs)
    if not (math.isfinite(s) and math.isfinite(c) and s > 0 and c > 0):
        raise InputError(f"COV cutoffs {s}, {c} must be positive numbers (structural, compositional)")
    return s, c


def distribution_metrics(
    generated: Fingerprints,
    reference: Fingerprints,
    *,
    reference_label: str,
    cutoffs: str | tuple[float, float] | None = None,
    n_submitted: int | None = None,
    valid_mask: np.ndarray | None = None,
    e_hull: np.ndarray | None = None,
    reference_e_hull: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Every distribution metric, each as ``{"value": ..., "definition": ...}`` (`DISTRIBUTION_DEFINITIONS`).

    Args:
        generated: fingerprints of the generated samples (one row per sample, unparsed ones included).
        reference: fingerprints of the reference set.
        reference_label: names the reference set in the result.
        cutoffs: `resolve_cutoffs` input (default MP-20's 0.4 / 10).
        n_submitted: all submitted samples, the COV-P denominator (default: rows of ``generated``).
        valid_mask: (N,) CDVAE-valid generated rows, used for the Wasserstein distances (default: parsed rows).
        e_hull, reference_e_hull: E_hull values (eV/atom) for ``wdist_e_hull``.
    """
    struct_cutoff, comp_cutoff = resolve_cutoffs(cutoffs)
    scaler = composition_scaler(reference.subset(reference.ok).comp) if reference.ok.any() else None
    recall, precision = coverage(generated, reference, struct_cutoff=struct_cutoff, comp_cutoff=comp_cutoff,
                                 n_submitted=n_submitted, scaler=scaler)
    mask = np.isfinite(generated.density) if valid_mask is None else np.asarray(valid_mask, dtype=bool)
    div_s, div_c = diversity(generated, scaler)
    values = {
        "cov_recall": recall, "cov_precision": precision,
        "wdist_density": wasserstein(generated.density[mask], reference.density),
        "wdist_n_elements": wasserstein(generated.n_elements[mask], reference.n_elements),
        "wdist_e_hull": (wasserstein(e_hull, reference_e_hull)
                         if e_hull is not None and reference_e_hull is not None else None),
        "diversity_struct": div_s, "diversity_comp": div_c,
        "n_reference": int(reference.ok.sum()), "n_fingerprinted": int(generated.ok.sum()),
        "cov_cutoffs": {"struct": struct_cutoff, "comp": comp_cutoff},
        "scaler": SCALER_NOTE, "reference": reference_label,
    }
    return {k: {"value": values[k], "definition": DISTRIBUTION_DEFINITIONS[k]} for k in DISTRIBUTION_DEFINITIONS}


def _true(series: pd.Series) -> np.ndarray:
    return series.map(lambda v: v is True or v == True).to_numpy(dtype=bool)  # noqa: E712


def evaluate_distribution(
    df: pd.DataFrame,
    reference: Reference | str | os.PathLike,
    *,
    cutoffs: str | tuple[float, float] | None = None,
    stability: pd.DataFrame | None = None,
    workers: int | None = None,
    timeout_s: float | None = 60.0,
    reference_limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Distribution metrics of an evaluation table (`engine.evaluate.evaluation.evaluate_texts`) against a reference.

    Generated rows that parsed and were analysed are fingerprinted (``processed_cif``); the Wasserstein distances of
    density and number of elements use the CDVAE-valid rows (``cdvae_struct_valid`` and ``smact_valid``); the E_hull
    distance uses ``stability`` (a ``stability.csv`` table) when given and the reference carries E_hull values.
    """
    ref = reference if isinstance(reference, Reference) else load_reference(reference, limit=reference_limit)
    ref_fps = reference_fingerprints(ref, workers=workers, timeout_s=timeout_s)
    n = len(df)
    analysed = (_true(df["parse_ok"]) & df["failure_reason"].isna().to_numpy()) if n else np.zeros(0, bool)
    items = [(str(df["file"].iloc[i]),
              df["processed_cif"].iloc[i] if analysed[i] and isinstance(df["processed_cif"].iloc[i], str) else None)
             for i in range(n)]
    gen = fingerprint_cifs(items, workers=workers, timeout_s=timeout_s, progress=progress)
    valid = (_true(df["cdvae_struct_valid"]) & _true(df["smact_valid"])) if n else np.zeros(0, bool)
    e_hull = None
    if stability is not None and "e_hull" in stability:
        e_hull = pd.to_numeric(stability["e_hull"], errors="coerce").to_numpy(dtype=float)
    return distribution_metrics(gen, ref_fps, reference_label=ref.label, cutoffs=cutoffs, n_submitted=n,
                                valid_mask=valid, e_hull=e_hull, reference_e_hull=ref.e_hull)


def reference_descriptors(reference: Reference) -> pd.DataFrame:
    """Density (g/cm^3), atoms per cell and number of elements of every parsable reference structure (no
    fingerprints: milliseconds each), cached under ``Settings.cache_dir / "fingerprints"`` like the fingerprints."""
    from engine.evaluate.metrics import _load_cif
    from engine.lab.settings import get_settings

    path = get_settings().cache_dir / "fingerprints" / f"{reference.sha256}-descriptors.csv"
    if path.exists():
        return pd.read_csv(path)
    rows = []
    for name, cif in zip(reference.names, reference.cifs):
        s = _load_cif(cif)
        if s is not None:
            rows.append({"name": name, "density": float(s.density), "n_atoms": len(s),
                         "n_elements": len(s.composition.elements)})
    df = pd.DataFrame(rows, columns=["name", "density", "n_atoms", "n_elements"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, df.to_csv(index=False))
    return df

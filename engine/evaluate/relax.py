"""Single-point energy and relaxation of one structure with a machine-learned potential, time-boxed in a pool.

`relax_one` takes CIF text and returns one row (`RELAX_FIELDS`): the energy per atom on the MP2020-corrected
footing (see `engine.evaluate.potentials`), the relaxed structure, steps, convergence, final max force, volume
change, RMSD, or a ``failure_reason`` saying why there is no energy. Structures are screened before any
potential call: ``parse_failed``, ``disordered`` (partial occupancies), ``too_large`` (more than ``max_sites``
sites), ``absurd_cell`` (volume per atom outside 1-500 Å^3), ``element_unsupported`` (the detail names the
elements), ``overlapping_atoms`` (two atoms closer than 0.5 Å, CDVAE's structural-validity bound). After
relaxation: ``exploded`` (non-finite or absurd energy, volume changed more than 4x, or atoms collapsed) and
``not_converged`` (the step limit was reached: the energy is kept and is an upper bound of the local minimum's).

`relax_many` runs rows in the killable, time-boxed worker pool of `engine.evaluate.evaluation.run_pool` (a
structure over its time box gets ``timeout``); the potential is loaded once in the parent on CPU and inherited
by the forked workers (one torch thread each), or loaded by the single worker on a GPU.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from engine.evaluate.potentials import Potential, load_potential, pin_threads, resolve_device

RELAX_FIELDS = (
    "formula", "n_sites", "energy_per_atom", "raw_energy_per_atom", "initial_energy_per_atom", "relaxed",
    "converged", "steps", "final_fmax", "volume_change", "rmsd", "seconds", "relaxed_cif", "failure_reason",
    "failure_detail",
)  # fmt: skip
"""Columns of a relaxation row. Energies in eV/atom, ``final_fmax`` in eV/Å, ``rmsd`` in Å, ``seconds`` wall."""

OPTIMIZERS = ("FIRE", "BFGS")
MIN_DISTANCE_A = 0.5
"""Closest allowed pair distance (Å) before relaxation, as in CDVAE's structural validity."""
VOLUME_PER_ATOM_A3 = (1.0, 500.0)
"""Volume per atom (Å^3) outside which a cell is absurd and not sent to the potential."""
EXPLODED_VOLUME_RATIO = 4.0
"""A relaxation that changes the volume by more than this factor (either way) has exploded."""
MIN_ENERGY_PER_ATOM = -15.0
"""No known crystal lies below about -13 eV/atom on the MP footing; lower means the potential broke down."""


def empty_row() -> dict:
    return {k: None for k in RELAX_FIELDS}


def _fail(row: dict, reason: str, detail: str) -> dict:
    row.update(failure_reason=reason, failure_detail=detail)
    return row


def parse_structure(cif: str) -> Any:
    """A pymatgen Structure from CIF text (occupancy tolerance as pymatgen's default); raises ValueError."""
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(cif, fmt="cif")


def screen(structure: Any, potential: Potential | None, max_sites: int) -> tuple[str, str] | None:
    """``(reason, detail)`` when the structure must not reach the potential, else None."""
    if not structure.is_ordered:
        return "disordered", "partial occupancies; the potentials need one element per site"
    n = len(structure)
    if n == 0:
        return "parse_failed", "the CIF holds no sites"
    if n > max_sites:
        return "too_large", f"{n} sites, more than the limit of {max_sites}"
    v = structure.volume / n
    if not (VOLUME_PER_ATOM_A3[0] <= v <= VOLUME_PER_ATOM_A3[1]):
        return "absurd_cell", f"volume per atom {v:.3g} Å^3 is outside {VOLUME_PER_ATOM_A3[0]}-{VOLUME_PER_ATOM_A3[1]}"
    if potential is not None:
        missing = potential.unsupported([el.symbol for el in structure.composition.elements])
        if missing:
            return "element_unsupported", f"{potential.name} does not know {', '.join(missing)}"
    if n > 1:
        dist = structure.distance_matrix
        np.fill_diagonal(dist, np.inf)
        closest = float(dist.min())
        if closest < MIN_DISTANCE_A:
            return "overlapping_atoms", f"two atoms are {closest:.2f} Å apart (< {MIN_DISTANCE_A} Å)"
    elif min(structure.lattice.abc) < MIN_DISTANCE_A:
        return "overlapping_atoms", f"a lattice vector is shorter than {MIN_DISTANCE_A} Å"
    return None


def _rmsd(initial: Any, final: Any) -> float:
    """RMS displacement (Å) of the atoms, in fractional coordinates wrapped to the nearest image, net
    translation removed, measured with the relaxed lattice; cell change is reported as volume change instead."""
    d = np.asarray(final.frac_coords) - np.asarray(initial.frac_coords)
    d -= np.round(d)
    d -= d.mean(axis=0)
    cart = d @ final.lattice.matrix
    return float(np.sqrt((cart**2).sum(axis=1).mean()))


def relax_one(
    cif: str,
    potential: Potential,
    *,
    relax: bool = True,
    fmax: float = 0.1,
    steps: int = 500,
    optimizer: str = "FIRE",
    max_sites: int = 200,
) -> dict:
    """Single point and (when ``relax``) relaxation of one CIF; a row of `RELAX_FIELDS`.

    Args:
        cif: CIF text.
        potential: a loaded `Potential`.
        relax: relax positions and cell (``FrechetCellFilter``) or only compute the single-point energy.
        fmax: force convergence threshold, eV/Å (cell degrees of freedom included, as ASE's filter scales them).
        steps: optimizer step limit.
        optimizer: ``FIRE`` or ``BFGS`` (ASE's).
        max_sites: larger structures are rejected as ``too_large``.
    """
    from pymatgen.io.ase import AseAtomsAdaptor

    row = empty_row()
    t0 = time.perf_counter()
    try:
        structure = parse_structure(cif)
    except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
        return _fail(row, "parse_failed", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    row.update(formula=structure.composition.reduced_formula, n_sites=len(structure))
    problem = screen(structure, potential, max_sites)
    if problem:
        return _fail(row, *problem)
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = potential.calculator
    n = len(atoms)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e0 = float(atoms.get_potential_energy())
            row["initial_energy_per_atom"] = e0 / n
            converged, nsteps = None, 0
            if relax:
                from ase.filters import FrechetCellFilter
                from ase.optimize import BFGS, FIRE

                target = FrechetCellFilter(atoms)
                opt = (FIRE if optimizer.upper() == "FIRE" else BFGS)(target, logfile=None)
                converged = bool(opt.run(fmax=fmax, steps=steps))
                nsteps = int(opt.nsteps)
                forces = target.get_forces()
            else:
                forces = atoms.get_forces()
            energy = float(atoms.get_potential_energy())
    except Exception as exc:  # noqa: BLE001 - any failure inside the potential becomes this row's reason
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return _fail(row, "calculator_error", f"{type(exc).__name__}: {first}")
    final = AseAtomsAdaptor.get_structure(atoms)
    row.update(
        relaxed=relax, converged=converged, steps=nsteps, raw_energy_per_atom=energy / n,
        final_fmax=float(np.sqrt((forces**2).sum(axis=1).max())) if len(forces) else 0.0,
        volume_change=final.volume / structure.volume - 1.0, rmsd=_rmsd(structure, final),
        seconds=time.perf_counter() - t0,
    )
    ratio = final.volume / structure.volume
    if not math.isfinite(energy) or energy / n < MIN_ENERGY_PER_ATOM:
        return _fail(row, "exploded", f"energy {energy / n:.3g} eV/atom is not physical")
    if not (1 / EXPLODED_VOLUME_RATIO <= ratio <= EXPLODED_VOLUME_RATIO):
        return _fail(row, "exploded", f"the volume changed by a factor {ratio:.3g}")
    if relax and n > 1:
        dist = final.distance_matrix
        np.fill_diagonal(dist, np.inf)
        if float(dist.min()) < MIN_DISTANCE_A:
            return _fail(row, "exploded", f"atoms collapsed to {float(dist.min()):.2f} Å apart")
    row["energy_per_atom"] = potential.corrected_energy(final, energy) / n
    if relax:
        row["relaxed_cif"] = final.to(fmt="cif")
    if relax and not converged:
        detail = f"max force {row['final_fmax']:.3f} eV/Å after {nsteps} steps (fmax {fmax})"
        return _fail(row, "not_converged", detail)
    return row


# ----------------------------------------------------------------------------------------------------------------
# The pool: one potential per worker process.

_STATE: dict[str, Any] = {}
"""The potential of this process (inherited by forked workers): ``{"potential": Potential}``."""


def get_potential(name: str, device: str | None = "auto") -> Potential:
    """The potential ``name`` on ``device``, loaded once per process and kept."""
    pot = _STATE.get("potential")
    dev = resolve_device(device)
    if pot is None or pot.name != name or pot.device != dev:
        if dev == "cpu":
            pin_threads(1)
        pot = _STATE["potential"] = load_potential(name, dev)
    return pot


_WARMUP = "data_NaCl\n_cell_length_a 3.99\n_cell_length_b 3.99\n_cell_length_c 3.99\n_cell_angle_alpha 60\n" \
    "_cell_angle_beta 60\n_cell_angle_gamma 60\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n" \
    "_atom_site_type_symbol\n_atom_site_label\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n" \
    "_atom_site_occupancy\nNa Na0 0 0 0 1\nCl Cl1 0.5 0.5 0.5 1\n"


def _init_worker(name: str, device: str) -> None:
    if device == "cpu":
        pin_threads(1)
    relax_one(_WARMUP, get_potential(name, device), relax=False)  # first-call costs outside the time box


def _relax_task(cif: str, name: str, device: str, kwargs: dict) -> dict:
    return relax_one(cif, get_potential(name, device), **kwargs)


def relax_many(
    cifs: Sequence[str],
    potential: str,
    *,
    device: str | None = "auto",
    workers: int | None = None,
    timeout_s: float | None = 120.0,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> list[dict]:
    """`relax_one` for every CIF in killable time-boxed workers; rows in input order.

    Args:
        cifs: CIF texts.
        potential: a potential name (`engine.evaluate.potentials.POTENTIALS`).
        device: ``auto``, ``cpu`` or ``cuda``. On CPU the potential is loaded here once (one torch thread) and the
            forked workers share it; on a GPU one worker loads it there (CUDA does not survive a fork).
        workers: worker processes (default: CPU count on CPU, 1 on a GPU).
        timeout_s: time box per structure, seconds (a structure over it gets ``failure_reason="timeout"``).
        progress: ``progress(done, total)`` after each structure.
        kwargs: passed to `relax_one` (``relax``, ``fmax``, ``steps``, ``optimizer``, ``max_sites``).
    """
    import os

    from engine.evaluate.evaluation import run_pool

    if not cifs:
        return []
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # ask NVML, so this process never initialises CUDA
    dev = resolve_device(device)
    if dev == "cpu":
        get_potential(potential, dev)
        workers = max(1, workers or os.cpu_count() or 1)
    else:
        workers = 1
    tasks = [(i, cif, potential, dev, kwargs) for i, cif in enumerate(cifs)]
    rows = run_pool(_relax_task, tasks, workers, timeout_s, progress, init=partial(_init_worker, potential, dev))
    out = []
    for row in rows:
        if set(row) - set(RELAX_FIELDS):  # a timeout / crash row from the pool
            row = {**empty_row(), "failure_reason": row.get("failure_reason"),
                   "failure_detail": row.get("failure_detail")}
        out.append(row)
    return out

"""Machine-learned interatomic potentials whose PyPI wheels carry their weights: one small chooser.

``load_potential(name, device)`` returns a `Potential` for ``chgnet`` (CHGNet 0.3.0), ``sevennet-0``
(SevenNet-0, 11Jul2024) or ``sevennet-l3i5`` (SevenNet-l3i5). Nothing is downloaded: each library loads the
weights shipped inside its wheel. The `Potential` hands out the library's own ASE calculator (for relaxation) and a
batched single-point path through the library's own batching (CHGNet ``predict_structure``; SevenNet's graph
batches as in ``sevenn.scripts.inference``).

Energy footing. The hulls and formation energies of the lab live in the Materials Project's MP2020-corrected
energy space (MP-20's ``formation_energy_per_atom`` is). CHGNet was trained on MPtrj's corrected energies, so its
energies already carry the corrections; the SevenNet models were trained on raw (uncorrected) MPtrj energies, so
`Potential.corrected_energy` applies `MaterialsProject2020Compatibility` to them (GGA+U parameters as MP would
have chosen them). ``bench/stability.py`` measures both footings against DFT; see BENCHMARKS.md.

Threads: on CPU the caller pins torch to one thread per worker process (`pin_threads`); more threads on a shared
2-core machine made an 8-atom relaxation 20-60x slower.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

from engine.lab.errors import ConfigError, InputError

POTENTIALS: dict[str, str] = {
    "chgnet": "CHGNet 0.3.0 (chgnet wheel); energies carry MP2020 corrections; matbench-discovery F1 0.613",
    "sevennet-0": "SevenNet-0 11Jul2024 (sevenn wheel); raw MPtrj energies, MP2020 applied; F1 0.724",
    "sevennet-l3i5": "SevenNet-l3i5 (sevenn wheel); raw MPtrj energies, MP2020 applied; F1 0.760",
}
"""Potential name -> one-line description (what it is, energy footing, published matbench-discovery F1)."""

_SEVENNET_MODELS = {"sevennet-0": "7net-0", "sevennet-l3i5": "7net-l3i5"}
_APPLY_MP2020 = {"chgnet": False, "sevennet-0": True, "sevennet-l3i5": True}

# U values (eV) MP applies in oxides and fluorides (MPRelaxSet); MP2020 corrections depend on them.
_MP_U = {"Co": 3.32, "Cr": 3.7, "Fe": 5.3, "Mn": 3.9, "Mo": 4.38, "Ni": 6.2, "V": 3.25, "W": 6.2}


def pin_threads(n: int = 1) -> None:
    """Pin torch (and OpenMP libraries loaded later) to ``n`` threads in this process."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def resolve_device(device: str | None) -> str:
    """``auto`` (or None) -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu`` / ``cuda`` pass through.

    Raises:
        ConfigError: another value, or ``cuda`` without a GPU.
    """
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no GPU: use --device cpu or auto")
    return device


def check_name(name: str) -> str:
    """The canonical potential name (case-insensitive, ``_`` as ``-``).

    Raises:
        ConfigError: not one of `POTENTIALS`, naming the choices.
    """
    key = (name or "").strip().lower().replace("_", "-")
    if key not in POTENTIALS:
        raise ConfigError(f"unknown potential {name!r}: choose one of {', '.join(POTENTIALS)}")
    return key


@dataclass
class Potential:
    """A loaded potential: its ASE calculator, the elements it knows and its energy footing."""

    name: str
    """Canonical name (a key of `POTENTIALS`)."""
    device: str
    """``cpu`` or ``cuda``."""
    calculator: Any
    """The library's own ASE calculator (energy in eV, forces in eV/Å, stress in eV/Å^3)."""
    elements: frozenset[str]
    """Element symbols the model was trained on; structures with others are rejected (``element_unsupported``)."""
    apply_mp2020: bool
    """Whether `corrected_energy` applies MP2020 corrections (False: the raw energies already carry them)."""
    _model: Any = field(default=None, repr=False)

    def unsupported(self, symbols: Sequence[str]) -> list[str]:
        """The symbols among ``symbols`` this potential does not know, sorted."""
        return sorted(set(symbols) - self.elements)

    def single_points(self, structures: Sequence[Any], batch_size: int = 16) -> list[float]:
        """Raw total energies (eV) of pymatgen structures, batched through the library's own batching."""
        if not structures:
            return []
        if self.name == "chgnet":
            preds = self._model.predict_structure(list(structures), task="e", batch_size=batch_size)
            preds = [preds] if isinstance(preds, dict) else preds
            return [float(p["e"]) * len(s) for p, s in zip(preds, structures)]
        return self._sevennet_batch(structures, batch_size)

    def _sevennet_batch(self, structures: Sequence[Any], batch_size: int) -> list[float]:
        import sevenn._keys as KEY
        from pymatgen.io.ase import AseAtomsAdaptor
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.loader import DataLoader

        cutoff = self.calculator.cutoff
        graphs = [
            AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(AseAtomsAdaptor.get_atoms(s), cutoff))
            for s in structures
        ]
        model = self.calculator.model
        energies: list[float] = []
        model.set_is_batch_data(True)
        try:
            for batch in DataLoader(graphs, batch_size, shuffle=False):
                out = model(batch.to(self.device))
                energies += [float(e) for e in out[KEY.PRED_TOTAL_ENERGY].detach().cpu().reshape(-1)]
        finally:
            model.set_is_batch_data(False)
        return energies

    def corrected_energy(self, structure: Any, energy: float) -> float:
        """Total energy (eV) on the MP2020-corrected footing: ``energy`` itself, or with MP2020 applied."""
        if not self.apply_mp2020:
            return energy
        return mp2020_corrected(structure, energy)


def mp2020_corrected(structure: Any, energy: float) -> float:
    """``energy`` (raw GGA/GGA+U-like, eV) plus the MP2020 corrections MP would apply to this structure.

    The run type follows MP's rule: GGA+U when the structure holds O or F and one of the U elements (with MP's U
    values), GGA otherwise. POTCAR checks are off (there is no calculation). An entry the scheme rejects (e.g. a
    composition it cannot assign oxidation states to) keeps its energy.
    """
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    symbols = {el.symbol for el in structure.composition.elements}
    plus_u = bool(symbols & {"O", "F"}) and bool(symbols & set(_MP_U))
    hubbards = {el: _MP_U[el] for el in symbols if el in _MP_U} if plus_u else {}
    entry = ComputedStructureEntry(
        structure, energy,
        parameters={"run_type": "GGA+U" if plus_u else "GGA", "is_hubbard": plus_u, "hubbards": hubbards},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed = _compat().process_entry(entry, clean=True)
    return float(processed.energy) if processed is not None else float(energy)


@lru_cache(maxsize=1)
def _compat() -> Any:
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    return MaterialsProject2020Compatibility(check_potcar=False)


def load_potential(name: str, device: str | None = "auto") -> Potential:
    """Load a potential from the weights inside its wheel.

    Args:
        name: one of `POTENTIALS` (case-insensitive).
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        ConfigError: unknown name or device.
        InputError: the library is missing or its weights do not load (one line saying why).
    """
    key = check_name(name)
    dev = resolve_device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if key == "chgnet":
                from chgnet.model import CHGNet
                from chgnet.model.dynamics import CHGNetCalculator

                model = CHGNet.load(model_name="0.3.0", use_device=dev, verbose=False)
                calc = CHGNetCalculator(model=model, use_device=dev)
                from pymatgen.core import Element

                elements = frozenset(Element.from_Z(z).symbol for z in range(1, 95))
                return Potential(key, dev, calc, elements, _APPLY_MP2020[key], model)
            from sevenn.calculator import SevenNetCalculator

            calc = SevenNetCalculator(_SEVENNET_MODELS[key], device=dev)
            elements = frozenset(calc.sevennet_config["chemical_species"])
            return Potential(key, dev, calc, elements, _APPLY_MP2020[key], calc.model)
        except ImportError as exc:
            raise InputError(f"potential {key} cannot load: {exc} (install the project's dependencies: uv sync)")
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"potential {key} cannot load its packaged weights: {first}") from exc

"""Scorers for scored decoding (`engine.sample.mcts`): one number per crystal, LOWER IS BETTER, computed in-process.

- ``ehull``: E_hull in eV/atom of the generated (unrelaxed) structure: a single-point energy from an ML potential
  (CHGNet by default, the hull's own potential when it names one), on the MP2020-corrected footing, against a
  saved hull (`engine.evaluate.hull`, built with ``crystallab hull build``). Reward reference: 0 (on the hull).
- ``energy``: the same corrected energy in eV/atom, no hull. Reward reference: the first valid crystal's score.
- ``random``: a uniform number in [0, 1) from a generator seeded once (the control, and the tests' scorer);
  calls in the same order give the same numbers. Reward reference: 0.5.
- ``module.path:function``: the user's own Python callable, ``function(structure: pymatgen Structure) -> float``
  where lower is better; it must return a finite number. Reward reference: the first valid crystal's score.

A scorer that raises on one structure (or returns something that is not a finite number) fails for that crystal
only: the search records the failure and carries on (`ScoreFailure`). Problems known before the search (a module
that does not import, a hull without the prompt's elements, an unknown potential) are one-line `CrystallabError`s.

CrystaLLM scored with an ALIGNN server reached over a ZeroMQ socket; here the potential is loaded into the search's
own process (`engine.evaluate.relax.get_potential`, once per process) and a structure costs one forward pass.
"""

from __future__ import annotations

import importlib
import math
import random
from typing import Any, Callable, Sequence

from engine.lab.errors import ConfigError, InputError

BUILTIN = ("ehull", "energy", "random")


class ScoreFailure(Exception):
    """The scorer could not score one structure (the search records ``str(exc)`` and carries on)."""


class Scorer:
    """A scorer: ``scorer(structure) -> float``, lower is better."""

    name: str = "scorer"
    unit: str = ""
    reference: float | None = None
    """Score that earns reward 0.5; None: the first valid crystal's score (fixed from then on)."""

    def check_prompt(self, elements: Sequence[str]) -> None:
        """Refuse, before the search, a prompt this scorer cannot judge (one-line `CrystallabError`)."""

    def score(self, structure: Any) -> float:
        raise NotImplementedError

    def __call__(self, structure: Any) -> float:
        """The structure's score; raises `ScoreFailure` when it has none."""
        try:
            value = self.score(structure)
        except ScoreFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - any error of a scorer is that crystal's failure, recorded
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ScoreFailure(f"{type(exc).__name__}: {first}" if first else type(exc).__name__) from exc
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ScoreFailure(f"scorer {self.name} returned {value!r}, not a number") from None
        if not math.isfinite(value):
            raise ScoreFailure(f"scorer {self.name} returned {value}, not a finite number")
        return value

    def describe(self) -> dict:
        return {"scorer": self.name, "unit": self.unit, "lower_is_better": True, "reference": self.reference}


class RandomScorer(Scorer):
    """Uniform scores in [0, 1) from one seeded generator (deterministic for a seed and a call order)."""

    name, unit, reference = "random", "", 0.5

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def score(self, structure: Any) -> float:
        return self._rng.random()


class EnergyScorer(Scorer):
    """Single-point energy per atom (eV/atom, MP2020-corrected footing) from an ML potential."""

    name, unit = "energy", "eV/atom"

    def __init__(self, potential: str = "chgnet", device: str = "auto") -> None:
        from engine.evaluate.potentials import check_name

        self.potential_name, self.device = check_name(potential), device

    @property
    def potential(self) -> Any:
        """The loaded potential (loaded on first use, once per process)."""
        from engine.evaluate.relax import get_potential

        return get_potential(self.potential_name, self.device)

    def check_prompt(self, elements: Sequence[str]) -> None:
        missing = self.potential.unsupported(elements)
        if missing:
            raise InputError(f"potential {self.potential.name} does not know {', '.join(missing)}: choose another "
                             "potential or prompt")

    def energy_per_atom(self, structure: Any) -> float:
        (energy,) = self.potential.single_points([structure])
        return self.potential.corrected_energy(structure, energy) / len(structure)

    def score(self, structure: Any) -> float:
        return self.energy_per_atom(structure)

    def describe(self) -> dict:
        return {**super().describe(), "potential": self.potential_name}


class EHullScorer(EnergyScorer):
    """Energy above a saved hull (eV/atom) of the single-point energy."""

    name, unit, reference = "ehull", "eV/atom", 0.0

    def __init__(self, hull: Any, potential: str | None = None, device: str = "auto") -> None:
        self.hull = hull
        super().__init__(potential or hull.potential or "chgnet", device)

    def check_prompt(self, elements: Sequence[str]) -> None:
        missing = sorted(set(elements) - set(self.hull.elements))
        if missing:
            raise InputError(
                f"hull {self.hull.name} does not cover {', '.join(missing)} (it has {', '.join(self.hull.elements)}"
                "): build one that does with `crystallab hull build`, or use --scorer energy"
            )
        super().check_prompt(elements)

    def score(self, structure: Any) -> float:
        out = self.hull.evaluate(structure.composition.reduced_formula, self.energy_per_atom(structure))
        if out["e_hull"] is None:
            raise ScoreFailure(out["failure_detail"] or out["failure_reason"] or "no E_hull")
        return out["e_hull"]

    def describe(self) -> dict:
        return {**super().describe(), "hull": self.hull.name}


class CallableScorer(Scorer):
    """A user's ``module.path:function`` taking a pymatgen Structure and returning a float (lower is better)."""

    def __init__(self, spec: str) -> None:
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise ConfigError(f"scorer {spec!r} must be ehull, energy, random or module.path:function")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"scorer {spec!r}: module {module!r} cannot be imported ({exc}); check the name "
                              "and that it is on PYTHONPATH") from None
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise ConfigError(f"scorer {spec!r}: module {module!r} has no function {attr!r}")
        self.name, self.fn = spec, fn

    def score(self, structure: Any) -> float:
        return self.fn(structure)


def load_scorer(spec: str, *, hull: str | None = None, potential: str | None = None, seed: int = 1337,
                device: str = "auto") -> Scorer:
    """The scorer a ``--scorer`` value names (module docstring).

    Raises:
        ConfigError: an unknown scorer, a user module that does not import, ``ehull`` without a hull.
        InputError: a hull that is not found, a potential that does not load.
    """
    spec = (spec or "").strip()
    if spec == "random":
        return RandomScorer(seed)
    if spec == "energy":
        return EnergyScorer(potential or "chgnet", device)
    if spec == "ehull":
        if not hull:
            raise ConfigError("--scorer ehull needs --hull NAME (build one with `crystallab hull build`), or use "
                              "--scorer energy")
        from engine.evaluate.hull import load_hull

        return EHullScorer(load_hull(hull), potential, device)
    if ":" not in spec:
        raise ConfigError(f"scorer {spec!r} is not one of {', '.join(BUILTIN)} nor module.path:function")
    return CallableScorer(spec)


def as_scorer(obj: Scorer | Callable[[Any], float], name: str = "callable") -> Scorer:
    """A `Scorer` from a scorer or a plain function (tests, notebooks)."""
    if isinstance(obj, Scorer):
        return obj
    scorer = Scorer()
    scorer.name = name
    scorer.score = obj  # type: ignore[method-assign]
    return scorer

"""Sweep configs: the YAML mapping (`SweepConfig`), parsing and validation, and planning the cells of a sweep.

A sweep config is a YAML mapping (fields of `SweepConfig`; the seed experiments are ``configs/sweep_*.yaml``)::

    name: three_ckpts_na2cl2
    checkpoints:                  # label -> checkpoint file; relative paths are under the runs root
      small: pretrained/crystallm_v1_small/ckpt.pt
      nacl10: train/nacl_ft_small/ckpt/best.pt
    prompts: [Na2Cl2, {formula: NaCl, z: 4, spacegroup: Fm-3m}]
    temperatures: [0.8]
    top_k: [10]
    n: [200]
    seeds: [1]

A prompt is a cell composition as written on the ``data_`` line (``Na2Cl2``; ``MgO`` is a one-formula-unit cell),
or a mapping with ``formula`` (a reduced formula unit when ``z`` is given), ``z`` and ``spacegroup``; an empty
formula (``""``) is the unconditional prompt ``data_``.

Cells are named deterministically, ``<checkpoint>__<prompt>__T0.8_k10_p1.0_n100_s1``; `stale_reason` says why a
cell sampled earlier no longer matches its checkpoint or settings. Running a sweep is `engine.evaluate.sweeps`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from engine.crystal.prompts import Prompt, build_prompts, parse_formula_spec
from engine.lab.errors import ConfigError, InputError, PromptError
from engine.lab.settings import get_settings
from engine.lab.yamlfiles import parse_key_value, read_yaml_mapping

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_LIST_KEYS = ("temperatures", "top_k", "top_p", "n", "seeds")


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep samples and how; written resolved to the sweep folder's ``sweep.yaml``."""

    name: str = "sweep"
    """Sweep name; the folder is ``runs/sweeps/<name>`` unless ``--out`` is given (letters, digits, ``._-``)."""
    description: str = ""
    """Free text shown at the top of ``summary.md``."""
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Label -> checkpoint file. Relative paths are under the runs root (``train/<run>/ckpt/best.pt``)."""
    prompts: tuple[dict[str, Any], ...] = ()
    """Prompts: a cell composition (``Na2Cl2``) or ``{formula, z, spacegroup}``; ``""`` is unconditional."""
    temperatures: tuple[float, ...] = (0.8,)
    """Softmax temperatures (0 = greedy)."""
    top_k: tuple[int, ...] = (10,)
    """Top-k filters (0 = off)."""
    top_p: tuple[float, ...] = (1.0,)
    """Nucleus (top-p) filters, in (0, 1] (1 = off)."""
    n: tuple[int, ...] = (100,)
    """Samples per cell."""
    seeds: tuple[int, ...] = (1337,)
    """Sampling seeds; each seed is its own cell (same seed, same samples)."""
    max_new_tokens: int = 3000
    """Token budget per sample."""
    batch_size: int | None = None
    """Rows decoded together (None: the sampler's default, capped at n)."""
    constrain: bool = True
    """Restrict element tokens to the prompt's elements and the H-M token to space-group symbols."""
    knobs: dict[str, Any] = field(default_factory=dict)
    """Further sampling knobs by name (``engine.models.family``), given to each checkpoint whose model family has
    them (e.g. ``steps: 64`` for a masked-diffusion model). The temperature / top-k / top-p axes, max_new_tokens
    and constrain likewise apply to the families that have those knobs."""
    device: str = "auto"
    """``auto`` (CUDA when visible), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    eval_workers: int | None = None
    """Evaluator worker processes (None: one per CPU core)."""
    eval_timeout_s: float = 30.0
    """Time box per sample's checks, in seconds; a sample over it is recorded as ``timeout``."""
    train_dataset: str | None = None
    """Token dataset (name under ``runs/data/`` or a folder) whose training CIFs define novelty; None: no novelty."""
    overlap: bool = True
    """Evaluate each cell in the background while the next is sampled; false: one after the other (timing)."""
    reference: dict[str, Any] | None = None
    """Reference set for COV-R / COV-P and Wasserstein distances: a path (CSV with a cif column, CIF folder, dataset
    name) or ``{path, cutoffs: mp20 | perov5 | carbon24 | [STRUCT, COMP], limit: N}``; null: none."""
    stability: dict[str, str] | None = None
    """Stability pass of every cell: ``{potential: chgnet | sevennet-0 | sevennet-l3i5, hull: NAME}``; null: none."""

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready mapping (tuples as lists)."""
        d = asdict(self)
        for key in (*_LIST_KEYS, "prompts"):
            d[key] = list(d[key])
        return d


@dataclass(frozen=True)
class Cell:
    """One sample set of a sweep: a checkpoint, a prompt and one value of every sampling axis."""

    name: str
    checkpoint: str
    prompt: Prompt
    temperature: float
    top_k: int
    top_p: float
    n: int
    seed: int


def key_docs() -> dict[str, str]:
    """One-line description of every config key (for ``crystallab sweep --keys``)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(SweepConfig)).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Config: YAML + overrides -> validated SweepConfig


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _number(source: str, key: str, value: Any, kind: type) -> Any:
    """``value`` as an int or a finite float; strings such as ``1e-3`` (YAML reads them as text) are accepted."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, f"{key} must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise _fail(source, f"{key} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _axis(source: str, key: str, value: Any, kind: type) -> tuple:
    """A grid axis: one value, a YAML list, or comma-separated text (``--set temperatures=0.8,0.6``)."""
    if isinstance(value, str) and "," in value:
        value = [v for v in value.split(",") if v.strip()]
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise _fail(source, f"{key} is empty; give at least one value")
    out = tuple(_number(source, key, v, kind) for v in values)
    if len(set(out)) != len(out):
        raise _fail(source, f"{key} lists a value twice ({list(out)}); each value makes its own cells")
    return out


def _prompt_spec(source: str, i: int, value: Any) -> dict[str, Any]:
    if value is None or isinstance(value, str):
        return {"formula": (value or "").strip(), "z": None, "spacegroup": None}
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"formula", "z", "spacegroup"})
        if unknown:
            raise _fail(source, f"prompts[{i}] has unknown key(s) {unknown}; use formula, z and spacegroup")
        z = value.get("z")
        if z is not None:
            z = _number(source, f"prompts[{i}].z", z, int)
        sg = value.get("spacegroup")
        return {"formula": str(value.get("formula") or "").strip(), "z": z,
                "spacegroup": None if sg in (None, "") else str(sg).strip()}
    raise _fail(source, f"prompts[{i}] must be a formula (Na2Cl2) or a mapping {{formula, z, spacegroup}}, "
                        f"got {value!r}")


POTENTIALS = ("chgnet", "sevennet-0", "sevennet-l3i5")
"""Potential names a sweep's ``stability`` key accepts (issue 13; `engine.evaluate.potentials` loads them)."""


def _reference_spec(source: str, value: Any) -> dict[str, Any]:
    """``reference``: a path, or a mapping {path, cutoffs, limit}; cutoffs and limit are checked here."""
    from engine.evaluate.distribution import resolve_cutoffs

    spec = {"path": value} if isinstance(value, str) else value
    if not isinstance(spec, dict):
        raise _fail(source, f"reference must be a path or a mapping {{path, cutoffs, limit}}, got {value!r}")
    unknown = sorted(set(spec) - {"path", "cutoffs", "limit"})
    if unknown:
        raise _fail(source, f"reference has unknown key(s) {unknown}; use path, cutoffs and limit")
    if not isinstance(spec.get("path"), str) or not spec["path"].strip():
        raise _fail(source, "reference needs a path: a CSV with a 'cif' column, a folder of CIFs or a dataset name")
    cutoffs = spec.get("cutoffs") or "mp20"
    try:
        struct, comp = resolve_cutoffs(",".join(map(str, cutoffs)) if isinstance(cutoffs, (list, tuple))
                                       else str(cutoffs))
    except InputError as exc:
        raise _fail(source, f"reference.cutoffs: {exc}") from None
    limit = spec.get("limit")
    if limit is not None:
        limit = _number(source, "reference.limit", limit, int)
        if limit < 1:
            raise _fail(source, f"reference.limit must be at least 1 structure, got {limit}")
    return {"path": spec["path"].strip(), "cutoffs": [struct, comp], "limit": limit}


def _stability_spec(source: str, value: Any) -> dict[str, str]:
    """``stability``: a mapping {potential, hull}."""
    if not isinstance(value, dict):
        raise _fail(source, f"stability must be a mapping {{potential, hull}}, got {value!r}")
    unknown = sorted(set(value) - {"potential", "hull"})
    if unknown:
        raise _fail(source, f"stability has unknown key(s) {unknown}; use potential and hull")
    potential = str(value.get("potential") or "chgnet").strip().lower()
    if potential not in POTENTIALS:
        raise _fail(source, f"stability.potential {potential!r} is not one of {', '.join(POTENTIALS)}")
    hull = str(value.get("hull") or "").strip()
    if not _LABEL_RE.match(hull):
        raise _fail(source, f"stability.hull {hull!r} must name a hull built with `crystallab hull build` "
                            "(letters, digits, '.', '_' and '-')")
    return {"potential": potential, "hull": hull}


def resolve_reference_path(path: str) -> Path:
    """A reference path from a sweep config: absolute as given; relative to the working folder when it exists
    there, else under the runs root; a bare name that is neither may be a dataset name under ``runs/data``."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    under_runs = get_settings().runs_dir / p
    return under_runs if under_runs.exists() else p


def resolve_prompt(spec: dict[str, Any]) -> Prompt:
    """The one prompt a sweep prompt spec names (a formula without Z is the cell as written).

    Raises:
        PromptError: the formula, Z or space group cannot be expressed in the CrystaLLM vocabulary.
    """
    formula, z, sg = spec.get("formula") or None, spec.get("z"), spec.get("spacegroup")
    if formula and z is None:
        counts = parse_formula_spec(formula)
        if math.gcd(*counts.values()) == 1:
            z = 1  # build_prompts would try six Z values; a sweep prompt is exactly the cell written
    prompts = build_prompts(formula, z=z, spacegroup=sg)
    return prompts[0]


def config_from_dict(raw: Any, source: str = "sweep config") -> SweepConfig:
    """Build and validate a `SweepConfig` from a mapping (YAML document with overrides applied).

    Raises:
        ConfigError: unknown key (with close matches), wrong type or impossible value; the message names the key.
    """
    if not isinstance(raw, dict):
        raise _fail(source, f"must be a YAML mapping of key: value lines, got {type(raw).__name__}")
    known = [f.name for f in fields(SweepConfig)]
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
            parts.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise _fail(source, f"unknown key{'s' if len(parts) > 1 else ''} {', '.join(parts)}; "
                            "`crystallab sweep --keys` lists the keys")
    v: dict[str, Any] = {}
    for key in ("name", "description", "device"):
        if key in raw:
            if not isinstance(raw[key], (str, int, float)) or isinstance(raw[key], bool):
                raise _fail(source, f"{key} must be text, got {raw[key]!r}")
            v[key] = str(raw[key]).strip()
    for key, kind in (("temperatures", float), ("top_k", int), ("top_p", float), ("n", int), ("seeds", int)):
        if key in raw:
            v[key] = _axis(source, key, raw[key], kind)
    if "max_new_tokens" in raw:
        v["max_new_tokens"] = _number(source, "max_new_tokens", raw["max_new_tokens"], int)
    for key, kind in (("batch_size", int), ("eval_workers", int), ("eval_timeout_s", float)):
        if raw.get(key) is not None:
            v[key] = _number(source, key, raw[key], kind)
    for key in ("constrain", "overlap"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise _fail(source, f"{key} must be true or false, got {raw[key]!r}")
            v[key] = raw[key]
    if raw.get("knobs") is not None:
        if not isinstance(raw["knobs"], dict) or not all(isinstance(k, str) for k in raw["knobs"]):
            raise _fail(source, f"knobs must map knob names to values, e.g. knobs: {{steps: 64}}; got {raw['knobs']!r}")
        v["knobs"] = dict(raw["knobs"])
    if raw.get("train_dataset") not in (None, ""):
        v["train_dataset"] = str(raw["train_dataset"])
    if raw.get("reference") not in (None, ""):
        v["reference"] = _reference_spec(source, raw["reference"])
    if raw.get("stability") not in (None, ""):
        v["stability"] = _stability_spec(source, raw["stability"])
    ckpts = raw.get("checkpoints")
    if not isinstance(ckpts, dict) or not ckpts:
        raise _fail(source, "checkpoints must map at least one label to a checkpoint file, e.g. "
                            "checkpoints: {small: pretrained/crystallm_v1_small/ckpt.pt}")
    v["checkpoints"] = {str(k): str(p) for k, p in ckpts.items()}
    prompts = raw.get("prompts")
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise _fail(source, "prompts must list at least one prompt, e.g. prompts: [Na2Cl2, MgO]")
    v["prompts"] = tuple(_prompt_spec(source, i, p) for i, p in enumerate(prompts))
    return validate(SweepConfig(**v), source)


def validate(config: SweepConfig, source: str = "sweep config") -> SweepConfig:
    """Refuse impossible values; return the config when it is sound (checkpoint files are checked at run time)."""
    c = config
    if not _LABEL_RE.match(c.name):
        raise _fail(source, f"name {c.name!r} names a folder: use letters, digits, '.', '_' and '-'")
    for label, path in c.checkpoints.items():
        if not _LABEL_RE.match(label) or "__" in label:
            raise _fail(source, f"checkpoint label {label!r} is part of folder names: use letters, digits, "
                                "'.', '_' and '-' (no '__')")
        if not path.strip():
            raise _fail(source, f"checkpoint {label!r} has an empty path")
    if any(t < 0 for t in c.temperatures):
        raise _fail(source, f"temperatures must be >= 0 (0 = greedy), got {list(c.temperatures)}")
    if any(k < 0 for k in c.top_k):
        raise _fail(source, f"top_k must be >= 0 (0 = off), got {list(c.top_k)}")
    if any(not 0 < p <= 1 for p in c.top_p):
        raise _fail(source, f"top_p must be in (0, 1] (1 = off), got {list(c.top_p)}")
    if any(n < 1 for n in c.n):
        raise _fail(source, f"n must be at least 1 sample per cell, got {list(c.n)}")
    if c.max_new_tokens < 1:
        raise _fail(source, f"max_new_tokens must be at least 1, got {c.max_new_tokens}")
    for key in ("batch_size", "eval_workers"):
        if getattr(c, key) is not None and getattr(c, key) < 1:
            raise _fail(source, f"{key} must be at least 1 (or null for the default), got {getattr(c, key)}")
    if c.eval_timeout_s <= 0:
        raise _fail(source, f"eval_timeout_s must be positive seconds, got {c.eval_timeout_s}")
    if not _DEVICE_RE.match(c.device):
        raise _fail(source, f"device must be auto, cpu, cuda, cuda:N or mps, got {c.device!r}")
    slugs: dict[str, int] = {}
    for i, spec in enumerate(c.prompts):
        try:
            slug = prompt_slug(resolve_prompt(spec))
        except PromptError as exc:
            raise _fail(source, f"prompts[{i}] ({spec.get('formula') or 'unconditional'}): {exc}") from None
        if slug in slugs:
            raise _fail(source, f"prompts[{slugs[slug]}] and prompts[{i}] are the same prompt ({slug})")
        slugs[slug] = i
    return config


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (lists allowed: ``temperatures=[0.8,0.6]``).

    ``checkpoints.LABEL=PATH`` adds or replaces one checkpoint.
    """
    return parse_key_value(item, "n=20")


def load_sweep_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep YAML file, apply ``--set`` overrides in order, validate.

    Raises:
        ConfigError: missing file, not YAML, or a refused key/value (the message says which and what to do).
    """
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(path, "sweep config", "see configs/sweep_*.yaml")
    for item in overrides:
        key, value = parse_set(item)
        if key.startswith("checkpoints."):
            ckpts = dict(raw.get("checkpoints") or {})
            ckpts[key.split(".", 1)[1]] = value
            raw["checkpoints"] = ckpts
        else:
            raw[key] = value
    return config_from_dict(raw, source)


def dump_sweep_config(config: SweepConfig) -> str:
    """YAML text of a resolved config (what ``sweep.yaml`` holds); `load_sweep_config` reads it back."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------------------------------------------
# Cells


def prompt_slug(prompt: Prompt) -> str:
    """Folder-safe prompt name: ``Na2Cl2``, ``Na4Cl4_Fm-3m``, ``P2_1_c`` slashes as ``_``, ``unconditional``."""
    if prompt.formula is None:
        return "unconditional"
    return prompt.formula + (f"_{prompt.spacegroup.replace('/', '_')}" if prompt.spacegroup else "")


def cell_name(checkpoint: str, prompt: Prompt, temperature: float, top_k: int, top_p: float, n: int,
              seed: int) -> str:
    """``<checkpoint>__<prompt>__T0.8_k10_p1.0_n100_s1`` (floats in Python's shortest round-trip form)."""
    return (f"{checkpoint}__{prompt_slug(prompt)}__T{float(temperature)!r}_k{top_k}_p{float(top_p)!r}"
            f"_n{n}_s{seed}")


def plan_cells(config: SweepConfig) -> list[Cell]:
    """Every cell in run order: checkpoint outermost (each is loaded once), then prompt, T, k, p, n, seed."""
    prompts = [resolve_prompt(spec) for spec in config.prompts]
    cells = []
    for label in config.checkpoints:
        for prompt in prompts:
            for t in config.temperatures:
                for k in config.top_k:
                    for p in config.top_p:
                        for n in config.n:
                            for s in config.seeds:
                                cells.append(Cell(cell_name(label, prompt, t, k, p, n, s), label, prompt,
                                                  t, k, p, n, s))
    return cells


def resolve_checkpoint_path(path: str) -> Path:
    """A checkpoint path from a sweep config: absolute as given, relative under the runs root."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else get_settings().runs_dir / p).resolve()


def resolve_out_dir(out: str | os.PathLike | None, name: str) -> Path:
    """``--out`` (relative paths under ``runs/sweeps/``), or ``runs/sweeps/<name>``.

    Raises:
        InputError: the path, or a folder above it, is an existing file (a sweep folder cannot be made there).
    """
    root = get_settings().sweeps_dir
    if out is None:
        p = root / name
    else:
        p = Path(out).expanduser()
        p = p if p.is_absolute() else root / p
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "is a file" if q == p else f"lies under {q}, which is a file"
                raise InputError(f"sweep folder {p} {where}: give --out a folder (new, or a sweep to resume)")
            break
    return p


def cell_knobs(family: Any, cell: Cell, config: SweepConfig) -> dict[str, Any]:
    """The sampling knobs one cell asks of a checkpoint's model family (its defaults where the sweep is silent).

    Raises:
        ConfigError: a value outside the family's range (the message names the knob).
    """
    from engine.models.family import resolve_knobs, shared_knobs

    flags = {"temperature": cell.temperature, "top_k": cell.top_k, "top_p": cell.top_p,
             "max_new_tokens": config.max_new_tokens, "constrain": config.constrain, **config.knobs}
    return resolve_knobs(family, shared_knobs(family, flags), f"sweep cell {cell.name}")


def stale_reason(cell: Cell, config: SweepConfig, recorded: dict, sha256: str, family: Any) -> str | None:
    """Why a sampled cell cannot be reused, or None when it was sampled as this sweep asks now."""
    old_sha = (recorded.get("checkpoint") or {}).get("sha256")
    if old_sha != sha256:
        return (f"the checkpoint at its path changed since it was sampled (sha256 {str(old_sha)[:12]} -> "
                f"{sha256[:12]})")
    if (recorded.get("prompt") or {}).get("text") != cell.prompt.text:
        return "its prompt text differs from this sweep's"
    want = {"n": cell.n, "seed": cell.seed, **cell_knobs(family, cell, config)}
    had = recorded.get("sampling") or {}
    changed = [f"{k} {had.get(k)!r} -> {v!r}" for k, v in want.items() if had.get(k) != v]
    return f"its sampling settings changed ({', '.join(changed)})" if changed else None

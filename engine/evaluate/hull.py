"""Reference convex hulls: build one with a potential, import one from pymatgen, measure E_hull against it.

A `Hull` is a table of phases (reduced formula, energy per atom in eV/atom on the MP2020-corrected footing, where
it came from) and what it holds: its kind, the potential its energies come from, its sources, the elements with a
reference and the chemical systems with compounds. It lives in ``<runs>/hulls/<name>/``::

    hull.json     {name, kind, potential, sources, created_at, footing, n_entries, elements, missing_elements,
                   chemical_systems, options, n_rejected}
    entries.csv   id, formula, energy_per_atom, kind (element | compound), source
    rejects.csv   the source structures that did not make it in, with the reason (built hulls only)

Kinds:

- ``potential``: `build_hull` relaxes every source structure and an elemental reference for every element the
  sources hold (ase's bundled ``dcdft`` solids, else ``ase.build.bulk``) with the potential; the lowest
  elemental phase among references and sources wins, as in any phase diagram.
- ``dft``: built alongside (``<name>-dft``) when the sources carry DFT formation energies
  (``formation_energy_per_atom``, as MP-20 does): each phase at ``E_f + sum_i x_i mu_i`` with the potential's
  elemental energies ``mu_i``, so a sample's potential energy is measured against DFT phase stability.
- ``imported``: `import_hull` reads a pymatgen ``PhaseDiagram`` or a JSON list of entries (e.g. an MP hull) whose
  energies are MP2020-corrected DFT.

`Hull.evaluate` gives formation energy, E_hull (negative below the hull) and ``hull_covered``: False when the
sample's chemical system holds no compound in the hull, so its E_hull is measured against elements only and is
a lower bound (reported as such, never as plainly stable). CLI: ``crystallab hull build|import|inspect``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_json, atomic_write_text, read_json
from engine.lab.jobs import check_name
from engine.lab.settings import get_settings

ENTRY_COLUMNS = ("id", "formula", "energy_per_atom", "kind", "source")
FOOTING = "MP2020-corrected (eV/atom)"
_CHUNK_SOURCES_HELP = "a CSV with a 'cif' column, a folder of .cif files, a .cif file, an archive, builtin[:N], " \
    "or a dataset (name under runs/data or folder with dataset.json)"


def hulls_dir() -> Path:
    """Where hulls live: ``<runs>/hulls``."""
    return get_settings().runs_dir / "hulls"


def _chemsys(elements: Sequence[str]) -> str:
    return "-".join(sorted(elements))


@dataclass
class Hull:
    """A set of reference phases and what they are."""

    name: str
    kind: str
    """``potential``, ``dft`` or ``imported``."""
    potential: str | None
    """The potential whose energies (or elemental chemical potentials, for ``dft``) the hull uses."""
    entries: pd.DataFrame
    """`ENTRY_COLUMNS`; ``energy_per_atom`` in eV/atom on the MP2020-corrected footing."""
    sources: list[str] = field(default_factory=list)
    created_at: str = ""
    options: dict = field(default_factory=dict)
    rejects: pd.DataFrame | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    _elsets: list | None = field(default=None, repr=False)

    # -- what it holds --------------------------------------------------------------------------------------------
    def _element_sets(self) -> list[frozenset[str]]:
        if self._elsets is None:
            from pymatgen.core import Composition

            self._elsets = [frozenset(el.symbol for el in Composition(f).elements) for f in self.entries["formula"]]
        return self._elsets

    @property
    def elements(self) -> list[str]:
        """Elements with an elemental phase (the hull can judge compositions of these only)."""
        return sorted({next(iter(s)) for s in self._element_sets() if len(s) == 1})

    @property
    def missing_elements(self) -> list[str]:
        """Elements appearing in compounds but without an elemental phase."""
        inside = set().union(*self._element_sets()) if len(self.entries) else set()
        return sorted(inside - set(self.elements))

    @property
    def chemical_systems(self) -> list[str]:
        """Chemical systems (``A-B``) of the compounds in the hull."""
        return sorted({_chemsys(s) for s in self._element_sets() if len(s) > 1})

    def describe(self) -> dict:
        """The hull.json record."""
        return {
            "name": self.name, "kind": self.kind, "potential": self.potential, "sources": self.sources,
            "created_at": self.created_at, "footing": FOOTING, "n_entries": int(len(self.entries)),
            "n_compounds": int(sum(len(s) > 1 for s in self._element_sets())), "elements": self.elements,
            "missing_elements": self.missing_elements, "chemical_systems": self.chemical_systems,
            "options": self.options, "n_rejected": 0 if self.rejects is None else int(len(self.rejects)),
        }  # fmt: skip

    # -- measuring --------------------------------------------------------------------------------------------------
    def _phase_diagram(self, elements: frozenset[str]) -> tuple[Any, bool]:
        if elements not in self._cache:
            from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
            from pymatgen.core import Composition

            picked = [i for i, s in enumerate(self._element_sets()) if s <= elements]
            entries = []
            for i in picked:
                comp = Composition(self.entries["formula"].iat[i])
                entries.append(PDEntry(comp, float(self.entries["energy_per_atom"].iat[i]) * comp.num_atoms))
            covered = len(elements) == 1 or any(len(self._element_sets()[i]) > 1 for i in picked)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._cache[elements] = (PhaseDiagram(entries), covered)
        return self._cache[elements]

    def phase_diagram(self, chemsys: str) -> Any:
        """The pymatgen ``PhaseDiagram`` of one chemical system (``"Cl-Na"``) from this hull's phases (the
        dashboard's hull plot draws it).

        Raises:
            InputError: an element of ``chemsys`` the hull has no reference for.
        """
        els = frozenset(e.strip() for e in chemsys.split("-") if e.strip())
        missing = sorted(els - set(self.elements))
        if missing:
            raise InputError(f"hull {self.name} has no reference for {', '.join(missing)}: build a hull whose "
                             "sources cover those elements")
        return self._phase_diagram(els)[0]

    def evaluate(self, formula: str, energy_per_atom: float) -> dict:
        """Formation energy and E_hull (eV/atom) of a phase; ``failure_reason`` when the hull cannot judge it.

        Returns:
            ``{formation_energy_per_atom, e_hull, hull_covered, failure_reason, failure_detail}``; ``e_hull`` is
            negative for a phase below the hull (allowed: a generated crystal can be more stable than the hull).
        """
        from pymatgen.analysis.phase_diagram import PDEntry
        from pymatgen.core import Composition

        comp = Composition(formula)
        els = frozenset(el.symbol for el in comp.elements)
        out = {"formation_energy_per_atom": None, "e_hull": None, "hull_covered": None,
               "failure_reason": None, "failure_detail": None}
        missing = sorted(els - set(self.elements))
        if missing:
            out.update(failure_reason="element_unsupported",
                       failure_detail=f"hull {self.name} has no reference for {', '.join(missing)}")
            return out
        pd_, covered = self._phase_diagram(els)
        entry = PDEntry(comp, energy_per_atom * comp.num_atoms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, e_hull = pd_.get_decomp_and_e_above_hull(entry, allow_negative=True, check_stable=False)
        out.update(formation_energy_per_atom=float(pd_.get_form_energy_per_atom(entry)), e_hull=float(e_hull),
                   hull_covered=bool(covered))
        return out

    # -- files ----------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """Write hull.json, entries.csv (and rejects.csv) into ``folder`` (default ``<runs>/hulls/<name>``)."""
        out = Path(folder) if folder is not None else hulls_dir() / self.name
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "entries.csv", self.entries.loc[:, list(ENTRY_COLUMNS)].to_csv(index=False))
        if self.rejects is not None:
            atomic_write_text(out / "rejects.csv", self.rejects.to_csv(index=False))
        atomic_write_json(out / "hull.json", self.describe())
        return out


def resolve_hull_dir(name_or_path: str | os.PathLike) -> Path:
    """A bare name means ``<runs>/hulls/NAME``; a path may name the folder or its hull.json."""
    text = str(name_or_path)
    if text and "/" not in text and os.sep not in text and not text.endswith(".json"):
        return hulls_dir() / text
    path = Path(text).expanduser().resolve()
    return path.parent if path.name == "hull.json" else path


def load_hull(name_or_path: str | os.PathLike) -> Hull:
    """Load a saved hull.

    Raises:
        InputError: no hull.json / entries.csv there, or they are not a hull's.
    """
    folder = resolve_hull_dir(name_or_path)
    meta_path, entries_path = folder / "hull.json", folder / "entries.csv"
    if not meta_path.is_file() or not entries_path.is_file():
        known = ", ".join(sorted(p.name for p in hulls_dir().glob("*") if (p / "hull.json").is_file())) or "none"
        raise InputError(f"hull {name_or_path} not found ({folder} has no hull.json and entries.csv); "
                         f"build one with `crystallab hull build` (hulls here: {known})")
    try:
        meta = json.loads(meta_path.read_text())
        entries = pd.read_csv(entries_path, dtype={"id": str, "source": str})
    except (json.JSONDecodeError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{folder} is not a readable hull ({type(exc).__name__}); rebuild or re-import it") from None
    if not isinstance(meta, dict) or "kind" not in meta or set(ENTRY_COLUMNS) - set(entries.columns):
        raise InputError(f"{folder} is not a hull: hull.json needs 'kind' and entries.csv the columns "
                         f"{', '.join(ENTRY_COLUMNS)}; rebuild it with `crystallab hull build`")
    return Hull(meta.get("name", folder.name), meta["kind"], meta.get("potential"), entries,
                sources=list(meta.get("sources") or []), created_at=meta.get("created_at", ""),
                options=meta.get("options") or {})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class _Item:
    id: str
    cif: str
    source: str
    dft_formation: float | None = None


def read_structures(sources: Sequence[str]) -> tuple[list[_Item], list[dict], list[str]]:
    """Structures (CIF text) from sources; a dataset folder contributes the sources recorded in its dataset.json.

    Returns:
        ``(items, rejects, labels)``: readable items, ``{id, source, failure_reason, failure_detail}`` for the
        unreadable ones, and each source as recorded.

    Raises:
        InputError: a source does not exist or holds no CIF.
    """
    from engine.data.datasets import resolve_dataset_dir
    from engine.data.sources import describe_source, read_source

    expanded: list[str] = []
    for src in sources:
        ds = resolve_dataset_dir(src)
        if (ds / "dataset.json").is_file():
            recorded = (read_json(ds / "dataset.json", {}) or {}).get("sources") or []
            if not recorded:
                raise InputError(f"dataset {src} records no sources in its dataset.json: give its CIFs instead")
            expanded += [str(s) for s in recorded]
        else:
            expanded.append(str(src))
    items, rejects, labels = [], [], []
    for src in expanded:
        label = describe_source(src)
        labels.append(label)
        for it in read_source(src):
            text = it.text
            if text is None and it.structure is not None:
                text = it.structure.to(fmt="cif")
            if text is None:
                rejects.append({"id": it.name, "source": label, "failure_reason": "parse_failed",
                                "failure_detail": it.error or "no CIF text"})
                continue
            ef = (it.meta or {}).get("formation_energy_per_atom")
            items.append(_Item(it.name, text, label, float(ef) if isinstance(ef, (int, float)) else None))
    return items, rejects, labels


def _s8_crown() -> Any:
    """Cyclo-S8, the molecule alpha-sulfur (MP's reference state) is made of, alone in a 15 Å box.

    ase's ``dcdft`` sulfur is a one-atom cell about 0.7 eV/atom above alpha-S, which put every sulfide's formation
    energy 0.35-0.48 eV/atom too low; the crown (ring radius 2.346 Å, atoms alternately 0.495 Å above and below
    its plane: S-S 2.05 Å, as in alpha-S) lies within a few hundredths of an eV/atom of it (no lattice cohesion).
    """
    import math

    from pymatgen.core import Lattice, Structure

    box = 15.0
    coords = [[box / 2 + 2.346 * math.cos(k * math.pi / 4), box / 2 + 2.346 * math.sin(k * math.pi / 4),
               box / 2 + (0.495 if k % 2 else -0.495)] for k in range(8)]
    return Structure(Lattice.cubic(box), ["S"] * 8, coords, coords_are_cartesian=True)


_MOLECULAR_REFERENCES = {"S": _s8_crown}
"""Elements whose reference state is a molecular solid that ase's collections misrepresent."""


def elemental_reference_cifs(elements: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """CIF text of a reference solid per element (ase's ``dcdft`` collection, else ``ase.build.bulk``; sulfur
    as the S8 crown, see `_s8_crown`).

    Returns:
        ``({element: cif}, [elements without a reference structure])``.
    """
    from ase.build import bulk
    from ase.collections import dcdft
    from pymatgen.io.ase import AseAtomsAdaptor

    found, missing = {}, []
    names = set(dcdft.names)
    for el in sorted(set(elements)):
        if el in _MOLECULAR_REFERENCES:
            found[el] = _MOLECULAR_REFERENCES[el]().to(fmt="cif")
            continue
        try:
            atoms = dcdft[el] if el in names else bulk(el)
        except (ValueError, KeyError, TypeError):  # no reference state known to ase
            missing.append(el)
            continue
        found[el] = AseAtomsAdaptor.get_structure(atoms).to(fmt="cif")
    return found, missing


def build_hull(
    sources: Sequence[str],
    potential: str,
    name: str,
    *,
    relax: bool = True,
    device: str | None = "auto",
    workers: int | None = None,
    timeout_s: float | None = 120.0,
    fmax: float = 0.1,
    steps: int = 500,
    limit: int | None = None,
    overwrite: bool = False,
    progress: Any = None,
) -> list[Hull]:
    """Build the potential hull ``name`` (and ``name-dft`` where the sources carry DFT formation energies).

    Args:
        sources: see `read_structures`.
        potential: potential name (`engine.evaluate.potentials.POTENTIALS`).
        name: hull name (a folder name under ``<runs>/hulls``).
        relax: relax source structures (False: single points on them as given; elemental references are always
            relaxed, their ase geometries are not the potential's minimum).
        device, workers, timeout_s, fmax, steps: see `engine.evaluate.relax.relax_many`.
        limit: use only the first ``limit`` source structures.
        overwrite: replace existing hulls of these names.
        progress: ``progress(done, total)``.

    Raises:
        InputError: bad name, existing hull, unreadable sources, nothing evaluated.
    """
    from pymatgen.core import Composition

    from engine.evaluate.potentials import check_name as check_potential
    from engine.evaluate.relax import relax_many

    potential = check_potential(potential)
    name = check_name(name, "hull name")
    for n in (name, f"{name}-dft"):
        if (hulls_dir() / n / "hull.json").exists() and not overwrite:
            raise InputError(f"hull {n} already exists in {hulls_dir()}: choose another --out or pass --overwrite")
    items, rejects, labels = read_structures(sources)
    items = items[:limit] if limit else items
    if not items:
        raise InputError(f"no readable structures in {', '.join(map(str, sources))}; give {_CHUNK_SOURCES_HELP}")
    opts = {"relax": relax, "fmax": fmax, "steps": steps}
    rows = relax_many([it.cif for it in items], potential, device=device, workers=workers, timeout_s=timeout_s,
                      progress=progress, relax=relax, fmax=fmax, steps=steps)
    records = []
    formulas: dict[str, str] = {}
    for it, row in zip(items, rows):
        if row.get("formula"):
            formulas[it.id] = row["formula"]
        if row["energy_per_atom"] is not None and not row["failure_reason"]:
            records.append({"id": it.id, "formula": row["formula"], "energy_per_atom": row["energy_per_atom"],
                            "kind": "element" if len(Composition(row["formula"])) == 1 else "compound",
                            "source": it.source})
        else:
            rejects.append({"id": it.id, "source": it.source, "failure_reason": row["failure_reason"],
                            "failure_detail": row["failure_detail"]})
    elements = sorted({el.symbol for f in formulas.values() for el in Composition(f).elements})
    refs, no_ref = elemental_reference_cifs(elements)
    ref_rows = relax_many(list(refs.values()), potential, device=device, workers=workers, timeout_s=timeout_s,
                          fmax=fmax, steps=steps)
    for el, row in zip(refs, ref_rows):
        if row["energy_per_atom"] is not None and row["failure_reason"] in (None, "not_converged"):
            records.append({"id": f"ref:{el}", "formula": el, "energy_per_atom": row["energy_per_atom"],
                            "kind": "element", "source": "ase reference solid"})
        else:
            rejects.append({"id": f"ref:{el}", "source": "ase reference solid",
                            "failure_reason": row["failure_reason"], "failure_detail": row["failure_detail"]})
    for el in no_ref:
        rejects.append({"id": f"ref:{el}", "source": "ase reference solid", "failure_reason": "no_reference",
                        "failure_detail": f"ase has no reference structure for {el}"})
    if not records:
        raise InputError(f"no structure of {', '.join(map(str, sources))} got an energy from {potential}: "
                         "see the failure reasons with `crystallab hull inspect`")
    reject_df = pd.DataFrame(rejects, columns=["id", "source", "failure_reason", "failure_detail"])
    entries = pd.DataFrame(records, columns=list(ENTRY_COLUMNS))
    created = _now()
    hull = Hull(name, "potential", potential, entries, sources=labels, created_at=created, options=opts,
                rejects=reject_df)
    hull.save()
    built = [hull]
    dft = [(it, formulas.get(it.id)) for it in items if it.dft_formation is not None and formulas.get(it.id)]
    if dft:
        mu = entries[entries["kind"] == "element"].groupby("formula")["energy_per_atom"].min().to_dict()
        dft_records = [{"id": f"mu:{el}", "formula": el, "energy_per_atom": e, "kind": "element",
                        "source": f"{potential} elemental chemical potential"} for el, e in sorted(mu.items())]
        for it, formula in dft:
            comp = Composition(formula)
            if all(el.symbol in mu for el in comp.elements):
                e = it.dft_formation + sum(comp.get_atomic_fraction(el) * mu[el.symbol] for el in comp.elements)
                dft_records.append({"id": it.id, "formula": formula, "energy_per_atom": e,
                                    "kind": "element" if len(comp) == 1 else "compound", "source": it.source})
        dft_hull = Hull(f"{name}-dft", "dft", potential, pd.DataFrame(dft_records, columns=list(ENTRY_COLUMNS)),
                        sources=labels, created_at=created,
                        options={**opts, "note": "DFT formation energies (formation_energy_per_atom) placed on "
                                 f"{potential}'s elemental energies"})
        dft_hull.save()
        built.append(dft_hull)
    return built


# ----------------------------------------------------------------------------------------------------------------
# Importing


def _entries_from_json(obj: Any) -> list[Any]:
    """pymatgen entries from a decoded JSON object: a PhaseDiagram, a list of entries, ``{"entries": [...]}``
    or a pandas-style ``{"entry": {id: entry}}`` table."""
    from monty.json import MontyDecoder
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.entries import Entry

    decoded = MontyDecoder().process_decoded(obj)
    if isinstance(decoded, PhaseDiagram):
        return list(decoded.all_entries)
    if isinstance(decoded, dict):
        for key in ("entries", "all_entries", "entry"):
            if key in decoded:
                inner = decoded[key]
                decoded = list(inner.values()) if isinstance(inner, dict) else inner
                break
    if isinstance(decoded, list) and decoded and all(isinstance(e, Entry) for e in decoded):
        return decoded
    return []


def import_hull(path: str | os.PathLike, name: str, *, potential: str | None = None, overwrite: bool = False) -> Hull:
    """Import a pymatgen PhaseDiagram or entries JSON (``.json`` or ``.json.gz``) as hull ``name``.

    Entry energies are taken as they are (``entry.energy``, corrections included), so they should be on the
    MP2020-corrected footing the potentials' energies are put on.

    Raises:
        InputError: the file is missing, not JSON, or holds no PhaseDiagram / entries.
    """
    import gzip

    src = Path(path).expanduser()
    name = check_name(name, "hull name")
    if (hulls_dir() / name / "hull.json").exists() and not overwrite:
        raise InputError(f"hull {name} already exists in {hulls_dir()}: choose another --out or pass --overwrite")
    if not src.is_file():
        raise InputError(f"{src} does not exist: give a pymatgen PhaseDiagram or entries JSON file")
    try:
        raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        obj = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{src} is not a hull: not (gzipped) JSON ({type(exc).__name__}); give a pymatgen "
                         "PhaseDiagram or a list of entries saved with monty's MontyEncoder") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = _entries_from_json(obj)
    except (KeyError, TypeError, ValueError, AttributeError, ImportError) as exc:
        raise InputError(f"{src} is not a hull: its JSON does not decode to pymatgen entries ({exc})") from None
    if not entries:
        raise InputError(f"{src} is not a hull: expected a pymatgen PhaseDiagram, a list of entries or "
                         "{'entries': [...]}, found none")
    records = [{"id": str(getattr(e, "entry_id", None) or i), "formula": e.composition.reduced_formula,
                "energy_per_atom": float(e.energy_per_atom),
                "kind": "element" if len(e.composition) == 1 else "compound", "source": str(src.resolve())}
               for i, e in enumerate(entries)]
    hull = Hull(name, "imported", potential, pd.DataFrame(records, columns=list(ENTRY_COLUMNS)),
                sources=[str(src.resolve())], created_at=_now())
    hull.save()
    return hull


# ----------------------------------------------------------------------------------------------------------------
# CLI: crystallab hull build|import|inspect


def _summary_line(h: Hull) -> str:
    d = h.describe()
    return (f"hull {d['name']} (kind {d['kind']}, potential {d['potential'] or 'n/a'}): {d['n_entries']} phases, "
            f"{d['n_compounds']} compounds in {len(d['chemical_systems'])} chemical systems, "
            f"{len(d['elements'])} elements with a reference"
            + (f", no reference for {', '.join(d['missing_elements'])}" if d["missing_elements"] else "")
            + f"; {d['n_rejected']} rejected")


def _cli_build(args: argparse.Namespace) -> int:
    from engine.data.datasets import _Bar

    bar = _Bar("evaluating", unit="structure")
    try:
        hulls = build_hull(args.sources, args.potential, args.out, relax=not args.no_relax, device=args.device,
                           workers=args.workers, timeout_s=args.timeout, fmax=args.fmax, steps=args.steps,
                           limit=args.limit, overwrite=args.overwrite, progress=bar)
    finally:
        bar.close()
    for h in hulls:
        print(_summary_line(h), file=sys.stderr)
        print(f"wrote {hulls_dir() / h.name}", file=sys.stderr)
    return 0


def _cli_import(args: argparse.Namespace) -> int:
    h = import_hull(args.file, args.out, potential=args.potential, overwrite=args.overwrite)
    print(_summary_line(h), file=sys.stderr)
    print(f"wrote {hulls_dir() / h.name}", file=sys.stderr)
    return 0


def _cli_inspect(args: argparse.Namespace) -> int:
    h = load_hull(args.name)
    print(_summary_line(h))
    d = h.describe()
    print(f"sources: {', '.join(d['sources']) or 'n/a'}; created {d['created_at']}; footing {d['footing']}")
    rejects = resolve_hull_dir(args.name) / "rejects.csv"
    if rejects.is_file():
        df = pd.read_csv(rejects)
        if len(df):
            print("rejected: " + ", ".join(f"{k} {v}" for k, v in df["failure_reason"].value_counts().items()))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab hull build|import|inspect``."""
    from engine.evaluate.potentials import POTENTIALS

    p = subparsers.add_parser("hull", help="build, import and inspect reference convex hulls",
                              description="Reference hulls for E_hull, under <runs>/hulls/NAME.")
    sub = p.add_subparsers(dest="hull_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="relax source structures and elemental references with a potential",
                       description="Builds hull NAME from the potential's energies, plus NAME-dft where the sources "
                       "carry formation_energy_per_atom (MP-20 CSVs do).")
    b.add_argument("sources", nargs="+", metavar="SOURCE", help=_CHUNK_SOURCES_HELP)
    b.add_argument("--potential", required=True, help=f"one of {', '.join(POTENTIALS)}")
    b.add_argument("--out", required=True, metavar="NAME", help="hull name (folder under runs/hulls)")
    b.add_argument("--no-relax", action="store_true", help="single points on the source structures as given")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    b.add_argument("--workers", type=int, default=None, help="worker processes on CPU (default: CPU count)")
    b.add_argument("--timeout", type=float, default=120.0, help="time box per structure, seconds (default 120)")
    b.add_argument("--fmax", type=float, default=0.1, help="relaxation force threshold, eV/Å (default 0.1)")
    b.add_argument("--steps", type=int, default=500, help="relaxation step limit (default 500)")
    b.add_argument("--limit", type=int, default=None, help="use only the first N source structures")
    b.add_argument("--overwrite", action="store_true", help="replace existing hulls of this name")
    b.set_defaults(func=_cli_build)
    i = sub.add_parser("import", help="import a pymatgen PhaseDiagram or entries JSON (.json / .json.gz)")
    i.add_argument("file")
    i.add_argument("--out", required=True, metavar="NAME", help="hull name (folder under runs/hulls)")
    i.add_argument("--potential", default=None, help="the footing its energies are on (label only)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing hull of this name")
    i.set_defaults(func=_cli_import)
    s = sub.add_parser("inspect", help="what a hull holds")
    s.add_argument("name", help="hull name or folder")
    s.set_defaults(func=_cli_inspect)

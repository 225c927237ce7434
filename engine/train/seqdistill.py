"""Sequence-level distillation data: the teacher's own valid, unique CIFs as a token dataset (``distill seqdata``).

The teacher (any family, `engine.models.family.load_family_model`) samples with the lab's sampler
(`engine.sample.sample_sets.write_sample_set`, resumable, evaluated by the lab's checks). A sample is kept only
when it is CrystaLLM-valid (`engine.evaluate.checks`: formula, multiplicity, bond lengths, space group) and is not
a duplicate (pymatgen ``StructureMatcher()`` defaults within a reduced formula, as the uniqueness metric) of a
sample kept before it, over all prompts. The kept CIFs, optionally with real data (``mix``: any source of
``crystallab data build``), become a token dataset (`engine.data.datasets.build_dataset`) whose
``seqdistill.json`` records where they came from: teacher path and sha256, prompts, sampling knobs, seed, n, and
the counts kept and dropped by reason.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from engine.lab.errors import ConfigError, InputError
from engine.lab.fsutil import atomic_write_json, read_json

SEQDATA_FILE = "seqdistill.json"


def parse_prompt_specs(specs: Sequence[str]) -> list[Any]:
    """Prompts from ``FORMULA`` or ``FORMULA:SPACEGROUP`` texts (a cell composition such as ``Na4Cl4``).

    Raises:
        ConfigError: an empty list, or a formula that names no single cell (give the cell, e.g. Na4Cl4).
    """
    from engine.crystal.prompts import build_prompts

    out = []
    for spec in specs:
        formula, _, sg = str(spec).partition(":")
        prompts = build_prompts(formula.strip() or None, spacegroup=sg.strip() or None)
        if len(prompts) != 1:
            raise ConfigError(f"prompt {spec!r} names {len(prompts)} cells (one per Z); give the cell composition, "
                              "e.g. Na4Cl4 instead of NaCl")
        out.append(prompts[0])
    if not out:
        raise ConfigError("give at least one prompt (e.g. --prompts Na4Cl4 Ba1Ti1O3)")
    return out


def keep_valid_unique(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], Counter]:
    """Indices of ``rows`` to keep (valid and not a duplicate of an earlier kept one), and drop counts by reason.

    Each row needs ``is_valid``, ``failure_reason`` and ``cif`` (post-processed CIF text or None). Reasons are the
    check's ``failure_reason`` (truncated, malformed, ...), ``not_valid`` for a parsed CIF that fails a validity
    check, and ``duplicate``.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from engine.evaluate.checks import parse_structure

    matcher, kept, dropped = StructureMatcher(), [], Counter()
    seen: dict[str, list[Any]] = {}  # reduced formula -> kept structures
    for i, row in enumerate(rows):
        if row.get("is_valid") is not True or not isinstance(row.get("cif"), str):
            dropped[row.get("failure_reason") or "not_valid"] += 1
            continue
        structure = parse_structure(row["cif"])[0]
        if structure is None:
            dropped["not_valid"] += 1
            continue
        bucket = seen.setdefault(structure.composition.reduced_formula, [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if any(matcher.fit(structure, other) for other in bucket):
                dropped["duplicate"] += 1
                continue
        bucket.append(structure)
        kept.append(i)
    return kept, dropped


def build_seq_dataset(teacher: str | Path, prompts: Sequence[Any], n: int, out: str | Path, *,
                      knobs: Mapping[str, Any] | None = None, seed: int = 1337, batch_size: int | None = None,
                      mix: Sequence[str] = (), val_fraction: float = 0.1, device: str = "auto",
                      workers: int | None = None, overwrite: bool = False,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Sample ``n`` CIFs per prompt from ``teacher``, keep the valid and unique ones, build a token dataset.

    Args:
        teacher: Checkpoint of any family.
        prompts: `engine.crystal.prompts.Prompt` objects (`parse_prompt_specs`).
        n: Samples per prompt.
        out: Dataset folder (a bare name is ``<runs>/data/NAME``); the sample sets are kept beside it in
            ``.<NAME>.samples/`` so an interrupted run continues where it stopped.
        knobs: The teacher family's sampling knobs (defaults for the rest).
        mix: Real-data sources to add (anything ``crystallab data build`` reads, e.g. ``builtin:500`` or a folder).
        val_fraction: Share of the CIFs held out for validation.

    Returns:
        The provenance record written to ``seqdistill.json``.

    Raises:
        InputError: no sample passed the checks and nothing is mixed in (nothing to train on).
    """
    from engine.data.datasets import build_dataset, resolve_dataset_dir
    from engine.lab.fsutil import atomic_write_text
    from engine.models.family import load_family_model, provenance, resolve_knobs
    from engine.sample.sample_sets import write_sample_set
    from engine.sample.sampler import resolve_device

    say = progress or (lambda msg: None)
    out_dir = resolve_dataset_dir(out)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    model = load_family_model(teacher, resolve_device(device))
    knobs = resolve_knobs(type(model), knobs, "seqdata sampling knobs")
    work = out_dir.parent / f".{out_dir.name}.samples"
    rows: list[dict[str, Any]] = []
    for k, prompt in enumerate(prompts):
        set_dir = work / f"p{k:02d}-{prompt.label.replace('/', '_').replace(' ', '_')}"
        say(f"sampling {n} CIFs for {prompt.label} into {set_dir}")
        write_sample_set(model, prompt, set_dir, n=n, knobs=knobs, seed=seed, batch_size=batch_size,
                         evaluate=True, progress=None)
        rows += _set_rows(set_dir, k)
    kept, dropped = keep_valid_unique(rows)
    kept_dir = work / "kept"
    if kept_dir.exists():
        for old in kept_dir.glob("*.cif"):
            old.unlink()  # the kept set is recomputed from the sample sets each time
    kept_dir.mkdir(parents=True, exist_ok=True)
    for i in kept:
        atomic_write_text(kept_dir / f"{rows[i]['name']}.cif", rows[i]["cif"])
    if not kept and not mix:
        raise InputError(f"none of the {len(rows)} teacher samples passed the checks ({dict(dropped)}); sample more "
                         "(--n), use other prompts, or mix in real data (--mix)")
    sources = ([str(kept_dir)] if kept else []) + list(mix)
    say(f"building {out_dir} from {len(kept)} teacher CIFs" + (f" and {', '.join(mix)}" if mix else ""))
    stats = build_dataset(sources, out_dir, val_fraction=val_fraction, seed=seed, dedup=False, workers=workers,
                          overwrite=overwrite)
    record = {
        "kind": "sequence-level distillation",
        "teacher": provenance(model),
        "prompts": [p.to_dict() for p in prompts],
        "n_per_prompt": n,
        "knobs": json_safe(knobs),
        "seed": seed,
        "samples": len(rows),
        "kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "mixed_with": list(mix),
        "sample_sets": str(work),
        "dataset_stats": {k: stats[k] for k in ("train_cifs", "val_cifs", "train_tokens", "val_tokens")
                          if k in stats},
    }
    atomic_write_json(out_dir / SEQDATA_FILE, record)
    return record


def json_safe(value: Any) -> Any:
    """Tuples and other plain containers as JSON reads them back."""
    import json

    return json.loads(json.dumps(value, default=str))


def _set_rows(set_dir: Path, k: int) -> list[dict[str, Any]]:
    """Per sample of a sample set: name, validity verdict, failure reason and post-processed CIF text."""
    import csv

    table = set_dir / "eval.csv"
    if not table.exists():
        raise InputError(f"{set_dir} has no eval.csv: the evaluation did not finish; run the same command again")
    out = []
    with open(table, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            stem = Path(row["file"]).stem
            cif_path = set_dir / "processed" / f"{stem}.cif"
            out.append({"name": f"p{k:02d}_{stem}", "is_valid": row.get("is_valid") == "True",
                        "failure_reason": row.get("failure_reason") or None,
                        "cif": cif_path.read_text(encoding="utf-8") if cif_path.exists() else None})
    return out


def read_seq_provenance(dataset_dir: str | Path) -> dict | None:
    """The ``seqdistill.json`` of a dataset folder, or None for a dataset not made by `build_seq_dataset`."""
    return read_json(Path(dataset_dir) / SEQDATA_FILE)

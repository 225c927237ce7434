"""Crystal-structure-prediction (CSP) benchmark: can a model find known structures from their compositions?

The protocol of CrystaLLM's paper and the CDVAE / DiffCSP line (``reference/crystallm-format.md`` section 7,
``reference/evaluation.md`` tier 1):

- Targets: test structures from any dataset source (a CDVAE-style CSV with a ``cif`` column, a folder, a zip or
  tar of CIFs). Each target's prompt is the ``data_`` line of its canonical CIF, i.e. its cell composition in
  CrystaLLM's element order with Z as in the canonical (conventional) cell, and no space group; with
  ``with_spacegroup`` the prompt also carries the atom-properties block and the target's space group.
- Per target, ``k`` samples (same sampler as ``crystallab sample``; element constraints on by default). Each is
  post-processed, parsed, filtered by CDVAE validity (SMACT charge balance with the 2014 oxidation states,
  all interatomic distances >= 0.5 angstrom, volume >= 0.1 angstrom^3) and compared with the target by
  ``StructureMatcher(stol=0.5, ltol=0.3, angle_tol=10)``.
- Match rate = targets with at least one matching valid sample / targets. RMSE = mean, over matched targets, of
  the best sample's ``get_rms_dist`` (root-mean-square site displacement normalised by (V / N)^(1/3), so it is
  dimensionless). The match rate with the structural filter only (no SMACT) is reported next to it, and so is
  the fraction of targets that pass the filter themselves (a ceiling: a target that fails it can never match).

Run folder (``runs/csp/<name>/``): ``config.json`` (checkpoint path/step/sha256, targets source, subset, sampling
and matcher settings; written once), ``targets.csv`` (every target: name, cell composition, Z, space group, sites,
validity), ``rejects.jsonl`` (targets that cannot be prompted, with the reason), ``targets/NNNN.json`` (one per
finished target, written atomically: its samples' texts and verdicts, the best match), ``status.json``, and at
the end ``results.csv``, ``summary.json`` and ``summary.md``. An interrupted run continues where it stopped when
started again with the same settings; finished targets are never redone. Sampling seeds derive from (seed, target
index), so a resumed or re-chunked run draws the same samples.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from engine import __version__
from engine.lab.errors import ConfigError, CrystallabError, InputError
from engine.lab.fsutil import atomic_write_json, atomic_write_text, check_writable, read_json
from engine.lab.jobs import OWNER_FILE, hold_folder

MATCHER = {"stol": 0.5, "ltol": 0.3, "angle_tol": 10.0}
"""StructureMatcher tolerances of the CSP benchmark (fractional length, site and angle-in-degrees tolerances)."""
DEFAULT_K = 20
"""Samples per target (the benchmark reports n = 1 and n = 20)."""
CHUNK_TARGETS = 8
"""Targets sampled before their samples are scored together on the worker pool (and their files written)."""

DEFINITIONS = {
    "match_rate": "targets with >= 1 valid sample matching the target (StructureMatcher stol 0.5, ltol 0.3, "
                  "angle_tol 10) / targets; valid = CDVAE validity (SMACT smact14 + distances >= 0.5 A + "
                  "volume >= 0.1 A^3)",
    "rmse": "mean over matched targets of the best matching sample's get_rms_dist (RMS displacement / "
            "(V/N)^(1/3), dimensionless)",
    "match_rate_struct_only": "as match_rate, but the samples need only CDVAE structural validity (no SMACT)",
    "valid_sample_rate": "samples passing CDVAE validity / all samples",
    "parse_rate": "samples that post-process and parse into a structure / all samples",
    "target_valid_rate": "targets that pass CDVAE validity themselves / targets (the ceiling of match_rate)",
}


@dataclass(frozen=True)
class Target:
    """One structure to find again."""

    index: int
    """Position in the run's target list (names its file ``targets/NNNN.json`` and its sampling seed)."""
    name: str
    """Identifier from the source (CSV ``material_id``, file name or archive member)."""
    prompt_text: str
    """The exact prompt string."""
    cell_formula: str
    """Cell composition of the canonical cell, as on the ``data_`` line (``Na4Cl4``)."""
    z: int
    """Formula units in that cell."""
    spacegroup: str
    """H-M symbol of the canonical CIF (the target's space group at symprec 0.1)."""
    n_sites: int
    """Sites in the target's cell as given."""
    target_valid: bool
    """Whether the target passes the CDVAE validity filter itself."""
    cif: str
    """The target's CIF as given (the reference the samples are matched against)."""

    @property
    def elements(self) -> list[str]:
        from engine.crystal.prompts import parse_formula_spec

        return list(parse_formula_spec(self.cell_formula))


def _structure(cif: str):
    from engine.evaluate.checks import parse_structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structure, reason, detail = parse_structure(cif)
    if structure is None:
        raise InputError(f"{reason}: {detail}")
    return structure


def _target_from_text(index: int, name: str, text: str, with_spacegroup: bool):
    """A `Target` from one CIF text. Raises InputError/PromptError with the reason a target cannot be used."""
    from engine.crystal.canonical import canonicalize, model_view
    from engine.crystal.prompts import cell_prompt
    from engine.evaluate.checks import cdvae_struct_valid, smact_valid

    view = model_view(canonicalize(text))
    first = view.split("\n", 1)[0]
    cell = first[len("data_"):]
    spacegroup = next(
        (line.split(" ", 1)[1] for line in view.split("\n") if line.startswith("_symmetry_space_group_name_H-M ")),
        "",
    )
    prompt = cell_prompt(cell, spacegroup if with_spacegroup else None)
    structure = _structure(text)
    valid = bool(cdvae_struct_valid(structure) and smact_valid(structure.composition))
    return Target(index, name, prompt.text, cell, prompt.z, spacegroup, len(structure), valid, text)


def load_targets(
    source: str | os.PathLike,
    *,
    limit: int | None = None,
    subset_seed: int = 0,
    with_spacegroup: bool = False,
) -> tuple[list[Target], list[dict]]:
    """Read the targets of a CSP run from a dataset source.

    Args:
        source: A CSV with a ``cif`` column, a folder / zip / tar of CIFs, or a single CIF file.
        limit: Use a random subset of this many structures (None: all).
        subset_seed: Seed of that subset (the same seed picks the same structures).
        with_spacegroup: Put the target's space group in the prompt.

    Returns:
        ``(targets, rejects)``; a reject is ``{"name", "reason"}`` for a structure that cannot be prompted
        (disordered, element outside the vocabulary, unparseable ...).

    Raises:
        InputError: the source is missing or has no CIFs; no target is usable; ``limit`` < 1.
    """
    from engine.data.sources import read_source

    if limit is not None and limit < 1:
        raise ConfigError(f"limit = {limit} must be at least 1 (or left out for every structure)")
    try:
        items = read_source(source)
    except InputError as exc:
        raise InputError(f"CSP targets: {exc}") from None
    if limit is not None and limit < len(items):
        chosen = sorted(random.Random(subset_seed).sample(range(len(items)), limit))
        items = [items[i] for i in chosen]
    targets: list[Target] = []
    rejects: list[dict] = []
    for item in items:
        if item.error is not None or item.text is None:
            rejects.append({"name": item.name, "reason": item.error or "no CIF text (built-in corpus items need "
                            "'crystallab data corpus' first)"})
            continue
        try:
            targets.append(_target_from_text(len(targets), item.name, item.text, with_spacegroup))
        except CrystallabError as exc:
            rejects.append({"name": item.name, "reason": str(exc)})
    if not targets:
        first = f" (first: {rejects[0]['name']}: {rejects[0]['reason']})" if rejects else ""
        raise InputError(f"no usable target structure in {source}{first}")
    return targets, rejects


_MATCHER_OBJ = None


def _matcher():
    global _MATCHER_OBJ
    if _MATCHER_OBJ is None:
        from pymatgen.analysis.structure_matcher import StructureMatcher

        _MATCHER_OBJ = StructureMatcher(**MATCHER)
    return _MATCHER_OBJ


_UNSCORED: dict[str, Any] = {
    "finished": None, "postprocess_ok": False, "failure_reason": None, "n_sites": None, "reduced_formula": None,
    "struct_valid": None, "comp_valid": None, "valid": False, "rms": None, "matched": False,
}  # fmt: skip
"""A sample's verdict before (or without) scoring: the keys every sample record carries."""


@functools.lru_cache(maxsize=16)
def _target_structure(target_cif: str):
    """The target parsed once per process: a worker scores all k samples of a target against it."""
    return _structure(target_cif)


def score_candidate(text: str, target_cif: str, max_sites: int = 500, finished: bool | None = None) -> dict[str, Any]:
    """Post-process one generated text, check CDVAE validity and match it against the target.

    Args:
        text: Raw generated text (prompt included).
        target_cif: The target's CIF.
        max_sites: Cells with more sites after symmetry expansion are rejected before matching.
        finished: Whether generation reached the CIF end (False: cut at the token budget, a ``truncated``
            failure); None judges from the text alone.

    Returns:
        ``postprocess_ok``, ``failure_reason`` (None, ``truncated``, ``postprocess_failed``, a parse category or
        ``too_many_sites``), ``n_sites``, ``reduced_formula``, ``struct_valid``, ``comp_valid`` (None when
        undecided), ``valid``, ``rms`` (None when no match or not structurally valid) and ``matched``
        (valid and rms is not None).
    """
    from engine.crystal.postprocess import postprocess
    from engine.evaluate.checks import cdvae_struct_valid, smact_valid

    row: dict[str, Any] = {**_UNSCORED, "finished": finished}
    result = postprocess(text, finished)
    if result.cif is None:
        row["failure_reason"] = result.reason if result.reason in ("truncated", "malformed", "several_blocks") \
            else "postprocess_failed"
        return row
    row["postprocess_ok"] = True
    try:
        structure = _structure(result.cif)
    except InputError as exc:
        row["failure_reason"] = str(exc).split(":", 1)[0]
        return row
    row["n_sites"] = len(structure)
    row["reduced_formula"] = structure.composition.reduced_formula
    if len(structure) > max_sites:
        row["failure_reason"] = "too_many_sites"
        return row
    struct_ok = cdvae_struct_valid(structure)
    comp_ok = smact_valid(structure.composition)
    row.update(struct_valid=struct_ok, comp_valid=comp_ok, valid=bool(struct_ok and comp_ok))
    if struct_ok:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rms = _matcher().get_rms_dist(structure, _target_structure(target_cif))
        if rms is not None:
            row["rms"] = float(rms[0])
    row["matched"] = bool(row["valid"] and row["rms"] is not None)
    return row


def _target_result(target: Target, texts: list[str], rows: list[dict]) -> dict:
    """The JSON record of one finished target."""
    samples = [{"index": i, "text": t, **r} for i, (t, r) in enumerate(zip(texts, rows))]
    matched = [s for s in samples if s["matched"]]
    struct_matched = [s for s in samples if s["struct_valid"] and s["rms"] is not None]
    best = min(matched, key=lambda s: s["rms"]) if matched else None
    return {
        "index": target.index,
        "name": target.name,
        "prompt": target.prompt_text,
        "cell_formula": target.cell_formula,
        "spacegroup": target.spacegroup,
        "target_valid": target.target_valid,
        "k": len(samples),
        "n_parsed": sum(s["n_sites"] is not None for s in samples),
        "n_valid": sum(s["valid"] for s in samples),
        "matched": best is not None,
        "best_rms": best["rms"] if best else None,
        "best_sample": best["index"] if best else None,
        "matched_struct_only": bool(struct_matched),
        "best_rms_struct_only": min(s["rms"] for s in struct_matched) if struct_matched else None,
        "target_cif": target.cif,
        "samples": samples,
    }


RESULT_COLUMNS = (
    "index", "name", "cell_formula", "spacegroup", "target_valid", "k", "n_parsed", "n_valid",
    "matched", "best_rms", "best_sample", "matched_struct_only", "best_rms_struct_only",
)  # fmt: skip


def target_record(run_dir: str | os.PathLike, index: int) -> dict | None:
    """One finished target's record (``targets/NNNN.json``: samples, verdicts, target CIF), or None."""
    return read_json(Path(run_dir) / "targets" / f"{index:04d}.json")


def aggregate(run_dir: str | os.PathLike):
    """``(summary, results table)`` of the finished targets of a run, partial or complete; writes nothing.

    Raises:
        InputError: the folder is not a CSP run.
    """
    import pandas as pd

    run = Path(run_dir)
    config = read_json(run / "config.json")
    if config is None:
        raise InputError(f"{run} is not a CSP run folder (no config.json); start one with 'crystallab csp'")
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((run / "targets").glob("*.json"))]
    table = pd.DataFrame([{c: r[c] for c in RESULT_COLUMNS} for r in records], columns=list(RESULT_COLUMNS))
    n = len(records)
    samples = sum(r["k"] for r in records)
    matched = [r for r in records if r["matched"]]

    def frac(num: int, den: int) -> float | None:
        return num / den if den else None

    summary = {
        "n_targets": n,
        "n_targets_planned": config["n_targets"],
        "n_rejected": config["n_rejected"],
        "complete": n == config["n_targets"],
        "k": config["sampling"]["k"],
        "match_rate": frac(len(matched), n),
        "rmse": sum(r["best_rms"] for r in matched) / len(matched) if matched else None,
        "match_rate_struct_only": frac(sum(r["matched_struct_only"] for r in records), n),
        "valid_sample_rate": frac(sum(r["n_valid"] for r in records), samples),
        "parse_rate": frac(sum(r["n_parsed"] for r in records), samples),
        "target_valid_rate": frac(sum(r["target_valid"] for r in records), n),
        "definitions": DEFINITIONS,
        "checkpoint": config["checkpoint"],
        "targets_source": config["targets"]["source"],
        "sampling": config["sampling"],
    }
    return summary, table


def summarize(run_dir: str | os.PathLike) -> dict:
    """Aggregate ``targets/*.json`` into ``results.csv``, ``summary.json`` and ``summary.md``; return the summary.

    Counts only finished targets, so it can be called on a partial run (``complete`` says whether it is).
    """
    run = Path(run_dir)
    summary, table = aggregate(run)
    atomic_write_text(run / "results.csv", table.to_csv(index=False))
    atomic_write_json(run / "summary.json", summary)
    atomic_write_text(run / "summary.md", summary_markdown(summary))
    return summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def summary_markdown(summary: dict) -> str:
    """The paper-ready table of a CSP run, with its definitions and settings."""
    from engine.models.family import knobs_text

    s = summary["sampling"]
    ck = summary["checkpoint"]
    rmse = "n/a" if summary["rmse"] is None else f"{summary['rmse']:.4f}"
    lines = [
        f"## Crystal structure prediction: {summary['n_targets']} targets, k = {summary['k']}",
        "",
        "| targets | k | match rate | RMSE | match rate (structural filter only) | valid samples | parsed samples "
        "| valid targets |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary['n_targets']} | {summary['k']} | {_pct(summary['match_rate'])} | {rmse} "
        f"| {_pct(summary['match_rate_struct_only'])} | {_pct(summary['valid_sample_rate'])} "
        f"| {_pct(summary['parse_rate'])} | {_pct(summary['target_valid_rate'])} |",
        "",
        f"Checkpoint `{ck.get('path')}` (step {ck.get('step')}, sha256 {str(ck.get('sha256'))[:12]}); targets "
        f"`{summary['targets_source']}`"
        + (f" ({summary['n_rejected']} structures could not be prompted and are not counted)"
           if summary["n_rejected"] else "")
        + (f"; **partial: {summary['n_targets']} of {summary['n_targets_planned']} targets done**"
           if not summary["complete"] else "")
        + ".",
        "Sampling: " + knobs_text(s) + f", seed {s['seed']}, prompts "
        f"{'with' if s['with_spacegroup'] else 'without'} space group"
        + (f", model family {ck['family']}" if ck.get("family") else "") + ".",
        "",
        "Definitions:",
        *[f"- {name}: {text}" for name, text in summary["definitions"].items()],
        "",
    ]
    return "\n".join(lines)


def _config(ckpt_info: dict, source: str, targets: list[Target], rejects: list[dict], args: dict) -> dict:
    return {
        "checkpoint": ckpt_info,
        "targets": {"source": source, "limit": args["limit"], "subset_seed": args["subset_seed"]},
        "n_targets": len(targets),
        "n_rejected": len(rejects),
        # The GPT family's knobs sit at the top level, as in runs written before the family seam.
        "sampling": {"k": args["k"], **args["knobs"], "seed": args["seed"],
                     "with_spacegroup": args["with_spacegroup"]},
        "matcher": MATCHER,
        "max_sites": args["max_sites"],
        "version": __version__,
    }


_SETTINGS_KEYS = ("checkpoint", "targets", "n_targets", "sampling", "matcher", "max_sites")


def _check_resume(run: Path, config: dict) -> None:
    old = read_json(run / "config.json")
    if old is None:
        if run.exists() and any(p.name != OWNER_FILE for p in run.iterdir()):
            raise InputError(f"{run} exists and is not a CSP run folder: choose another --out or remove it")
        return
    changed = [k for k in _SETTINGS_KEYS if old.get(k) != config.get(k)]
    if changed:
        raise InputError(
            f"{run} holds a CSP run with different {', '.join(changed)}: re-run with the same settings to "
            "continue it, or choose another --out"
        )


def run_csp(
    ckpt: str | os.PathLike,
    targets_source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    k: int = DEFAULT_K,
    limit: int | None = None,
    subset_seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = 10,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    seed: int = 1337,
    with_spacegroup: bool = False,
    constrain: bool = True,
    knobs: dict[str, Any] | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    timeout_s: float | None = 30.0,
    max_sites: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run (or continue) a CSP benchmark and write its run folder (see the module docstring).

    Args:
        ckpt: Checkpoint file.
        targets_source: Dataset source of the target structures.
        out_dir: Run folder; an existing one with the same settings is continued.
        k: Samples per target.
        limit, subset_seed, with_spacegroup: As `load_targets`.
        temperature, top_k, top_p, max_new_tokens, seed, batch_size: As `engine.sample.sampler.generate`; the defaults
            (T 1.0, top-k 10) are CrystaLLM's published evaluation settings.
        constrain: Restrict element tokens to the target's elements (and the H-M value to space-group tokens).
        knobs: Further sampling knobs of the checkpoint's family (``engine.models.family``); the arguments above
            that the family has are its knobs too, the others are ignored.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: Scoring processes (default: CPU count).
        timeout_s: Time box per sample's scoring in seconds (a sample over it is not matched).
        max_sites: See `score_candidate`.
        progress: Called as ``progress(done_targets, total_targets)``.

    Returns:
        The summary (as ``summary.json``).

    Raises:
        InputError: bad targets source or an out folder holding something else / another run's settings.
        CheckpointError, ConfigError, PromptError: as the sampler.
    """
    from engine.models.family import load_family_model, provenance, resolve_knobs, shared_knobs
    from engine.sample.sampler import resolve_device

    if k < 1:
        raise ConfigError(f"k = {k} must be at least 1 sample per target")
    dev = resolve_device(device)
    model = load_family_model(ckpt, dev)
    flags = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                 constrain=constrain)
    knobs = resolve_knobs(type(model), {**shared_knobs(type(model), flags), **(knobs or {})}, "csp")
    run = Path(out_dir).expanduser().resolve()
    if run.exists() and not run.is_dir():
        raise InputError(f"{run} is a file: give a folder for the CSP run")
    targets, rejects = load_targets(targets_source, limit=limit, subset_seed=subset_seed,
                                    with_spacegroup=with_spacegroup)
    info = provenance(model)
    settings = dict(k=k, limit=limit, subset_seed=subset_seed, knobs=knobs, seed=seed,
                    with_spacegroup=with_spacegroup, max_sites=max_sites)
    config = _config(info, str(Path(targets_source).expanduser().resolve()), targets, rejects, settings)
    _check_resume(run, config)
    check_writable(run.parent, "the CSP run's parent folder", "choose another --out")
    with hold_folder(run, "CSP run", "wait for it to finish, or stop it and re-run the same command to continue"):
        return _run_targets(run, config, model, knobs, targets, rejects, k=k, seed=seed,
                            with_spacegroup=with_spacegroup, batch_size=batch_size, workers=workers,
                            timeout_s=timeout_s, max_sites=max_sites, progress=progress)


def _run_targets(run: Path, config: dict, model: Any, knobs: dict[str, Any], targets: list[Target],
                 rejects: list[dict], *, k: int, seed: int, with_spacegroup: bool, batch_size: int | None,
                 workers: int | None, timeout_s: float | None, max_sites: int,
                 progress: Callable[[int, int], None] | None) -> dict:
    """The body of `run_csp` once the run folder is owned: write the listing once, then score what is missing."""
    from engine.crystal.prompts import Prompt
    from engine.evaluate.evaluation import run_pool
    from engine.sample.sampler import sample_seed

    (run / "targets").mkdir(parents=True, exist_ok=True)
    if not (run / "config.json").exists():
        config["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        import pandas as pd

        listing = pd.DataFrame([{k_: v for k_, v in asdict(t).items() if k_ not in ("cif", "prompt_text")}
                                for t in targets])
        atomic_write_text(run / "targets.csv", listing.to_csv(index=False))
        atomic_write_text(run / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
        atomic_write_json(run / "config.json", config)

    def path_of(t: Target) -> Path:
        return run / "targets" / f"{t.index:04d}.json"

    todo = [t for t in targets if not path_of(t).exists()]
    done = len(targets) - len(todo)
    started = time.time()
    workers = max(1, workers or os.cpu_count() or 1)

    def status(state: str, **extra: Any) -> None:
        atomic_write_json(run / "status.json", {"state": state, "done": done, "total": len(targets),
                                                "updated_at": time.time(), "started_at": started, **extra})

    status("running")
    if progress is not None:
        progress(done, len(targets))
    try:
        for start in range(0, len(todo), CHUNK_TARGETS):
            chunk = todo[start : start + CHUNK_TARGETS]
            texts: list[list[str]] = []
            ends: list[list[bool]] = []
            for t in chunk:
                prompt = Prompt(t.prompt_text, t.cell_formula, t.z, t.spacegroup if with_spacegroup else None,
                                t.name)
                gens = model.generate(prompt, k, knobs, seed=sample_seed(seed, t.index), batch_size=batch_size)
                texts.append([g.text for g in gens])
                ends.append([g.finished for g in gens])
            tasks = [
                (i * k + j, text, t.cif, max_sites, ends[i][j])
                for i, t in enumerate(chunk) for j, text in enumerate(texts[i])
            ]
            rows = run_pool(score_candidate, tasks, workers, timeout_s)
            for i, t in enumerate(chunk):
                atomic_write_json(path_of(t), _target_result(t, texts[i], [_row(r) for r in rows[i * k : (i + 1) * k]]))
                done += 1
            status("running")
            if progress is not None:
                progress(done, len(targets))
    except BaseException as exc:
        status("interrupted", error=f"{type(exc).__name__}: {exc}")
        raise
    summary = summarize(run)
    status("done")
    return summary


def _row(row: dict) -> dict:
    """A pool row: a `score_candidate` dict, or the pool's timeout / crash row mapped onto the same keys."""
    if "matched" in row:
        return row
    return {**_UNSCORED, "failure_reason": row.get("failure_reason")}


# ---- CLI ---------------------------------------------------------------------------------------------------


def _run_cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.lab.settings import get_settings
    from engine.models.checkpoint import cli_checkpoint_path

    ckpt = cli_checkpoint_path(args.ckpt)
    out = Path(args.out).expanduser() if args.out else None
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(f"{Path(args.targets).stem}-k{args.k}-{stamp}")
    if not out.is_absolute():
        out = get_settings().csp_dir / out
    bars: list[tqdm] = []  # made on the first report, so an input error prints alone

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="targets", unit="target", file=sys.stderr, leave=False))
        bars[0].update(done - bars[0].n)

    from engine.models.crystallm import CrystaLLMGPT
    from engine.models.family import get_family, knobs_from_args, peek_family

    knobs = knobs_from_args(args, CrystaLLMGPT.knobs, get_family(peek_family(ckpt)), defaults=CSP_KNOB_DEFAULTS)
    try:
        summary = run_csp(
            ckpt, args.targets, out, k=args.k, limit=args.limit, subset_seed=args.subset_seed, knobs=knobs,
            seed=args.seed, with_spacegroup=args.spacegroup, batch_size=args.batch_size,
            device=args.device, workers=args.workers, timeout_s=args.timeout, progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    rmse = "n/a" if summary["rmse"] is None else f"{summary['rmse']:.4f}"
    print(
        f"{summary['n_targets']} targets, k {summary['k']}: match rate {_pct(summary['match_rate'])}, RMSE {rmse} "
        f"(structural filter only: {_pct(summary['match_rate_struct_only'])}); valid samples "
        f"{_pct(summary['valid_sample_rate'])}  ->  {out}"
    )
    return 0


CSP_KNOB_DEFAULTS = {"temperature": 1.0, "max_new_tokens": 1024}
"""CrystaLLM's published CSP evaluation settings where they differ from the GPT family's sampling defaults."""


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab csp``."""
    p = subparsers.add_parser(
        "csp",
        help="crystal-structure-prediction benchmark: match rate and RMSE against known structures",
        description=(
            "Prompt a checkpoint with each target's cell composition (and optionally its space group), draw k "
            "samples, and report the match rate and RMSE of the CSP benchmark (StructureMatcher stol 0.5, ltol "
            "0.3, angle_tol 10; CDVAE validity filter). Re-running the same command continues an interrupted run."
        ),
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file; a relative path not found from the current "
                   "folder is looked up under the runs root")
    p.add_argument("--targets", required=True, help="target structures: a CSV with a 'cif' column (e.g. "
                   "mp20 test.csv), a folder, zip or tar of CIFs, or one CIF file")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"samples per target (default {DEFAULT_K})")
    p.add_argument("--limit", type=int, default=None, help="use a random subset of this many targets (default all)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of that subset (default 0)")
    p.add_argument("--spacegroup", action="store_true", help="also give each target's space group in the prompt")
    from engine.models.crystallm import CrystaLLMGPT
    from engine.models.family import add_knob_arguments

    add_knob_arguments(p, CrystaLLMGPT.knobs, defaults=CSP_KNOB_DEFAULTS)
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--batch-size", type=int, default=None, help="rows decoded together (default min(k, 64))")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--workers", type=int, default=None, help="scoring processes (default: CPU count)")
    p.add_argument("--timeout", type=float, default=30.0, help="time box per sample's scoring, s (default 30)")
    p.add_argument("--out", default=None, help="run folder; relative paths are under <runs>/csp (default: a new "
                   "timestamped folder there); an existing run with the same settings is continued")
    p.set_defaults(func=_run_cli)

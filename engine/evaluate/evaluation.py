"""Time-boxed parallel evaluation of generated texts, and a sample set's metrics.

`evaluate_texts` post-processes and checks each text (`engine.evaluate.checks.check_cif`) in the killable worker pool of
`engine.lab.pool`: a generated CIF with a wrong space group can expand to thousands of atoms and keep compiled code
(spglib, Voronoi) busy for minutes, which no in-process alarm interrupts. A text over the per-item time box gets
``failure_reason="timeout"`` and the rest carry on. Output rows keep the input order.

`set_metrics` turns the table into set-level metrics (each with its definition string, see `METRIC_DEFINITIONS`),
`evaluate_sample_set` evaluates a sample-set folder (ARCHITECTURE.md) and writes ``eval.csv`` and
``eval_summary.json``; ``crystallab evaluate`` is the CLI. Uniqueness and novelty live in `engine.evaluate.metrics`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from engine.crystal.postprocess import finished_flags, postprocess
from engine.evaluate.checks import ROW_FIELDS, check_cif, empty_row, failed_row, mark_missed_hits
from engine.evaluate.metrics import METRIC_DEFINITIONS, TrainingIndex, macro_average, set_metrics
from engine.lab import pool
from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_json, atomic_write_text, read_json

__all__ = [
    "METRIC_DEFINITIONS", "TrainingIndex", "evaluate_one", "evaluate_sample_set", "evaluate_texts",
    "macro_average", "set_metrics",
]  # fmt: skip

COLUMNS = ("file", "generated_length", *ROW_FIELDS, "processed_cif")
"""Columns of the evaluation table; ``processed_cif`` is kept in memory (for uniqueness) but not in eval.csv."""
CSV_COLUMNS = tuple(c for c in COLUMNS if c != "processed_cif")

Progress = Callable[[int, int], None]

# A tiny complete CIF (rock salt, P1) that every worker checks once before taking work, so first-use costs
# (element tables, CrystalNN and spglib set-up) are not charged to the first real item's time box.
_WARMUP_CIF = """data_Na1Cl1
_symmetry_space_group_name_H-M P1
_cell_length_a 3.9900
_cell_length_b 3.9900
_cell_length_c 3.9900
_cell_angle_alpha 60.0000
_cell_angle_beta 60.0000
_cell_angle_gamma 60.0000
_symmetry_Int_Tables_number 1
_chemical_formula_structural NaCl
_chemical_formula_sum 'Na1 Cl1'
_cell_volume 44.9100
_cell_formula_units_Z 1
loop_
_symmetry_equiv_pos_site_id
_symmetry_equiv_pos_as_xyz
1 'x, y, z'
loop_
_atom_site_type_symbol
_atom_site_label
_atom_site_symmetry_multiplicity
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Na Na0 1 0.0000 0.0000 0.0000 1
Cl Cl1 1 0.5000 0.5000 0.5000 1

"""


def _token_count(text: str) -> int:
    from engine.crystal.tokenizer import encode

    return len(encode(text))


def evaluate_one(
    text: str,
    *,
    raw: bool = True,
    prompt: dict | None = None,
    max_sites: int = 500,
    finished: bool | None = None,
) -> dict:
    """Post-process (when ``raw``) and check one text; the row also holds ``processed_cif`` and the length.

    Args:
        text: a raw generated text (``raw=True``) or an already post-processed CIF.
        raw: whether to post-process first.
        prompt: the prompt dict for the hit columns.
        max_sites: see `engine.evaluate.checks.check_cif`.
        finished: whether generation stopped at the CIF end (from the sample set's ``samples.jsonl``); False
            makes the text ``truncated``, None judges from the text (see `engine.crystal.postprocess.postprocess`).
    """
    if raw:
        result = postprocess(text, finished)
        if result.cif is None:
            # truncated (raise max_new_tokens) and malformed (a broken CIF) need different remedies: keep both.
            reason = result.reason if result.reason in ("truncated", "malformed") else "postprocess_failed"
            row = failed_row(text, reason, result.error)
        else:
            row = check_cif(result.cif, prompt, max_sites=max_sites)
        row["processed_cif"] = result.cif
    else:
        row = check_cif(text, prompt, max_sites=max_sites)
        row["processed_cif"] = text
    row["generated_length"] = _token_count(text)
    return mark_missed_hits(row, prompt)


def _evaluate_task(text: str, raw: bool, prompt: dict | None, max_sites: int, finished: bool | None) -> dict:
    return evaluate_one(text, raw=raw, prompt=prompt, max_sites=max_sites, finished=finished)


def warm_up_checks() -> None:
    """First use of everything a check needs (runs once per pool worker, before its time boxes start)."""
    evaluate_one(_WARMUP_CIF, raw=False)


def _problem_row(reason: str, detail: str) -> dict:
    row = empty_row()
    row.update(failure_reason=reason, failure_detail=detail, processed_cif=None, generated_length=None)
    return row


def run_pool(
    fn: Callable[..., dict],
    tasks: list[tuple],
    workers: int,
    timeout_s: float | None,
    progress: Progress | None = None,
    init: Callable[[], None] | None = None,
) -> list[dict]:
    """`engine.lab.pool.run_pool` for checks: a task over its time box, or whose worker dies, gets a row with
    ``failure_reason`` ``timeout`` / ``worker_crashed``; ``init`` runs in each worker before it takes work (load
    a model there, e.g. an ML potential on a GPU, which does not survive a fork)."""
    return pool.run_pool(fn, tasks, workers, timeout_s, progress, problem=_problem_row, warm_up=warm_up_checks,
                         error_reason="check_error", init=init)


def evaluate_texts(
    items: list[tuple[str, str]],
    *,
    prompt: dict | None = None,
    workers: int | None = None,
    timeout_s: float | None = 30.0,
    raw: bool = True,
    progress: Progress | None = None,
    max_sites: int = 500,
    finished: list[bool | None] | None = None,
) -> pd.DataFrame:
    """Evaluate generated texts in parallel, each in a time box; one row per item, in input order.

    Args:
        items: ``(name, text)`` pairs; ``name`` becomes the ``file`` column.
        prompt: the sample set's prompt dict (``text``, ``formula``, ``z``, ``spacegroup``) for the hit columns.
        workers: worker processes (default: CPU count). ``workers=1`` still uses one killable worker.
        timeout_s: per-item time box in seconds; None means no limit, and with ``workers=1`` the checks then run
            in this process (for benchmarking and debugging).
        raw: the texts are raw generated text to post-process first (False: already post-processed CIFs).
        progress: called as ``progress(done, total)`` after each item.
        max_sites: see `engine.evaluate.checks.check_cif`.
        finished: per item, whether generation stopped at the CIF end (None: unknown); see `evaluate_one`.

    Returns:
        A DataFrame with the columns of `COLUMNS`.
    """
    workers = max(1, workers or os.cpu_count() or 1)
    if prompt is not None and not isinstance(prompt, dict):
        prompt = prompt.to_dict()  # an engine.crystal.prompts.Prompt
    if not items:
        return pd.DataFrame(columns=list(COLUMNS))
    flags = list(finished) if finished is not None else [None] * len(items)
    if len(flags) != len(items):
        raise ValueError(f"finished has {len(flags)} flags for {len(items)} items")
    if workers == 1 and timeout_s is None:
        rows = []
        for i, ((_, text), flag) in enumerate(zip(items, flags)):
            rows.append(evaluate_one(text, raw=raw, prompt=prompt, max_sites=max_sites, finished=flag))
            if progress is not None:
                progress(i + 1, len(items))
    else:
        tasks = [(i, text, raw, prompt, max_sites, flag) for i, ((_, text), flag) in enumerate(zip(items, flags))]
        rows = run_pool(_evaluate_task, tasks, workers, timeout_s, progress)
    for (name, _), row in zip(items, rows):
        row["file"] = name
        mark_missed_hits(row, prompt)  # timeout / crashed rows carry no verdict: they missed the prompt
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the evaluation table as CSV (without the in-memory ``processed_cif`` column), atomically."""
    return atomic_write_text(path, df.loc[:, [c for c in CSV_COLUMNS if c in df.columns]].to_csv(index=False))


def evaluate_sample_set(
    set_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    timeout_s: float | None = 30.0,
    train_index: TrainingIndex | None = None,
    progress: Progress | None = None,
    reference: Any = None,
    cutoffs: str | tuple[float, float] | None = None,
    stability: dict | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Evaluate a sample-set folder: its ``raw/*.txt`` against its ``config.json`` prompt.

    Writes ``processed/NNNN.cif`` for texts that post-process, ``eval.csv`` and ``eval_summary.json`` (the
    `set_metrics` dict, plus the `extra_metrics` that apply), each atomically.

    Args:
        reference: a reference set (`engine.evaluate.distribution.Reference` or a path) for COV / Wasserstein.
        cutoffs: COV cutoffs (`engine.evaluate.distribution.resolve_cutoffs`; default MP-20's).
        stability: ``{"potential": P, "hull": NAME}`` runs a stability pass into the folder first.

    Raises:
        InputError: the folder has no ``raw/*.txt``.
    """
    folder = Path(set_dir)
    raw_files = sorted((folder / "raw").glob("*.txt"))
    if not raw_files:
        raise InputError(f"{folder} has no raw/*.txt: point at a sample-set folder written by `crystallab sample`")
    prompt = (read_json(folder / "config.json", {}) or {}).get("prompt")
    items = [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in raw_files]
    flags = finished_flags(folder)
    df = evaluate_texts(
        items, prompt=prompt, workers=workers, timeout_s=timeout_s, progress=progress,
        finished=[flags.get(name) for name, _ in items],
    )
    for name, cif in zip(df["file"], df["processed_cif"]):
        target = folder / "processed" / f"{Path(name).stem}.cif"
        if isinstance(cif, str) and not target.exists():  # pandas may hold a missing CIF as NaN
            atomic_write_text(target, cif)
    metrics = set_metrics(df, train_index=train_index, prompt=prompt)
    write_table(df, folder / "eval.csv")
    metrics.update(extra_metrics(df, folder, inputs=[folder], train_index=train_index, reference=reference,
                                 cutoffs=cutoffs, stability=stability, workers=workers))
    atomic_write_json(folder / "eval_summary.json", metrics)
    return df, metrics


_NO_STABILITY = ("--stability needs engine.evaluate.stability, which this installation lacks: update crystallab, "
                 "or run without --stability")


def extra_metrics(
    df: pd.DataFrame,
    stability_dir: Path,
    *,
    inputs: list,
    train_index: TrainingIndex | None,
    reference: Any = None,
    cutoffs: str | tuple[float, float] | None = None,
    stability: dict | None = None,
    workers: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Issue 13's set metrics beyond validity: S.U.N. and stable rates, COV / Wasserstein / diversity.

    Args:
        df: the evaluation table (with ``processed_cif``).
        stability_dir: where ``stability.csv`` is (or, with ``stability``, is written).
        inputs: what a stability pass evaluates (the paths given to ``crystallab evaluate``).
        stability: ``{"potential": P, "hull": NAME}`` runs `engine.evaluate.stability.run_stability` first.
        reference, cutoffs: see `evaluate_sample_set`.

    Returns:
        Metrics as ``{"value", "definition"}``: the S.U.N. entries when ``stability_dir/stability.csv`` exists, the
        distribution entries when ``reference`` is given; nothing otherwise.
    """
    out: dict[str, dict[str, Any]] = {}
    if stability is not None:
        try:  # the stability half of issue 13 (potentials, relaxation, hulls)
            from engine.evaluate.stability import run_stability
        except ImportError:
            raise InputError(_NO_STABILITY) from None
        run_stability(inputs, stability["potential"], stability["hull"], stability_dir)
    table = None
    if (stability_dir / "stability.csv").is_file():
        from engine.evaluate.sun import read_stability, structures_from_table, sun_metrics

        table = read_stability(stability_dir / "stability.csv")
        out.update(sun_metrics(structures_from_table(df), table, train_index, n_submitted=len(df)))
    if reference is not None:
        from engine.evaluate.distribution import evaluate_distribution

        if table is not None:  # E_hull in the order of the evaluation table
            table = (table.assign(file=table["file"].astype(str)).drop_duplicates("file").set_index("file")
                     .reindex(df["file"].astype(str)).reset_index(drop=True))
        out.update(evaluate_distribution(df, reference, cutoffs=cutoffs, stability=table, workers=workers))
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI: crystallab evaluate DIR_OR_FILES... --out eval.csv


def _collect(paths: list[str]) -> tuple[list[tuple[str, str]], dict | None, list[bool | None]]:
    """(name, text) items from files and folders, the prompt, and each item's ``finished`` flag (None: unknown).

    A sample-set folder contributes raw/*.txt, its prompt and the sampler's flags from its samples.jsonl.
    """
    items: list[tuple[str, str]] = []
    finished: list[bool | None] = []
    prompts = []
    for arg in paths:
        path = Path(arg).expanduser()
        if path.is_dir():
            source = path / "raw" if (path / "raw").is_dir() else path
            files = sorted(p for p in source.iterdir() if p.suffix in (".txt", ".cif") and p.is_file())
            if not files:
                raise InputError(f"{path} holds no .txt or .cif files to evaluate")
            prompts.append((read_json(path / "config.json", {}) or {}).get("prompt"))
            prefix = f"{path.name}/" if len(paths) > 1 else ""
            items += [(prefix + p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]
            flags = finished_flags(source)
            finished += [flags.get(p.name) for p in files]
        elif path.is_file():
            items.append((path.name, path.read_text(encoding="utf-8", errors="replace")))
            finished.append(None)
        else:
            raise InputError(f"{path} does not exist: give generated-text files or folders of them")
    prompt = prompts[0] if len(prompts) == 1 and len(paths) == 1 else None
    return items, prompt, finished


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: give the CSV file to write, e.g. {out / 'eval.csv'}")
    if out.suffix.lower() != ".csv" and out.exists():
        raise InputError(f"--out {out} already exists and is not a .csv file: give a CSV path such as eval.csv")


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InputError(f"--timeout {timeout_s} must be a positive number of seconds per file (default 30)")


def _format_value(value: Any, shown: int = 10) -> str:
    """One metric value for the terminal: rates to 3 decimals, at most ``shown`` entries of a count dict."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        entries = [f"{k} {v}" for k, v in value.items()]
        more = f" (+{len(entries) - shown} more)" if len(entries) > shown else ""
        return ", ".join(entries[:shown]) + more or "none"
    return str(value)


def _p1_hint(df: pd.DataFrame) -> str | None:
    """A hint when parsed files state P 1 but have more symmetry: pymatgen P1 CIFs, not canonical CIFs."""
    stated = df["stated_spacegroup"].fillna("").astype(str).str.replace(" ", "")
    p1_mismatch = int(((stated == "P1") & (df["space_group_consistent"] == False)).sum())  # noqa: E712
    if p1_mismatch == 0 or p1_mismatch < 0.5 * int((df["parse_ok"] == True).sum()):  # noqa: E712
        return None
    return (
        f"note: {p1_mismatch} file(s) state space group P 1 but have more symmetry, so they are not valid (space "
        "group inconsistent). Reference CIFs written by pymatgen or Materials Project are P1 files: canonicalize "
        "each first (crystallab cif canonicalize FILE > canon/FILE) and evaluate those files without --processed"
    )


def _run_cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out = Path(args.out).expanduser()
    _check_out(out)
    _check_timeout(args.timeout)
    if args.stability and not args.hull:
        raise InputError("--stability needs --hull NAME (a hull built with `crystallab hull build`)")
    if args.stability and importlib.util.find_spec("engine.evaluate.stability") is None:
        raise InputError(_NO_STABILITY)
    if args.cutoffs is not None:
        from engine.evaluate.distribution import resolve_cutoffs

        resolve_cutoffs(args.cutoffs)
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers} must be at least 1 (default: the CPU count)")
    items, prompt, finished = _collect(args.inputs)
    train_index = None
    if args.train:
        from engine.data.datasets import resolve_dataset_dir

        train_index = TrainingIndex.from_dataset(resolve_dataset_dir(args.train))
    with tqdm(total=len(items), desc="evaluating", unit="cif", file=sys.stderr) as bar:

        def progress(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        df = evaluate_texts(
            items, prompt=prompt, workers=args.workers, timeout_s=args.timeout, raw=not args.processed,
            progress=progress, finished=finished,
        )
    write_table(df, out)
    metrics = set_metrics(df, train_index=train_index, prompt=prompt)
    folders = [Path(a).expanduser() for a in args.inputs if Path(a).expanduser().is_dir()]
    stability_dir = folders[0] if len(args.inputs) == 1 and folders else out.parent
    metrics.update(extra_metrics(
        df, stability_dir, inputs=[Path(a).expanduser() for a in args.inputs], train_index=train_index,
        reference=args.reference, cutoffs=args.cutoffs, workers=args.workers,
        stability={"potential": args.potential, "hull": args.hull} if args.stability else None))
    summary = out.with_name(f"{out.stem}_summary.json")
    atomic_write_json(summary, metrics)
    width = max(len(name) for name in metrics)
    lines = [f"{len(df)} file(s) evaluated; set metrics (definitions in {summary.name}):"]
    for name, m in metrics.items():
        value = _format_value(m["value"])
        if name in ("novelty", "unique_novel_valid_rate") and train_index is None:
            value += " (needs --train DATASET)"
        if name != "n":
            lines.append(f"  {name:<{width}}  {value}")
    hint = _p1_hint(df)
    if hint:
        lines.append(hint)
    if args.reference or "sun_rate" in metrics:
        from engine.evaluate.report import set_row_from_metrics
        from engine.evaluate.tables import published_tables_markdown

        lines += ["", published_tables_markdown(pd.DataFrame([set_row_from_metrics(metrics, label=out.stem)]))]
    lines.append(f"wrote {out} and {summary}")
    broken = int(df["failure_reason"].isin(["check_error", "worker_crashed"]).sum())
    if broken:
        lines.append(f"error: {broken} file(s) could not be checked (failure_reason check_error or worker_crashed; "
                     f"failure_detail in {out.name} says why); their rows carry no verdict")
    print("\n".join(lines), file=sys.stderr)
    return 1 if broken else 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="check generated CIFs (CrystaLLM / CDVAE validity, symmetry) and compute set metrics",
        description=(
            "Writes a CSV with one row per file and a summary JSON (<out>_summary.json, each metric with its "
            "definition) next to it, and prints every set metric. Validity compares the space group a CIF states "
            "with the one detected at symprec 0.1. Reference CIFs written by pymatgen or Materials Project state "
            "P 1, so a symmetric crystal in them is not valid as written: canonicalize each first "
            "(crystallab cif canonicalize FILE > canon/FILE, one file per CIF) and evaluate those files "
            "without --processed (--processed is for CIFs that already list every symmetry operator)."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILES", help="sample-set folders, folders or files")
    p.add_argument("--out", required=True, help="CSV to write (e.g. eval.csv)")
    p.add_argument("--train", help="dataset folder or name under runs/data, for novelty")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-file time box in seconds, > 0 (default 30)")
    p.add_argument("--processed", action="store_true", help="inputs are post-processed CIFs (every symmetry "
                   "operator listed), not raw texts or canonical CIFs")
    p.add_argument("--reference", help="reference set for COV-R / COV-P and Wasserstein distances: a CSV with a "
                   "'cif' column (e.g. MP-20's test.csv), a folder of CIFs or a dataset name")
    p.add_argument("--cutoffs", default=None, help="COV cutoffs: mp20 (0.4,10; default), perov5 or carbon24 "
                   "(0.2,4), or STRUCT,COMP")
    p.add_argument("--stability", action="store_true", help="relax every sample with a potential and measure "
                   "E_hull against --hull (writes stability.csv), then report stable rates and S.U.N.")
    p.add_argument("--hull", help="hull name for --stability (under <runs>/hulls)")
    p.add_argument("--potential", default="chgnet", help="potential for --stability: chgnet (default), "
                   "sevennet-0 or sevennet-l3i5")
    p.set_defaults(func=_run_cli)

"""Time-boxed parallel evaluation of generated texts, and a sample set's metrics.

`evaluate_texts` post-processes and checks each text (`engine.evaluate.checks.check_cif`) in a pool of worker processes
that can be killed: a generated CIF with a wrong space group can expand to thousands of atoms and keep compiled
code (spglib, Voronoi) busy for minutes, which no in-process alarm interrupts. A worker that exceeds the per-item
time box is killed, its item gets ``failure_reason="timeout"``, a fresh worker takes its place and the rest carry
on. Workers are forked from the parent, which imported pymatgen and warmed it up once, and each says it is ready
before it takes work, so the time box measures the item and not start-up. Output rows keep the input order.

`set_metrics` turns the table into set-level metrics (each with its definition string, see `METRIC_DEFINITIONS`),
`evaluate_sample_set` evaluates a sample-set folder (ARCHITECTURE.md) and writes ``eval.csv`` and
``eval_summary.json``; ``crystallab evaluate`` is the CLI. Uniqueness and novelty live in `engine.evaluate.metrics`.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from engine.crystal.postprocess import finished_flags, postprocess
from engine.evaluate.checks import ROW_FIELDS, check_cif, empty_row, failed_row, mark_missed_hits
from engine.evaluate.metrics import METRIC_DEFINITIONS, TrainingIndex, macro_average, set_metrics
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
_STARTUP_TIMEOUT_S = 120.0
"""How long a fresh worker may take to import and warm up before evaluation gives up (seconds)."""


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


def _worker_main(conn: Connection, fn: Callable[..., dict], init: Callable[[], None] | None = None) -> None:
    """Worker loop: warm up (and run ``init``), say ready, then answer ``(index, *args)`` tasks with ``fn(*args)``."""
    evaluate_one(_WARMUP_CIF, raw=False)
    if init is not None:
        init()
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        conn.send((task[0], fn(*task[1:])))


class _Worker:
    """One killable worker process and the item it is working on."""

    def __init__(self, ctx: mp.context.BaseContext, fn: Callable[..., dict], init: Callable[[], None] | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, init), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.index: int | None = None
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

    def assign(self, index: int, task: tuple, timeout_s: float | None) -> None:
        self.conn.send(task)
        self.index = index
        self.deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")

    def stop(self, kill: bool) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:  # already dead
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


_parent_warm = False


def _context() -> mp.context.BaseContext:
    """Fork on Linux: workers inherit the parent's imported (and warmed-up) pymatgen and start in milliseconds.

    Not forkserver or spawn there: both re-import the caller's main module in every worker, which breaks scripts
    without a ``__main__`` guard and Streamlit pages. Workers run pymatgen/spglib code, and torch only where the
    parent pinned torch to one thread before using it (`engine.evaluate.relax`), so the usual fork-after-threads
    hazard does not reach them. Elsewhere (macOS, Windows) spawn is the safe choice.
    """
    global _parent_warm
    if sys.platform.startswith("linux"):
        if not _parent_warm:  # one warm-up here instead of one per worker
            evaluate_one(_WARMUP_CIF, raw=False)
            _parent_warm = True
        return mp.get_context("fork")
    return mp.get_context("spawn")


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
    """Run ``fn(*task[1:])`` for every task on ``workers`` killable, time-boxed processes; results in task order.

    Args:
        fn: A module-level function (picklable where workers are spawned) returning a dict.
        tasks: Tuples whose first item is the task's position in ``tasks`` (0, 1, ...), then ``fn``'s arguments.
        workers: Worker processes (at most one per task).
        timeout_s: Time box per task in seconds (None: none). A task over it, or whose worker dies, gets a row
            from `_problem_row` (``failure_reason`` ``timeout`` / ``worker_crashed``) and a fresh worker.
        progress: Called as ``progress(done, total)`` after each task.
        init: Run once in each worker before it says ready (load a model, warm it up), so start-up costs are not
            charged to the first task's time box; a module-level function or ``functools.partial`` of one.
    """
    ctx = _context()
    pending = deque(tasks)
    rows: list[dict | None] = [None] * len(tasks)
    done = 0
    pool = [_Worker(ctx, fn, init) for _ in range(min(workers, len(tasks)))]

    def finish(index: int, row: dict) -> None:
        nonlocal done
        rows[index] = row
        done += 1
        if progress is not None:
            progress(done, len(tasks))

    def feed(w: _Worker) -> None:
        w.index, w.deadline = None, float("inf")
        if pending:
            task = pending.popleft()
            w.assign(task[0], task, timeout_s)

    try:
        while done < len(tasks):
            next_deadline = min(w.deadline for w in pool)
            wait_s = None if next_deadline == float("inf") else max(0.0, next_deadline - time.monotonic())
            for conn in wait([w.conn for w in pool], timeout=wait_s):
                w = next(w for w in pool if w.conn is conn)
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):  # the worker died (segfault, out of memory): replace it
                    if w.index is None:
                        raise RuntimeError("an evaluation worker died while starting; see its stderr above")
                    w.stop(kill=True)
                    finish(w.index, _problem_row("worker_crashed", f"the worker exited with {w.proc.exitcode}"))
                    pool[pool.index(w)] = _Worker(ctx, fn, init)
                    continue
                if message == "ready":
                    w.ready = True
                    feed(w)
                else:
                    finish(*message)
                    feed(w)
            now = time.monotonic()
            for i, w in enumerate(pool):
                if w.deadline > now:
                    continue
                if not w.ready:
                    raise RuntimeError(f"an evaluation worker did not start within {_STARTUP_TIMEOUT_S} s")
                w.stop(kill=True)
                finish(w.index, _problem_row("timeout", f"no verdict within {timeout_s} s; the worker was killed"))
                pool[i] = _Worker(ctx, fn, init)
    finally:
        for w in pool:
            w.stop(kill=done < len(tasks))
    return rows  # type: ignore[return-value]


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
) -> tuple[pd.DataFrame, dict]:
    """Evaluate a sample-set folder: its ``raw/*.txt`` against its ``config.json`` prompt.

    Writes ``processed/NNNN.cif`` for texts that post-process, ``eval.csv`` and ``eval_summary.json`` (the
    `set_metrics` dict), each atomically.

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
    atomic_write_json(folder / "eval_summary.json", metrics)
    return df, metrics


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
    lines.append(f"wrote {out} and {summary}")
    print("\n".join(lines), file=sys.stderr)
    return 0


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
    p.set_defaults(func=_run_cli)

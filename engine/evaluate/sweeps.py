"""Sweeps: sample and evaluate every combination of checkpoints x prompts x temperatures x top-k x top-p x n x seeds.

The sweep config (a YAML mapping of `SweepConfig` fields), its validation and the planning of cells live in
`engine.evaluate.sweep_config`; this module runs a sweep and registers ``crystallab sweep``.

The sweep folder (``runs/sweeps/<name>/`` unless ``--out``) holds ``sweep.yaml`` (the resolved config),
``status.json`` (the run-folder status plus ``cells_done``, ``cells_total``, ``current_cell``, ``cells_redone`` and
``cells_failed``, each with its reason), one sample set per cell under ``cells/<cell>/`` (ARCHITECTURE.md:
``config.json``, ``raw/``, ``processed/``, ``samples.jsonl``, ``eval.csv``, ``eval_summary.json``), and the tables
of `engine.evaluate.report`: ``summary.csv``, ``summary_macro.csv``, ``summary.md`` and ``samples.csv`` (every sample of
every cell).

Cells are named deterministically, ``<checkpoint>__<prompt>__T0.8_k10_p1.0_n100_s1``, so running the same config
again resumes: a cell is finished when its ``eval_summary.json`` exists, its ``config.json`` records the sha256
of the file now at the checkpoint's path and the same prompt and sampling settings. A cell sampled with another
checkpoint or other settings is deleted and redone (the ``redo`` progress event and ``cells_redone`` say why); a
cell sampled but not yet evaluated is only evaluated. Each checkpoint is loaded once. Evaluation of a cell runs in
a background thread (which drives the evaluator's worker processes) while the next cell is sampled (``overlap``).
A ``STOP`` file in the sweep folder stops the sweep at the sampler's next progress report (Ctrl-C at once): the
cell being sampled is discarded, the evaluation under way is finished, and the next run resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from engine.evaluate.sweep_config import (
    Cell,
    SweepConfig,
    cell_knobs,
    dump_sweep_config,
    key_docs,
    load_sweep_config,
    plan_cells,
    resolve_checkpoint_path,
    resolve_out_dir,
    resolve_reference_path,
    stale_reason,
)
from engine.lab.errors import CheckpointError, ConfigError, CrystallabError
from engine.lab.fsutil import atomic_write_text, read_json
from engine.lab.jobs import FolderLock, hold_folder
from engine.lab.settings import get_settings

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
"""A file of this name in the sweep folder asks the sweep to stop (as for training runs)."""


# ----------------------------------------------------------------------------------------------------------------
# Running


class _StopRequested(Exception):
    """Raised inside sampling when the sweep folder holds a ``STOP`` file."""


Progress = Callable[[str, "Cell | None", dict[str, Any]], None]
"""``progress(event, cell, status)``, called in the sweep's thread. Events: ``skip`` (finished cell kept),
``redo`` (``status["message"]`` says why), ``sample``, ``sampled``, ``evaluated``, ``eval_failed``."""


def _dataset_dir(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    settings = get_settings()
    return settings.datasets_dir / name if (settings.datasets_dir / name).is_dir() else settings.runs_dir / name


def _lock(out: Path) -> FolderLock:
    """Own the sweep folder (released by the kernel if this process dies); a busy one names its holder."""
    return hold_folder(out, "sweep folder", "wait for that sweep, stop it (a STOP file in that folder), or "
                       "choose another --out")


class _Sweep:
    """State of one `run_sweep` call: status file, cell bookkeeping, the background evaluator.

    Only the sweep's own thread touches the bookkeeping and writes the status; the evaluator thread just runs
    `evaluate_sample_set` on one cell folder at a time, and `collect` picks up its results.
    """

    def __init__(self, config: SweepConfig, out: Path, progress: Progress | None) -> None:
        from engine.lab.runs import RunFolder

        self.config, self.out, self.progress = config, out, progress
        self.cells_dir = out / "cells"
        self.folder = RunFolder(out)
        self.cells = plan_cells(config)
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.redone: dict[str, str] = {}
        self.errors: list[BaseException] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweep-eval")
        self.futures: dict[str, Future] = {}
        self.train_index = None
        self.reference = None  # an engine.evaluate.distribution.Reference, read once per sweep

    # --- status ---
    def status(self, event: str | None, cell: Cell | None, **fields: Any) -> dict[str, Any]:
        status = self.folder.write_status(
            cells_total=len(self.cells), cells_done=len(self.done), cells_failed=self.failed,
            cells_redone=self.redone, **fields,
        )
        if event is not None and self.progress is not None:
            self.progress(event, cell, status)
        return status

    def stop_requested(self) -> bool:
        return (self.out / STOP_FILE).exists()

    # --- evaluation in the background ---
    def _evaluate(self, cell: Cell) -> None:
        from engine.evaluate.evaluation import evaluate_sample_set

        ref = self.config.reference
        evaluate_sample_set(self.cells_dir / cell.name, workers=self.config.eval_workers,
                            timeout_s=self.config.eval_timeout_s, train_index=self.train_index,
                            reference=self.reference, cutoffs=tuple(ref["cutoffs"]) if ref else None,
                            stability=self.config.stability)

    def submit_eval(self, cell: Cell) -> None:
        self.futures[cell.name] = self.pool.submit(self._evaluate, cell)

    def collect(self, wait: bool) -> None:
        """Record finished evaluations (all of them when ``wait``) and refresh the summary."""
        changed = False
        for name, fut in list(self.futures.items()):
            if not (wait or fut.done()):
                continue
            if fut.cancelled():
                del self.futures[name]
                continue
            exc = fut.exception()  # blocks until this evaluation ends
            del self.futures[name]
            cell = next(c for c in self.cells if c.name == name)
            changed = True
            if exc is None:
                self.done.add(name)
                self.status("evaluated", cell, message=f"evaluated {name}")
            else:
                if not isinstance(exc, CrystallabError):
                    log.error("evaluating %s failed", name, exc_info=exc)
                self.errors.append(exc)
                self.failed[name] = f"evaluation failed: {exc}"
                self.status("eval_failed", cell, message=f"evaluation of {name} failed: {exc}")
        if changed:
            self.write_report(with_samples=False)

    def write_report(self, with_samples: bool) -> None:
        from engine.evaluate.report import write_sweep_report

        write_sweep_report(self.out, [c.name for c in self.cells if c.name in self.done],
                           checkpoints=self.config.checkpoints, title=self.config.name,
                           description=self.config.description, with_samples=with_samples)


def _classify(sweep: _Sweep, infos: dict[str, dict]) -> dict[str, str]:
    """``done`` / ``sampled`` (evaluate only) / ``todo`` per cell; stale cells are deleted and reported."""
    state = {}
    for cell in sweep.cells:
        cell_dir = sweep.cells_dir / cell.name
        recorded = read_json(cell_dir / "config.json")
        if recorded is None:
            if cell_dir.exists():
                shutil.rmtree(cell_dir)  # not a sample set (the sampler renames a set into place complete)
            state[cell.name] = "todo"
            continue
        info = infos[cell.checkpoint]
        reason = stale_reason(cell, sweep.config, recorded, info["sha256"], info["family_class"])
        if reason is not None:
            shutil.rmtree(cell_dir)
            sweep.redone[cell.name] = reason
            state[cell.name] = "todo"
            sweep.status("redo", cell, message=f"redoing {cell.name}: {reason}")
        elif (cell_dir / "eval_summary.json").exists() and _has_extras(sweep.config, cell_dir):
            sweep.done.add(cell.name)
            state[cell.name] = "done"
            sweep.status("skip", cell, message=f"{cell.name} is finished")
        else:
            state[cell.name] = "sampled"
    return state


def _has_extras(config: SweepConfig, cell_dir: Path) -> bool:
    """Whether a cell's summary holds the distribution / stability metrics the config asks for (a cell evaluated
    before ``reference`` or ``stability`` was added is evaluated again)."""
    summary = read_json(cell_dir / "eval_summary.json") or {}
    want = (["cov_recall"] if config.reference else []) + (["stable_rate"] if config.stability else [])
    return all(key in summary for key in want)


def _checkpoint_infos(config: SweepConfig) -> dict[str, dict]:
    """Per label: path, sha256, model family (and its class) of each checkpoint, checked before any sampling.

    Raises:
        CheckpointError: a missing or unusable checkpoint.
        ConfigError: a ``knobs`` key no checkpoint's family has, or a value outside a family's range.
    """
    from engine.models.family import get_family, peek_family

    infos = {}
    for label, path in config.checkpoints.items():
        p = resolve_checkpoint_path(path)
        if not p.is_file():
            raise CheckpointError(
                f"checkpoint {label!r}: {p} does not exist (relative paths are under the runs root "
                f"{get_settings().runs_dir}): train or copy the checkpoint there, or point "
                f"checkpoints.{label} at it (e.g. --set checkpoints.{label}=/path/to/ckpt.pt)"
            )
        family = peek_family(p)
        card = get_family(family).checkpoint_card(p)
        if card["problem"]:
            raise CheckpointError(f"checkpoint {label!r} ({p}) cannot be used: {card['problem']}")
        infos[label] = {**card["info"], "family": family, "family_class": get_family(family)}
    known = {k.name for info in infos.values() for k in info["family_class"].knobs}
    unknown = sorted(set(config.knobs) - known)
    if unknown:
        families = ", ".join(sorted({info["family"] for info in infos.values()}))
        raise ConfigError(f"sweep config: knobs {', '.join(unknown)} belong to none of this sweep's model families "
                          f"({families}); their knobs are {', '.join(sorted(known))}")
    for cell in plan_cells(config):  # every cell's values within its family's ranges, before anything runs
        cell_knobs(infos[cell.checkpoint]["family_class"], cell, config)
    return infos


def _sample_cell(model: Any, cell: Cell, sweep: _Sweep) -> None:
    """Write one cell's sample set (evaluation follows in the background)."""
    from engine.sample.sample_sets import write_sample_set

    def check_stop(done: int, total: int) -> None:
        if sweep.stop_requested():
            raise _StopRequested

    c = sweep.config
    write_sample_set(model, cell.prompt, sweep.cells_dir / cell.name, n=cell.n, knobs=cell_knobs(type(model), cell, c),
                     seed=cell.seed, batch_size=c.batch_size, evaluate=False, progress=check_stop)


def run_sweep(config: SweepConfig, out_dir: str | os.PathLike | None = None, *,
              progress: Progress | None = None) -> Path:
    """Run (or resume) a sweep: sample and evaluate every cell not already finished, then write the report.

    Args:
        config: A validated `SweepConfig` (`load_sweep_config`).
        out_dir: Sweep folder; relative paths are under ``runs/sweeps/`` (default ``runs/sweeps/<name>``).
        progress: Optional `Progress` callback.

    Returns:
        The sweep folder.

    Raises:
        CheckpointError: a checkpoint file is missing or unusable (checked before anything is sampled).
        ConfigError: the device is unavailable, or another sweep is running in the same folder.
        InputError: ``out_dir`` is an existing file.
        Exception: the first evaluation error, re-raised after every other cell ran and the report was written.
    """
    import torch

    from engine.models.checkpoint import checkpoint_sha256
    from engine.models.family import load_family_model
    from engine.sample.sampler import resolve_device

    out = resolve_out_dir(out_dir, config.name).resolve()
    device = resolve_device(config.device)
    if device.type == "cpu" and config.overlap and "OMP_NUM_THREADS" not in os.environ:
        # Sampling shares the CPU with the evaluator's worker processes; oversubscribed torch threads spin
        # against them (measured 10-100x slower on 2 cores), so sampling keeps only the cores they leave.
        workers = config.eval_workers or os.cpu_count() or 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    infos = _checkpoint_infos(config)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    sweep = _Sweep(config, out, progress)
    try:
        (out / "cells").mkdir(exist_ok=True)
        for partial in (out / "cells").glob(".*.partial*"):
            shutil.rmtree(partial)  # a cell being sampled when a previous sweep was killed: its settings may differ
        atomic_write_text(out / "sweep.yaml", dump_sweep_config(config))
        sweep.folder.write_env(str(device))  # version, git commit, device: the report states them
        sweep.status(None, None, state="running", pid=os.getpid(), host=_host(), error=None, device=str(device),
                     current_cell=None, message="starting")
        state = _classify(sweep, infos)
        if config.train_dataset and any(s != "done" for s in state.values()):
            from engine.evaluate.evaluation import TrainingIndex

            sweep.train_index = TrainingIndex.from_dataset(_dataset_dir(config.train_dataset))
        if config.reference and any(s != "done" for s in state.values()):
            from engine.evaluate.distribution import load_reference

            sweep.reference = load_reference(resolve_reference_path(config.reference["path"]),
                                             limit=config.reference.get("limit"))
        for cell in sweep.cells:
            if state[cell.name] == "sampled":
                sweep.submit_eval(cell)
        sweep.collect(wait=not config.overlap)
        for label, info in infos.items():
            todo = [c for c in sweep.cells if c.checkpoint == label and state[c.name] == "todo"]
            if not todo:
                continue
            model = load_family_model(info["path"], device)
            if checkpoint_sha256(info["path"]) != info["sha256"]:
                raise CheckpointError(f"checkpoint {label!r} ({info['path']}) changed while the sweep read it "
                                      "(is a training run still writing it?); run the sweep again")
            for cell in todo:
                if sweep.stop_requested():
                    raise _StopRequested
                sweep.status("sample", cell, current_cell=cell.name, message=f"sampling {cell.name}")
                _sample_cell(model, cell, sweep)
                sweep.status("sampled", cell, message=f"sampled {cell.name}")
                sweep.submit_eval(cell)
                sweep.collect(wait=not config.overlap)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        sweep.status(None, None, current_cell=None, message="evaluating the last cells")
        sweep.collect(wait=True)
        sweep.write_report(with_samples=True)
    except _StopRequested:
        _wind_down(sweep)
        sweep.status(None, None, state="stopped", current_cell=None, message="stopped on request")
        return out
    except KeyboardInterrupt:
        _wind_down(sweep)
        sweep.status(None, None, state="stopped", current_cell=None, message="interrupted (Ctrl-C)")
        raise
    except BaseException as exc:
        _wind_down(sweep)
        error = str(exc) or type(exc).__name__
        sweep.status(None, None, state="failed", current_cell=None, error=error, message=f"failed: {error}")
        raise
    finally:
        sweep.pool.shutdown(wait=True, cancel_futures=True)
        (out / STOP_FILE).unlink(missing_ok=True)
        lock.release()
    if sweep.errors:
        sweep.status(None, None, state="failed", error=str(sweep.errors[0]),
                     message=f"{len(sweep.failed)} cell(s) failed; the others are in the report")
        raise sweep.errors[0]
    sweep.status(None, None, state="completed", current_cell=None,
                 message=f"{len(sweep.done)}/{len(sweep.cells)} cells finished")
    return out


def _wind_down(sweep: _Sweep) -> None:
    """After an interruption: drop queued evaluations (resumed next time), keep the one running, report."""
    sweep.progress = None  # the caller's callback may be what interrupted the sweep
    for fut in sweep.futures.values():
        fut.cancel()
    sweep.collect(wait=True)


def _host() -> str:
    import socket

    return socket.gethostname()


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _print_progress(event: str, cell: Cell | None, status: dict[str, Any]) -> None:
    done, total = status.get("cells_done"), status.get("cells_total")
    print(f"[{done}/{total}] {status.get('message', event)}", file=sys.stderr, flush=True)


def _run_cli(args: argparse.Namespace) -> int:
    if args.keys:
        for key, doc in key_docs().items():
            print(f"{key:16s} {doc}")
        return 0
    if args.config is None:
        raise ConfigError("give a sweep config file (see configs/sweep_*.yaml) or --keys")
    config = load_sweep_config(args.config, args.set or [])
    if args.check:
        out = resolve_out_dir(args.out, config.name)  # refuses an unusable --out before printing anything
        print(dump_sweep_config(config), end="")
        print(f"# {len(plan_cells(config))} cells -> {out}")
        return 0
    out = run_sweep(config, args.out, progress=_print_progress)
    status = read_json(out / "status.json", default={}) or {}
    if status.get("state") == "stopped":
        print(f"stopped; run the same command again to resume  ->  {out}")
        return 1
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"->  {out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab sweep``."""
    p = subparsers.add_parser(
        "sweep",
        help="sample and evaluate checkpoints x prompts x temperatures x top-k x top-p x n; resumable",
        description=(
            "Run a sweep config (configs/sweep_*.yaml): one evaluated sample set per cell under "
            "<out>/cells/, then summary.csv / summary.md. Running the same command again resumes: finished "
            "cells are kept unless their checkpoint file or settings changed."
        ),
    )
    p.add_argument("config", nargs="?", type=Path, help="sweep YAML file")
    p.add_argument("--out", default=None,
                   help="sweep folder; relative paths are under <runs>/sweeps (default <runs>/sweeps/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key (repeatable), value read as YAML: n=20, temperatures=[0.8,0.4], "
                        "checkpoints.mine=train/run/ckpt/best.pt")
    p.add_argument("--check", action="store_true", help="validate, print the resolved config and cell count; "
                   "do not run")
    p.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    p.set_defaults(func=_run_cli)

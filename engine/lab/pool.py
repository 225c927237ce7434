"""A pool of killable, time-boxed worker processes for work that compiled code may never finish.

spglib, Voronoi and CrystalNN run in C and ignore Python signals: one odd input (a 5,000-atom cell, a generated
CIF whose wrong space group expands it) can keep a process busy for minutes. `run_pool` hands each input to a
worker process with a time box; a worker over it is killed, the input gets a "timeout" result, a fresh worker
takes its place and the rest carry on. Workers fork from the caller, which warmed up pymatgen once, and each says
it is ready before it takes work, so the time box measures the input and not start-up. Results keep task order.

Used by evaluation and CSP scoring (`engine.evaluate.evaluation`), dataset builds (`engine.data.datasets`) and
``crystallab cif canonicalize`` (`engine.crystal.canonical`).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

Progress = Callable[[int, int], None]

STARTUP_TIMEOUT_S = 120.0
"""How long a fresh worker may take to import and warm up before the pool gives up (seconds)."""


def _worker_main(conn: Connection, fn: Callable[..., Any], warm_up: Callable[[], None] | None,
                 problem: Callable[[str, str], Any], error_reason: str, init: Callable[[], None] | None) -> None:
    """Worker loop: warm up, say ready, then answer ``(index, *args)`` tasks with ``fn(*args)`` until None.

    An exception from ``fn`` is that task's result (``problem(error_reason, detail)``), not the worker's death."""
    if warm_up is not None:
        warm_up()
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
        try:
            row = fn(*task[1:])
        except Exception as exc:  # noqa: BLE001 - code that breaks on one odd input is that input's verdict
            row = problem(error_reason, f"{type(exc).__name__}: {exc}"[:500])
        conn.send((task[0], row))


class _Worker:
    """One killable worker process and the task it is working on."""

    def __init__(self, ctx: mp.context.BaseContext, fn: Callable[..., Any], warm_up: Callable[[], None],
                 problem: Callable[[str, str], Any], error_reason: str, init: Callable[[], None] | None) -> None:
        self.conn, child = ctx.Pipe()
        # A forked worker inherits the parent's warm state (see `_context`); a spawned one starts cold.
        own_warm_up = None if ctx.get_start_method() == "fork" else warm_up
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, own_warm_up, problem, error_reason, init),
                                daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.index: int | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

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


_parent_warm: set[Callable[[], None]] = set()


def _context(warm_up: Callable[[], None]) -> mp.context.BaseContext:
    """Fork on Linux: workers inherit the parent's imported (and warmed-up) pymatgen and start in milliseconds.

    Not forkserver or spawn there: both re-import the caller's main module in every worker, which breaks scripts
    without a ``__main__`` guard and Streamlit pages. Workers only run pymatgen/spglib code, never torch, so the
    usual fork-after-threads hazard does not reach them. Elsewhere (macOS, Windows) spawn is the safe choice.
    """
    if sys.platform.startswith("linux"):
        if warm_up not in _parent_warm:  # one warm-up here instead of one per worker
            warm_up()
            _parent_warm.add(warm_up)
        return mp.get_context("fork")
    return mp.get_context("spawn")


def run_pool(
    fn: Callable[..., Any],
    tasks: list[tuple],
    workers: int,
    timeout_s: float | None,
    progress: Progress | None = None,
    *,
    problem: Callable[[str, str], Any],
    warm_up: Callable[[], None],
    error_reason: str = "task_error",
    init: Callable[[], None] | None = None,
) -> list[Any]:
    """Run ``fn(*task[1:])`` for every task on ``workers`` killable, time-boxed processes; results in task order.

    Args:
        fn: A module-level function (picklable where workers are spawned); its result must pickle.
        tasks: Tuples whose first item is the task's position in ``tasks`` (0, 1, ...), then ``fn``'s arguments.
        workers: Worker processes (at most one per task).
        timeout_s: Time box per task in seconds (None: none). A task over it, or whose worker dies, gets
            ``problem(reason, detail)`` as its result (reason ``timeout`` or ``worker_crashed``) and a fresh worker.
        progress: Called as ``progress(done, total)`` after each task.
        problem: Builds the result of a task that timed out, whose worker died, or whose ``fn`` raised.
        error_reason: The reason given to ``problem`` when ``fn`` raises (its detail is the exception).
        init: Run in each worker (never in this process) before it says ready, outside the time box: load what a
            worker needs that must not be forked, such as a model on a GPU; a module-level function or a
            ``functools.partial`` of one.
        warm_up: A module-level function run once in each worker (and once in this process, which workers fork
            from) before any time box starts, so first-use costs are not charged to the first task.
    """
    if not tasks:
        return []
    ctx = _context(warm_up)
    pending = deque(tasks)
    rows: list[Any] = [None] * len(tasks)
    done = 0
    pool = [_Worker(ctx, fn, warm_up, problem, error_reason, init) for _ in range(max(1, min(workers, len(tasks))))]

    def finish(index: int, row: Any) -> None:
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
                        raise RuntimeError("a pool worker died while starting; see its stderr above")
                    w.stop(kill=True)
                    finish(w.index, problem("worker_crashed", f"the worker exited with {w.proc.exitcode}"))
                    pool[pool.index(w)] = _Worker(ctx, fn, warm_up, problem, error_reason, init)
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
                    raise RuntimeError(f"a pool worker did not start within {STARTUP_TIMEOUT_S:g} s")
                w.stop(kill=True)
                finish(w.index, problem("timeout", f"no result within {timeout_s:g} s; the worker was killed"))
                pool[i] = _Worker(ctx, fn, warm_up, problem, error_reason, init)
    finally:
        for w in pool:
            w.stop(kill=done < len(tasks))
    return rows

"""Detached background jobs: long work (training, sampling, sweeps, dataset builds) outside the dashboard process.

A job is one ``crystallab`` command run by ``python -m engine.lab.jobs <job_dir> -- <argv>`` in its own session
(``start_new_session=True``), so closing the browser tab, reloading the page or restarting the Streamlit server
neither kills nor duplicates it. Everything about a job lives in its folder, which pages re-read on every rerun:

```
<job_dir>/job.json    {"pid", "pid_start", "argv", "kind", "target", "started_at"}   (written once, atomically)
<job_dir>/log.txt     the command's stdout and stderr
<job_dir>/exit.json   {"returncode", "ended_at"}   (written by the wrapper when the command returns)
<job_dir>/stop.json   {"requested_at", "grace_s"}  (a stop was requested)
```

Launching takes an exclusive ``flock`` on ``<job_dir>/.launch.lock``; inside it a job that is still running is
returned instead of starting a second one, so two tabs pressing "launch" at once start one job. The lock is
released by the kernel if the launcher dies, so it never goes stale.

Output folders (a training run, a sample set being written, a sweep, a CSP run) are owned by one live process:
`hold_folder` takes an exclusive ``flock`` on ``<folder>/.owner.lock`` and writes the holder (pid, host, start
time, command) into it, so a second process is refused with a message naming the holder. The kernel drops the
lock when its process dies, so a lock left by a killed process is stale by construction and is taken over (the
new holder's record replaces the dead one's, and `FolderLock.previous` says who that was).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_json, read_json

JOB_FILE = "job.json"
LOG_FILE = "log.txt"
EXIT_FILE = "exit.json"
STOP_REQUEST_FILE = "stop.json"
STOP_FILE = "STOP"
"""Name of the stop-request file the trainer (and sweeps) poll in their output folder."""

DEFAULT_GRACE_S = 60.0
"""Seconds a job gets to stop by itself after a STOP file before it is sent SIGTERM."""
KILL_AFTER_S = 30.0
"""Seconds after SIGTERM before a job that is still alive is killed (SIGKILL)."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` stripped if it is usable as a folder name (letters, digits, ``.``, ``_``, ``-``).

    Raises:
        InputError: empty, too long (over 80 characters), or containing other characters (``/``, spaces).
    """
    name = (name or "").strip()
    if not _NAME.match(name):
        raise InputError(
            f"{what} {name!r} cannot be used as a folder name: use 1-80 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None when unknown.

    Recorded at launch and compared later so a recycled pid is never mistaken for our job.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after the last ")" are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[19])


def _proc_state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()[0]


def pid_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """True when process ``pid`` exists, is not a zombie and (if given) started at ``start_ticks``."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists but belongs to someone else
    state = _proc_state(pid)
    if state == "Z":
        _reap(pid)
        return False
    if start_ticks is not None and state is not None:
        return _proc_start_ticks(pid) == start_ticks
    return True


def _reap(pid: int) -> None:
    """Collect an exited child of this process so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent (or init) reaps it


@contextmanager
def _launch_lock(job_dir: Path) -> Iterator[None]:
    job_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(job_dir / ".launch.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


OWNER_FILE = ".owner.lock"


class FolderLock:
    """An exclusive hold on an output folder, released by `release` (or by the kernel when the process dies)."""

    def __init__(self, folder: Path, fd: int, holder: dict, previous: dict | None) -> None:
        self.folder, self.holder, self.previous = folder, holder, previous
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking it would race a new holder)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None  # torn or foreign content: no holder to name


def describe_holder(holder: dict | None) -> str:
    """``process PID on HOST (since TIME: COMMAND)`` for a holder record (see `hold_folder`)."""
    if not holder:
        return "another process"
    command = " ".join(holder.get("argv") or [])
    return (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started_at')}"
            + (f": {command}" if command else "") + ")")


def hold_folder(folder: str | os.PathLike, what: str, hint: str = "wait for it to finish or stop it") -> FolderLock:
    """Take the folder's owner lock (creating the folder), or refuse naming the live process that holds it.

    Args:
        folder: The output folder.
        what: What the folder is, for the message ("run folder", "sample set").
        hint: What the user can do about a busy folder.

    Raises:
        InputError: another live process holds the folder (its pid, host, start time and command are named), or
            the lock file cannot be created there.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / OWNER_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise InputError(f"{what} {folder} cannot be written ({exc.strerror}); choose another folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise InputError(f"{what} {folder} is in use by {describe_holder(holder)}; {hint}") from None
    previous = _read_holder(fd)
    holder = {"pid": os.getpid(), "pid_start": _proc_start_ticks(os.getpid()), "host": socket.gethostname(),
              "started_at": _now(), "argv": sys.argv[1:]}
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return FolderLock(folder, fd, holder, previous)


def folder_holder(folder: str | os.PathLike) -> dict | None:
    """The record of the live process holding ``folder`` (see `hold_folder`), or None when it is free."""
    path = Path(folder) / OWNER_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def launch_job(
    argv: list[str],
    job_dir: str | os.PathLike,
    *,
    kind: str,
    target: str | os.PathLike | None = None,
    replace_finished: bool = False,
) -> dict:
    """Start ``crystallab <argv>`` as a detached process that outlives the caller.

    Args:
        argv: the command line after ``crystallab``, e.g. ``["train", "--config", "c.yaml"]``.
        job_dir: folder for this job's bookkeeping (``job.json``, ``log.txt``, ``exit.json``).
        kind: what the job does (``"train"``, ``"sample"``, ``"sweep"``, ``"data"``); shown in the UI.
        target: the output folder the command writes (a run, sample set or sweep); a stop request writes its
            ``STOP`` file there.
        replace_finished: when ``job_dir`` holds a job that has ended, move its records to
            ``history/<n>/`` and start the new one (e.g. resuming a stopped training run); otherwise refuse,
            unless the ended job left no ``target`` behind (it failed or was stopped early): then the name is
            free again and its records are archived the same way.

    Returns:
        The job record (``job.json`` contents) plus ``"reused": True`` when a job was already running in
        ``job_dir`` and no new process was started.

    Raises:
        InputError: ``job_dir`` already holds a finished job (choose a new name) or ``argv`` is empty.
    """
    if not argv:
        raise InputError("launch_job needs a command to run (argv is empty)")
    job_dir = Path(job_dir)
    with _launch_lock(job_dir):
        existing = read_json(job_dir / JOB_FILE)
        if existing is not None:
            if pid_alive(existing.get("pid"), existing.get("pid_start")):
                return {**existing, "reused": True}
            left_nothing = target is not None and not Path(target).exists()
            if not (replace_finished or left_nothing):
                raise InputError(
                    f"job folder {job_dir} already holds a {existing.get('kind', '')} job started at "
                    f"{existing.get('started_at')}; choose a new name to start another one"
                )
            _archive(job_dir)
        log = open(job_dir / LOG_FILE, "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.lab.jobs", str(job_dir), "--", *map(str, argv)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parents[2]),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        record = {
            "pid": proc.pid,
            "pid_start": _proc_start_ticks(proc.pid),
            "argv": list(map(str, argv)),
            "kind": kind,
            "target": str(target) if target is not None else None,
            "started_at": _now(),
        }
        atomic_write_json(job_dir / JOB_FILE, record)
    # Reap the child when it exits (this process is its parent until the server restarts).
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return {**record, "reused": False}


def _archive(job_dir: Path) -> None:
    """Move an ended job's records into ``history/<n>/`` so a new job can start in the same folder."""
    history = job_dir / "history"
    n = 1 + max((int(p.name) for p in history.glob("*") if p.name.isdigit()), default=0)
    dest = history / str(n)
    dest.mkdir(parents=True)
    for name in (JOB_FILE, LOG_FILE, EXIT_FILE, STOP_REQUEST_FILE):
        if (job_dir / name).exists():
            os.replace(job_dir / name, dest / name)


def job_state(job_dir: str | os.PathLike) -> dict:
    """Where a job stands, from its folder alone (works after a server restart).

    Returns:
        ``{"state", "pid", "kind", "argv", "target", "started_at", "ended_at", "returncode",
        "run_status", "message"}`` where ``state`` is one of:

        - ``"none"``: no job was ever launched here;
        - ``"running"``: the process is alive;
        - ``"finished"``: it exited with status 0;
        - ``"stopped"``: it exited after a stop request (or its run reports ``stopped``);
        - ``"failed"``: it exited with a non-zero status (the message says which);
        - ``"died"``: the process is gone without recording an exit (killed, machine rebooted).

        ``run_status`` is the target folder's ``status.json`` when it has one.
    """
    job_dir = Path(job_dir)
    job = read_json(job_dir / JOB_FILE)
    if job is None:
        return {"state": "none", "message": f"no job in {job_dir}"}
    target = job.get("target")
    run_status = read_json(Path(target) / "status.json") if target else None
    exit_rec = read_json(job_dir / EXIT_FILE)
    stop_rec = read_json(job_dir / STOP_REQUEST_FILE)
    out = {
        **job,
        "run_status": run_status,
        "ended_at": exit_rec.get("ended_at") if exit_rec else None,
        "returncode": exit_rec.get("returncode") if exit_rec else None,
        "stop_requested": stop_rec is not None,
    }
    if pid_alive(job.get("pid"), job.get("pid_start")):
        _enforce_stop_deadline(job, stop_rec)
        return {**out, "state": "running", "message": f"running (pid {job['pid']})"}
    run_state = (run_status or {}).get("state")
    if exit_rec is None:
        if stop_rec is not None:
            return {**out, "state": "stopped", "message": "stopped on request"}
        return {**out, "state": "died", "message": "the process ended without recording an exit "
                "(killed or the machine restarted); see the log"}
    rc = exit_rec.get("returncode")
    if run_state == "stopped" or (stop_rec is not None and rc != 0):
        return {**out, "state": "stopped", "message": "stopped on request"}
    if rc == 0:
        return {**out, "state": "finished", "message": "finished"}
    reason = ((run_status or {}).get("error") or exit_rec.get("error") or _error_line(job_dir)
              or f"exit status {rc}")
    return {**out, "state": "failed", "message": f"failed: {reason}"}


def _error_line(job_dir: Path) -> str | None:
    """The last ``error: ...`` line the CLI printed (a user error, already readable)."""
    for line in reversed(tail_log(job_dir, 50).splitlines()):
        if line.startswith("error: "):
            return line[len("error: "):]
    return None


def _signal_group(job: dict, sig: int) -> bool:
    pid = job.get("pid")
    if not pid_alive(pid, job.get("pid_start")):
        return False
    try:
        os.killpg(pid, sig)  # the job leads its own session, so its workers get the signal too
    except ProcessLookupError:
        return False
    return True


def _enforce_stop_deadline(job: dict, stop_rec: dict | None) -> None:
    """SIGTERM once the grace period is over; SIGKILL if that was ignored for ``KILL_AFTER_S`` more."""
    if stop_rec is None:
        return
    overdue = time.time() - float(stop_rec.get("requested_ts", 0)) - float(stop_rec.get("grace_s", 0))
    if overdue >= KILL_AFTER_S:
        _signal_group(job, signal.SIGKILL)
    elif overdue >= 0:
        _signal_group(job, signal.SIGTERM)


def _later(delay_s: float, job: dict, sig: int) -> None:
    timer = threading.Timer(delay_s, _signal_group, args=(job, sig))
    timer.daemon = True
    timer.start()


def request_stop(job_dir: str | os.PathLike, grace_s: float = DEFAULT_GRACE_S) -> dict:
    """Ask a running job to stop; returns its state afterwards.

    Writes ``STOP`` in the job's target folder when that exists (the trainer finishes its step, saves a
    checkpoint and exits); if the job is still alive ``grace_s`` seconds later it gets SIGTERM. The deadline is
    also enforced by every later ``job_state`` call, so it holds across dashboard restarts; a job that survives
    SIGTERM by ``KILL_AFTER_S`` seconds is killed.

    Args:
        grace_s: seconds to wait for a clean exit before SIGTERM; 0 terminates at once.
    """
    job_dir = Path(job_dir)
    job = read_json(job_dir / JOB_FILE)
    if job is None:
        raise InputError(f"there is no job in {job_dir} to stop")
    if not pid_alive(job.get("pid"), job.get("pid_start")):
        return job_state(job_dir)
    if job.get("target") and Path(job["target"]).is_dir():
        # Only a folder the job already made gets the file: creating the target here would leave a folder behind
        # that looks like output (a dataset build publishes its folder only when it is done).
        (Path(job["target"]) / STOP_FILE).write_text(f"stop requested at {_now()}\n")
    atomic_write_json(job_dir / STOP_REQUEST_FILE,
                      {"requested_at": _now(), "requested_ts": time.time(), "grace_s": grace_s})
    if grace_s <= 0:
        _signal_group(job, signal.SIGTERM)
    else:
        _later(grace_s, job, signal.SIGTERM)
    _later(max(grace_s, 0) + KILL_AFTER_S, job, signal.SIGKILL)
    return job_state(job_dir)


def tail_log(job_dir: str | os.PathLike, n: int = 40, max_bytes: int = 256_000) -> str:
    """The last ``n`` lines of a job's log (reads at most ``max_bytes`` from the end)."""
    path = Path(job_dir) / LOG_FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(lines[-n:])


# tqdm bars ("12/100 [00:03<...", or with unit scaling for bytes: "12.3M/45.6M [...") and bracketed counters
# ("[3/8] cell ...") as the CLI commands print them.
_PROGRESS = re.compile(r"([\d.]+)([kMGT]?)/([\d.]+)([kMGT]?) \[|^\[(\d+)/(\d+)\]")
_SCALE = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def progress(job_dir: str | os.PathLike) -> tuple[int, int] | None:
    """``(done, total)`` from the job's latest progress line (a tqdm bar or a ``[done/total]`` counter), or None.

    Unit-scaled bars (``12.3M/45.6M``, as the token-archive import prints bytes) come back in whole units.
    """
    for line in reversed(tail_log(job_dir, 5).splitlines()):
        found = _PROGRESS.findall(line.strip())
        if found:
            done, done_unit, total, total_unit, c_done, c_total = found[-1]
            if c_total:
                return int(c_done), int(c_total)
            try:
                return round(float(done) * _SCALE[done_unit]), round(float(total) * _SCALE[total_unit])
            except ValueError:  # "1.2.3/4 [" is no bar
                continue
    return None


def list_jobs(root: str | os.PathLike) -> list[Path]:
    """Job folders (those holding ``job.json``) directly under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if (p / JOB_FILE).is_file()]
    return sorted(dirs, key=lambda p: (p / JOB_FILE).stat().st_mtime, reverse=True)


def _run_wrapped(job_dir: Path, argv: list[str]) -> int:
    """Body of the detached process: run the command, then record how it ended."""
    from engine.cli import main  # imported here: the wrapper must start even if a command module is broken

    wrapper_pid = os.getpid()

    def _terminate(signum: int, _frame: object) -> None:
        if os.getpid() != wrapper_pid:
            # A forked worker (e.g. of a process pool) inherited this handler: die as SIGTERM means, so the
            # pool breaks and the main process can finish instead of waiting on workers that ignore it.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt  # lets the command write its "stopped" status and exit cleanly

    signal.signal(signal.SIGTERM, _terminate)
    rc, error = 1, None
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        rc = 130
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record = {"returncode": rc, "ended_at": _now()}
        if error:
            record["error"] = error
        atomic_write_json(job_dir / EXIT_FILE, record)
    return rc


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 2 or args[1] != "--":
        print("usage: python -m engine.lab.jobs <job_dir> -- <crystallab argv...>", file=sys.stderr)
        raise SystemExit(2)
    print(f"$ crystallab {' '.join(json.dumps(a) if ' ' in a else a for a in args[2:])}", flush=True)
    raise SystemExit(_run_wrapped(Path(args[0]), args[2:]))

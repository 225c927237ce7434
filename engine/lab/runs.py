"""The run-folder contract (ARCHITECTURE.md, "Run folders"): status, environment, metrics, config, checkpoints.

A training run folder ``runs/train/<run>/`` holds::

    config.yaml    resolved config, written once
    env.json       package versions, git sha, device, host, python
    status.json    {"state", "step", "max_steps", "pid", "last_ckpt", "best_ckpt", ...}, replaced atomically
    metrics.jsonl  one JSON object per record, append-only
    log.txt        human-readable log
    ckpt/          last.pt, best.pt
    STOP           a stop request (the dashboard's stop button writes it; the trainer removes it at exit)
    .owner.lock    held by the one live process training into the folder (pid, host, start; `engine.lab.jobs`)

Readers (dashboard, CLI) only use this module, so a run that crashed or was killed is reported honestly:
a status that says ``running`` whose process is gone on this host reads as ``died``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.lab.fsutil import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl
from engine.lab.jobs import FolderLock, hold_folder, pid_alive
from engine.lab.settings import REPO_ROOT, get_settings

STATES = ("pending", "running", "completed", "failed", "stopped")
"""States a writer may record; readers may also see ``died`` (running, but the process is gone)."""

KINDS = ("train", "samples", "sweeps")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """One run folder; every method reads or writes one file of the contract."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock: FolderLock | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # --- paths ---
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def env_path(self) -> Path:
        return self.path / "env.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "ckpt"

    @property
    def stop_path(self) -> Path:
        return self.path / "STOP"

    # --- creation ---
    @classmethod
    def create(cls, name: str, kind: str = "train", root: Path | None = None) -> RunFolder:
        """Make a new, empty run folder ``<root>/<YYYYmmdd-HHMMSS>-<name>`` (suffix ``-2``, ``-3`` on clashes)."""
        root = root or get_settings().runs_dir / kind
        root.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"
        for n in range(1, 1000):
            path = root / (stem if n == 1 else f"{stem}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise FileExistsError(f"could not find a free run folder name for {stem} under {root}")

    # --- ownership ---
    def acquire(self) -> FolderLock:
        """Own the folder for this process (see `engine.lab.jobs.hold_folder`); refuses while another process trains.

        Raises:
            InputError: a live process holds it; the message names its pid, host, start time and command.
        """
        if self.lock is None:
            self.lock = hold_folder(self.path, "run folder",
                                    "wait for that run to finish, or stop it (the dashboard's Stop button or a "
                                    f"STOP file in {self.path}) and resume it then")
        return self.lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # --- config and environment (written once) ---
    def write_config(self, yaml_text: str) -> None:
        """Write the resolved config; refuses to overwrite (a run has one config for its whole life)."""
        if self.config_path.exists():
            raise FileExistsError(f"{self.config_path} exists: a run folder's config is written once")
        atomic_write_text(self.config_path, yaml_text)

    def config(self) -> dict[str, Any]:
        """The resolved config as a dict ({} when not written yet)."""
        import yaml

        try:
            return yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            return {}

    def write_env(self, device: str | None = None, **extra: Any) -> dict[str, Any]:
        """Record the environment (versions, git sha, device, host) in ``env.json``; returns it."""
        env = environment_info(device)
        env.update(extra)
        atomic_write_json(self.env_path, env)
        return env

    def env(self) -> dict[str, Any]:
        return read_json(self.env_path, default={})

    # --- status ---
    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``status.json`` (atomic replace); stamps ``updated_at``. Returns the new status."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {fields['state']!r}")
        status = read_json(self.status_path, default={}) or {}
        status.update(fields)
        status["updated_at"] = _now()
        atomic_write_json(self.status_path, status)
        return status

    def read_status(self) -> dict[str, Any]:
        """The status as written, except a ``running`` run whose process is gone reads as ``died``.

        A died run's ``message`` says where to pick up ("the run died; last checkpoint at step N").
        """
        status = dict(read_json(self.status_path, default={}) or {})
        if not status:
            return {"state": "pending", "message": "no status written yet"}
        if status.get("state") == "running" and status.get("host", socket.gethostname()) == socket.gethostname():
            pid = status.get("pid")
            if isinstance(pid, int) and not pid_alive(pid):
                status["state"] = "died"
                step = status.get("last_ckpt_step")
                status["message"] = (
                    f"the run died; last checkpoint at step {step}" if status.get("last_ckpt")
                    else "the run died before writing a checkpoint"
                )
        return status

    # --- metrics ---
    def log_metrics(self, **record: Any) -> None:
        """Append one metrics record (``step``, ``split``, ``loss`` ...); ``time`` is added."""
        record.setdefault("time", time.time())
        append_jsonl(self.metrics_path, record)

    def metrics(self, raw: bool = False) -> list[dict[str, Any]]:
        """The metrics records in the order written, as one continuous curve.

        A resume appends ``{"event": "resume", "step": N}``; records past step N written before it came from a
        process that died after its last checkpoint and were replayed, so they are dropped unless ``raw``.
        """
        records = list(read_jsonl(self.metrics_path))
        if raw:
            return records
        out: list[dict[str, Any]] = []
        for rec in records:
            if rec.get("event") == "resume":
                out = [r for r in out if r.get("step", 0) <= rec.get("step", 0)]
            out.append(rec)
        return out

    # --- checkpoints and stop requests ---
    def checkpoints(self) -> dict[str, Path]:
        """Existing checkpoints by name: ``{"last": .../last.pt, "best": .../best.pt}`` (absent ones left out)."""
        if not self.ckpt_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.ckpt_dir.glob("*.pt"))}

    def request_stop(self) -> None:
        """Ask a running trainer to save and exit (checked every step)."""
        atomic_write_text(self.stop_path, _now() + "\n")

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop(self) -> None:
        self.stop_path.unlink(missing_ok=True)


def write_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """`RunFolder.write_status` for a folder path."""
    return RunFolder(run_dir).write_status(**fields)


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """`RunFolder.read_status` for a folder path (``died`` when a running run's process is gone)."""
    return RunFolder(run_dir).read_status()


def list_runs(kind: str = "train") -> list[RunFolder]:
    """Run folders of one kind (``train``, ``samples``, ``sweeps``), newest first."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = get_settings().runs_dir / kind
    if not root.is_dir():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(runs, key=lambda r: (r.path.stat().st_mtime, r.name), reverse=True)


def git_sha(repo: Path = REPO_ROOT) -> str | None:
    """HEAD commit of the checkout (with ``-dirty`` when files changed), or None when git is unavailable."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(device: str | None = None) -> dict[str, Any]:
    """Versions, git sha, device and host: enough to tell two runs' environments apart."""
    import torch

    from engine import __version__

    cuda = torch.cuda.is_available()
    return {
        "crystallab": __version__,
        "packages": {p: _version(p) for p in ("torch", "numpy", "pymatgen", "pyyaml", "smact")},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "git_sha": git_sha(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device if device and device.startswith("cuda") else None)
        if cuda else platform.processor() or platform.machine(),
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "device_count": torch.cuda.device_count() if cuda else 0,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
        },
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "created_at": _now(),
    }

"""Where the lab reads and writes: one settings object, overridable by environment variables.

Paths never come from the current working directory. Defaults put everything under the project checkout:

- ``CRYSTALLAB_RUNS``: the runs root (datasets, training runs, sample sets, sweeps). Default ``<repo>/runs``.
- ``CRYSTALLAB_DATA_DIRS``: extra folders (``os.pathsep``-separated) the dashboard may read user files from,
  e.g. a folder of CIFs or a CrystaLLM ``ckpt.pt``. The runs root is always allowed. ``crystallab dashboard
  --data-dir DIR`` (repeatable) adds to it.
- ``CRYSTALLAB_CACHE``: cache for generated/fetched assets (built-in corpus, 3Dmol.js). Default
  ``~/.cache/crystallab``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.lab.errors import PathNotAllowed

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    """Resolved folder locations for one process."""

    runs_dir: Path
    """Root of all outputs: ``data/``, ``train/``, ``samples/``, ``sweeps/``, ``csp/`` live under it."""
    data_dirs: tuple[Path, ...]
    """Folders (besides ``runs_dir``) from which user-named files may be read."""
    cache_dir: Path
    """Cache of generated or downloaded assets; safe to delete."""

    @property
    def datasets_dir(self) -> Path:
        return self.runs_dir / "data"

    @property
    def train_dir(self) -> Path:
        return self.runs_dir / "train"

    @property
    def samples_dir(self) -> Path:
        return self.runs_dir / "samples"

    @property
    def sweeps_dir(self) -> Path:
        return self.runs_dir / "sweeps"

    @property
    def csp_dir(self) -> Path:
        return self.runs_dir / "csp"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        return (self.runs_dir, *self.data_dirs)

    def is_allowed(self, path: str | os.PathLike) -> bool:
        """Whether ``path``, with every symlink and ``..`` resolved, lies inside an allowed root.

        For paths the lab finds on its own (files inside a folder or archive the user named, run folders,
        checkpoints, sample sets): a symlink among them that leads outside the allowed folders is not followed.
        """
        try:
            p = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: nothing that can be read
            return False
        return any(p.is_relative_to(root.resolve()) for root in self.allowed_roots)

    def resolve_user_path(self, path: str | os.PathLike, must_exist: bool = True) -> Path:
        """Resolve a path typed by a dashboard user and check it lies inside an allowed folder.

        Raises:
            PathNotAllowed: the path (after resolving symlinks and ``..``) is outside every allowed root, or
                cannot name a file at all (a NUL byte, a symlink loop).
            FileNotFoundError: ``must_exist`` and nothing is there.
        """
        text = os.fspath(path)
        if "\0" in str(text):
            raise PathNotAllowed(f"{text!r} contains a NUL byte, which no file name can hold; type the path again.")
        p = Path(text).expanduser()
        if not p.is_absolute():
            p = self.runs_dir / p
        try:
            p = p.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise PathNotAllowed(f"{text!r} cannot be resolved ({exc}); give a path without a symlink loop.") from None
        if self.is_allowed(p):
            if must_exist and not p.exists():
                raise FileNotFoundError(f"{p} does not exist")
            return p
        roots = ", ".join(str(r) for r in self.allowed_roots)
        raise PathNotAllowed(
            f"{p} is outside the folders this lab may read ({roots}). "
            "Add its folder with `crystallab dashboard --data-dir FOLDER` (or CRYSTALLAB_DATA_DIRS, separated by "
            "':') and restart the dashboard."
        )


def get_settings() -> Settings:
    """Build the settings from the environment (read on every call, so tests can monkeypatch env vars)."""
    runs = Path(os.environ.get("CRYSTALLAB_RUNS", REPO_ROOT / "runs")).expanduser().resolve()
    extra = tuple(
        Path(p).expanduser().resolve()
        for p in os.environ.get("CRYSTALLAB_DATA_DIRS", "").split(os.pathsep)
        if p.strip()
    )
    cache = Path(os.environ.get("CRYSTALLAB_CACHE", Path.home() / ".cache" / "crystallab")).expanduser()
    return Settings(runs_dir=runs, data_dirs=extra, cache_dir=cache)

"""Shared test fixtures: where the shared reference data lives, and the golden records.

The shared folder sits beside the checkout (``../shared``); ``CRYSTALLAB_SHARED`` overrides it. Tests that need
it fail loudly when it is missing rather than skipping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CRYSTALLAB_SHARED", REPO_ROOT.parent / "shared")).resolve()


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the tests read the shared reference data from ../shared "
            "(set CRYSTALLAB_SHARED to its location)"
        )
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def golden_canonical() -> list[dict]:
    path = _require(SHARED / "reference" / "golden" / "canonical.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def golden_validity() -> list[dict]:
    path = _require(SHARED / "reference" / "golden" / "validity.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path_factory, monkeypatch):
    """Every test writes runs and caches into its own temporary folder, never into the checkout's runs/."""
    root = tmp_path_factory.mktemp("crystallab")
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(root / "runs"))
    monkeypatch.setenv("CRYSTALLAB_CACHE", str(root / "cache"))
    yield

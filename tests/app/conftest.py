"""Fixtures for the dashboard tests: a session-wide 3Dmol.js cache and a runs root made by the real tiny pipeline.

The root ``tests/conftest.py`` points CRYSTALLAB_RUNS / CRYSTALLAB_CACHE at a fresh folder for every test; tests
here re-point them at session folders so the npm download and the tiny pipeline happen once per test run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.app.viewer import ensure_3dmol_js


def load_lab_module():
    """``tests/app/lab.py`` (tests folders are not packages; tests/e2e loads it the same way)."""
    spec = importlib.util.spec_from_file_location("crystallab_test_lab", Path(__file__).with_name("lab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory):
    """A cache folder holding 3Dmol.js, fetched from the npm registry once per session."""
    cache = tmp_path_factory.getbasetemp() / "crystallab-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYSTALLAB_CACHE", str(cache))
    try:
        path = ensure_3dmol_js()
        assert path is not None, "3Dmol.js could not be fetched from registry.npmjs.org (needed once per run)"
    finally:
        mp.undo()
    return cache


@pytest.fixture
def use_asset_cache(asset_cache, _isolated_runs, monkeypatch):
    """Point this test's CRYSTALLAB_CACHE at the session cache (after the root fixture isolated it)."""
    monkeypatch.setenv("CRYSTALLAB_CACHE", str(asset_cache))
    return asset_cache


@pytest.fixture(scope="session")
def lab_runs(tmp_path_factory, asset_cache) -> Path:
    """Runs root holding the tiny lab (dataset ``tiny``, run ``tiny``, sample set ``nacl``, sweep ``tiny``)."""
    return load_lab_module().make_lab(tmp_path_factory.getbasetemp() / "crystallab-lab", asset_cache)


@pytest.fixture
def lab(lab_runs, asset_cache, _isolated_runs, monkeypatch) -> Path:
    """This test reads and writes the session lab; jobs it launches compute on one thread."""
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(lab_runs))
    monkeypatch.setenv("CRYSTALLAB_CACHE", str(asset_cache))
    # Launched jobs inherit this: tiny models on a shared 2-core machine run many times faster on one thread.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return lab_runs

"""Fixtures for the real-browser test: its own tiny lab (same recipe as tests/app) and a live Streamlit server."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from engine.app.dashboard import streamlit_command
from engine.app.viewer import ensure_3dmol_js
from engine.lab.settings import REPO_ROOT

BASE_PATH = "lab"
"""The server runs under this URL path, as behind a reverse proxy (the page must still load everything)."""
OUTPUT = REPO_ROOT / "test-output"


def _lab_module():
    spec = importlib.util.spec_from_file_location("crystallab_test_lab", REPO_ROOT / "tests" / "app" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def e2e_lab(tmp_path_factory) -> tuple[Path, Path]:
    """(runs root, cache) of a lab only this test uses, so its pickers hold exactly the tiny run."""
    base = tmp_path_factory.getbasetemp()
    cache = base / "crystallab-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYSTALLAB_CACHE", str(cache))
    try:
        assert ensure_3dmol_js() is not None, "3Dmol.js could not be fetched from registry.npmjs.org"
    finally:
        mp.undo()
    return _lab_module().make_lab(base / "crystallab-e2e-lab", cache), cache


@pytest.fixture
def server(e2e_lab):
    """``streamlit run app.py`` on a free localhost port under /lab/; yields the base URL, kills it after."""
    runs, cache = e2e_lab
    port = _free_port()
    OUTPUT.mkdir(exist_ok=True)
    log = open(OUTPUT / "e2e-server.log", "wb")
    env = {**os.environ, "CRYSTALLAB_RUNS": str(runs), "CRYSTALLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(streamlit_command(port, "127.0.0.1", BASE_PATH), cwd=REPO_ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/{BASE_PATH}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"streamlit did not start; see {OUTPUT / 'e2e-server.log'}")
            time.sleep(0.5)
        yield url, runs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

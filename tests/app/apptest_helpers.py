"""Helpers shared by the dashboard's AppTests: open a page as a user does, read its metrics, wait for a job."""

from __future__ import annotations

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine.lab import jobs

APP = str(Path(__file__).resolve().parents[2] / "app.py")
PAGE_TIMEOUT_S = 120  # a page run imports torch/pymatgen on first use; slow on a loaded 2-core machine


def open_page(page: str) -> AppTest:
    """Open the app (Home), go to ``page`` and check neither run raised."""
    at = AppTest.from_file(APP, default_timeout=PAGE_TIMEOUT_S)
    at.run()
    if page != "pages/home.py":
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    """Label -> shown value of every ``st.metric`` on the page."""
    return {m.label: m.value for m in at.metric}


def wait_for_job(job_dir: Path, timeout_s: float = 240) -> dict:
    """The job's state once it is no longer running; a job still running after ``timeout_s`` is stopped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = jobs.job_state(job_dir)
        if state["state"] != "running":
            return state
        time.sleep(0.5)
    jobs.request_stop(job_dir, grace_s=0)
    raise AssertionError(f"job {job_dir} still running after {timeout_s} s; log:\n{jobs.tail_log(job_dir)}")

"""Detached jobs: state from the job folder alone (finished, failed with the CLI's message, died), stop
escalation, names, and progress read from the log."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.lab import jobs
from engine.lab.errors import InputError


def _wait(job_dir, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (state := jobs.job_state(job_dir))["state"] == "running":
        assert time.monotonic() < deadline, jobs.tail_log(job_dir)
        time.sleep(0.2)
    return state


def test_failed_job_reports_the_cli_error(tmp_path):
    job_dir = tmp_path / "jobs" / "bad"
    record = jobs.launch_job(["sample", "--ckpt", str(tmp_path / "missing.pt"), "--n", "1", "--device", "cpu"],
                             job_dir, kind="sample", target=tmp_path / "out")
    assert record["reused"] is False and record["pid"] > 0
    state = _wait(job_dir)
    assert state["state"] == "failed" and state["returncode"] == 2
    assert "missing.pt" in state["message"]  # the CheckpointError text, not "exit status 2"
    with pytest.raises(InputError, match="already holds"):
        jobs.launch_job(["--help"], job_dir, kind="sample")
    again = jobs.launch_job(["--help"], job_dir, kind="sample", replace_finished=True)
    assert _wait(job_dir)["state"] == "finished" and again["pid"] != record["pid"]
    assert (job_dir / "history" / "1" / "job.json").exists()


def test_killed_job_reads_as_died(tmp_path):
    job_dir = tmp_path / "job"
    record = jobs.launch_job(["--help"], job_dir, kind="test")
    os.killpg(record["pid"], signal.SIGKILL)
    state = _wait(job_dir, 10)
    assert state["state"] == "died" and "log" in state["message"]


def test_stop_request_writes_stop_file_and_terminates(tmp_path):
    job_dir, target = tmp_path / "job", tmp_path / "run"
    target.mkdir()
    jobs.launch_job(["--help"], job_dir, kind="test", target=target)
    state = jobs.request_stop(job_dir, grace_s=0)
    assert (target / jobs.STOP_FILE).exists() or state["state"] != "running"
    assert _wait(job_dir, 30)["state"] in ("stopped", "finished")


def test_stopping_a_data_build_leaves_no_dataset_folder(tmp_path):
    """A build stopped while canonicalizing ends as "stopped" and leaves its name free: no folder, no STOP file."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    src, out, job_dir = tmp_path / "cifs", tmp_path / "data" / "x", tmp_path / "job"
    src.mkdir()
    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    text = str(CifWriter(rock_salt))
    for i in range(2000):  # minutes of canonicalizing on one worker
        (src / f"{i:04d}.cif").write_text(text)
    jobs.launch_job(["data", "build", str(src), "--out", str(out), "--workers", "1"], job_dir, kind="data",
                    target=out)
    deadline = time.monotonic() + 120
    while not jobs.progress(job_dir):  # canonicalizing has begun
        assert time.monotonic() < deadline and jobs.job_state(job_dir)["state"] == "running", jobs.tail_log(job_dir)
        time.sleep(0.2)
    jobs.request_stop(job_dir, grace_s=0)
    assert _wait(job_dir, 60)["state"] == "stopped"
    assert not out.exists() and not list(out.parent.glob(".x.*"))


def test_names_must_be_plain_folder_names():
    assert jobs.check_name(" run-1.a ") == "run-1.a"
    for bad in ("", "../x", "a/b", "with space", ".hidden"):
        with pytest.raises(InputError, match="folder name"):
            jobs.check_name(bad, "run name")


def test_progress_and_tail_from_the_log(tmp_path):
    (tmp_path / "log.txt").write_text("start\nNaCl:  25%|##  | 1/4 [00:01<00:03]\rNaCl:  75%|#### | 3/4 [00:03<00:01]\n")
    assert jobs.progress(tmp_path) == (3, 4)
    (tmp_path / "log.txt").write_text("[2/6] sampled tiny__Na2Cl2\n")
    assert jobs.progress(tmp_path) == (2, 6)
    (tmp_path / "log.txt").write_text("extracting:  27%|##   | 12.3M/45.6M [00:02<00:05, 5.1MB/s]\n")
    assert jobs.progress(tmp_path) == (12_300_000, 45_600_000)  # a token archive's bytes
    (tmp_path / "log.txt").write_text("[2/6] sampled tiny__Na2Cl2\n")
    assert jobs.tail_log(tmp_path, 1) == "[2/6] sampled tiny__Na2Cl2"
    assert jobs.job_state(tmp_path / "nothing")["state"] == "none"


def test_a_name_is_free_again_when_its_ended_job_left_no_output(tmp_path):
    job_dir, out = tmp_path / "jobs" / "x", tmp_path / "out"
    jobs.launch_job(["sample", "--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"], job_dir, kind="sample",
                    target=out)
    assert _wait(job_dir)["state"] == "failed" and not out.exists()
    jobs.launch_job(["--help"], job_dir, kind="sample", target=out)  # no "choose a new name"
    assert _wait(job_dir)["state"] == "finished"
    out.mkdir()  # an ended job whose output exists keeps its name
    with pytest.raises(InputError, match="already holds"):
        jobs.launch_job(["--help"], job_dir, kind="sample", target=out)


def test_the_following_note_goes_when_its_job_has_ended(tmp_path):
    """Issue 11: the "already running; following it" note must not outlive the run it talks about."""
    repo = Path(__file__).resolve().parents[2]

    def page(job_dir: str, repo: str) -> None:
        import sys

        import streamlit as st

        sys.path.insert(0, repo)
        from pages import common

        st.session_state.setdefault("_following_sample", (job_dir, "already running; following it"))
        common.following_note("sample")

    job_dir = tmp_path / "job"
    jobs.launch_job(["--help"], job_dir, kind="sample")  # a real detached job that ends at once
    deadline = time.monotonic() + 60
    while jobs.job_state(job_dir)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs.job_state(job_dir)["state"] == "finished"
    at = AppTest.from_function(page, args=(str(job_dir), str(repo)), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.info and at.session_state["_following_sample"] is None

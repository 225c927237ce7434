"""The run-folder contract: atomic status, append-only metrics, environment record, died-run detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.lab.runs import RunFolder, list_runs, pid_alive, read_status
from engine.lab.settings import get_settings


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_create_names_runs_by_time_and_name_without_clashes():
    a = RunFolder.create("demo")
    b = RunFolder.create("demo")
    assert a.path.parent == get_settings().train_dir
    assert a.path != b.path and a.name.endswith("-demo") and b.name.endswith("-demo-2")
    assert {r.path for r in list_runs("train")} == {a.path, b.path}


def test_status_merges_fields_and_rejects_unknown_states(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.write_status(state="running", step=0, pid=os.getpid(), max_steps=10)
    run.write_status(step=5, last_ckpt="ckpt/last.pt")
    status = run.read_status()
    assert (status["state"], status["step"], status["max_steps"]) == ("running", 5, 10)
    assert "updated_at" in status
    assert not list(run.path.glob(".*.tmp")), "no temporary files left behind"
    with pytest.raises(ValueError):
        run.write_status(state="exploded")


def test_a_running_status_whose_process_is_gone_reads_as_died(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.write_status(state="running", pid=_dead_pid(), last_ckpt="x/last.pt", last_ckpt_step=300)
    status = read_status(run.path)
    assert status["state"] == "died"
    assert "last checkpoint at step 300" in status["message"]
    assert json.loads(run.status_path.read_text())["state"] == "running", "reading never rewrites the file"
    assert pid_alive(os.getpid())


def test_metrics_are_appended_and_a_resume_supersedes_the_dead_tail(tmp_path):
    run = RunFolder(tmp_path / "r")
    for step in (10, 20, 30):
        run.log_metrics(step=step, split="train", loss=1.0 / step)
    run.log_metrics(event="resume", step=20)  # the run died after step 30 but its last checkpoint is step 20
    run.log_metrics(step=30, split="train", loss=0.5)
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 40, "spl')  # a writer killed mid-line
    steps = [(r["step"], r["loss"]) for r in run.metrics() if r.get("split") == "train"]
    assert steps == [(10, 0.1), (20, 0.05), (30, 0.5)]
    assert len(run.metrics(raw=True)) == 5


def test_config_is_written_once(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.write_config("max_iters: 5\n")
    assert run.config() == {"max_iters": 5}
    with pytest.raises(FileExistsError):
        run.write_config("max_iters: 6\n")


def test_environment_records_versions_and_device(tmp_path):
    env = RunFolder(tmp_path / "r").write_env("cpu")
    assert env["packages"]["torch"] and env["packages"]["numpy"] and env["packages"]["pymatgen"]
    assert env["device"] == "cpu" and env["python"].count(".") == 2
    assert "git_sha" in env and env["hostname"]


def test_stop_request_round_trip_and_checkpoint_listing(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert not run.stop_requested() and run.checkpoints() == {}
    run.request_stop()
    assert run.stop_requested()
    run.clear_stop()
    assert not run.stop_requested()
    run.ckpt_dir.mkdir(parents=True)
    (run.ckpt_dir / "last.pt").write_bytes(b"x")
    assert set(run.checkpoints()) == {"last"}

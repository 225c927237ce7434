"""Train page: the preset fills the form, and a launched run is shown live without a reload."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from apptest_helpers import metrics, open_page

from engine.lab import jobs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_choosing_a_preset_loads_its_settings_into_the_form(lab):
    at = open_page("pages/train.py")
    assert at.number_input(key="train_steps").value == yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())[
        "max_iters"]
    demo = yaml.safe_load((CONFIGS / "demo_cpu.yaml").read_text())
    at.selectbox(key="train_preset").set_value(CONFIGS / "demo_cpu.yaml").run()
    assert not at.exception
    assert at.number_input(key="train_steps").value == demo["max_iters"]
    assert at.number_input(key="train_lr").value == float(demo["learning_rate"])
    assert at.number_input(key="train_batch").value == demo["batch_size"]
    assert at.number_input(key="train_warmup").value == demo["warmup_iters"]
    assert at.text_input(key="train_name").value == demo.get("name", at.text_input(key="train_name").value)

    at.radio(key="train_mode").set_value("resume").run()  # the form is not drawn ...
    at.radio(key="train_mode").set_value("scratch").run()  # ... and comes back with the preset's values
    assert at.number_input(key="train_steps").value == demo["max_iters"]


def test_a_launched_run_is_followed_live_without_a_reload(lab):
    at = open_page("pages/train.py")
    at.text_input(key="train_name").input("apptest-live")
    at.selectbox(key="train_dataset").set_value("tiny")
    at.selectbox(key="train_device").set_value("cpu")
    at.number_input(key="train_steps").set_value(400)
    at.number_input(key="train_warmup").set_value(1)
    at.number_input(key="train_eval").set_value(200)
    at.number_input(key="train_batch").set_value(2)
    at.button(key="train_launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("apptest-live: running" in i.value for i in at.info)  # the pending job, before its folder exists
    job_dir = lab / "jobs" / "train" / "apptest-live"
    run_dir = lab / "train" / "apptest-live"
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        # The next run of the script (as the pending fragment triggers in a browser) shows the new run, live.
        at.run()
        assert at.selectbox(key="train_run").value == run_dir
        states = metrics(at)
        assert states["State"] == "running", states
    finally:
        jobs.request_stop(job_dir, grace_s=5)
        deadline = time.monotonic() + 60
        while jobs.job_state(job_dir)["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)


def _finished_run(name: str, val_losses: dict[int, float], state: str = "completed") -> Path:
    """A run folder as the trainer leaves it: status without a best val loss, train records, evaluations."""
    from engine.lab.settings import get_settings

    run = get_settings().train_dir / name
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": state, "step": 350, "max_steps": 350,
                                                 "best_val_loss": None, "device": "cpu"}))
    records = [{"step": s, "split": "train", "loss": 3.0 - s / 200, "lr": 1e-3, "tokens_per_s": 900.0,
                "elapsed_s": 1.0 + s * 0.7} for s in range(10, 351, 10)]
    records += [{"step": s, "split": "val", "loss": v, "elapsed_s": 0.5 + s * 0.7} for s, v in val_losses.items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["step"])))
    return run


def test_validation_is_drawn_as_points_with_the_best_so_far():
    _finished_run("quick", {0: 3.4, 350: 0.44})
    at = open_page("pages/train.py")
    assert not at.exception, [e.value for e in at.exception]
    assert metrics(at)["Best val loss"] == "0.4400"  # not "-" although status.json never recorded one
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    traces = {t["name"]: t for t in chart["data"]}
    assert traces["val"]["mode"] == "markers"  # two evaluations: points, not a line that reads as a trend
    best = traces["best val so far"]["y"]  # plotly sends arrays as typed binary
    assert np.frombuffer(base64.b64decode(best["bdata"]), dtype=best["dtype"]).tolist() == [3.4, 0.44]


def test_the_form_says_how_long_the_preset_takes_on_this_kind_of_device():
    at = open_page("pages/train.py")
    at.selectbox(key="train_preset").set_value(CONFIGS / "quick_cpu.yaml").run()
    text = " ".join(c.value for c in at.caption)
    if common_device() == "cpu":
        assert "Expected on this machine's kind of device: about 4m 18s for 350 steps" in text
    else:
        assert "Measured on CPU only" in text and "no figure for this machine's CUDA" in text


def common_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def test_eta_is_given_from_the_first_training_record():
    run = _finished_run("early", {0: 3.4}, state="running")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records
                                               if r["step"] <= 10))  # the step-0 evaluation and one record
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "step": 10}))
    from engine.app.dashboard import training_progress

    eta = training_progress(run)["eta_s"]
    assert eta == pytest.approx((1.0 + 10 * 0.7) / 10 * 340)  # start-up and step-0 evaluation included

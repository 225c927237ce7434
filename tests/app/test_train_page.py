"""Train page: the preset fills the form, and a launched run is shown live without a reload."""

from __future__ import annotations

import time
from pathlib import Path

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

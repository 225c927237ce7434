"""Sample page with a Hugging Face model: an HF run's checkpoint folder is listed and selectable, the page shows
the family's own knobs, and Generate samples it through the CLI (a detached job) into a sample set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from apptest_helpers import open_page, wait_for_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared `families` helpers
from families.hf_tiny import TRAIN_ARGS, tiny_dataset, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_runs(tmp_path_factory) -> Path:
    """A runs root holding one 2-step LoRA run of a tiny HF model."""
    from engine.train.config import load_config
    from engine.train.trainer import train

    root = tmp_path_factory.mktemp("hf-lab")
    model, data = tiny_model(root), tiny_dataset(root, n=12)
    runs = root / "runs"
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYSTALLAB_RUNS", str(runs))
    try:
        train(load_config(None, [f"dataset={data}", f"hf_model={model}", *TRAIN_ARGS, "max_iters=2",
                                 "eval_interval=2", f"out_dir={runs / 'train' / 'hf-tiny'}"]), progress=False)
    finally:
        mp.undo()
    return runs


def test_an_hf_run_is_selectable_and_samples_with_its_own_knobs(hf_runs, monkeypatch):
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(hf_runs))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    best = hf_runs / "train" / "hf-tiny" / "ckpt" / "best"
    at = open_page("pages/sample.py")
    box = at.selectbox(key="sample_ckpt")
    assert "train/hf-tiny/ckpt/best" in box.options[0] and "train/hf-tiny/ckpt/last" in box.options[1]
    assert any("family hf-causal-lm" in c.value and "step 2" in c.value for c in at.caption)
    top_p = at.number_input(key="sample_knob_hf-causal-lm_top_p")
    assert top_p.value == 0.9  # the family's default (Gruver's), not the GPT page's
    at.number_input(key="sample_knob_hf-causal-lm_max_new_tokens").set_value(16)
    at.number_input(key="sample_z").set_value(4)
    at.number_input(key="sample_n").set_value(2)
    at.text_input(key="sample_name").set_value("hf-set")
    at.button(key="sample_generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = Path(at.session_state["job_sample"])
    state = wait_for_job(job)
    assert state["state"] == "finished", state
    cfg = json.loads((hf_runs / "samples" / "hf-set" / "config.json").read_text())  # one prompt: Na4Cl4
    assert cfg["checkpoint"]["family"] == "hf-causal-lm" and cfg["checkpoint"]["path"] == str(best)
    assert cfg["sampling"]["max_new_tokens"] == 16 and cfg["sampling"]["text_format"] == "gruver"

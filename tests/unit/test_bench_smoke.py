"""Smoke runs of the benchmark scripts (bench/) with tiny settings, and the upstream reference generator's rules.

The scripts run as a user runs them (``python bench/<name>.py ...``, a subprocess); the tests check that each one
finishes and writes the JSON fields BENCHMARKS.md is built from, with sane values. No timing thresholds: speed is
what the full runs measure, on a quiet machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.crystal.vocab import NEWLINE_ID
from engine.models.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def run_script(name: str, *args: str, timeout: float = 300) -> dict:
    """Run ``bench/<name>.py`` with ``args`` plus ``--out``; return the JSON it wrote."""
    out = Path(os.environ["CRYSTALLAB_RUNS"]) / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: far faster than two on a shared 2-core machine
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args, "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def load_bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def assert_machine_record(result: dict) -> None:
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1
    assert len(machine["load_avg_start"]) == 3 and len(machine["load_avg_end"]) == 3
    assert machine["date"] and machine["git_commit"] is not None


def test_sampling_bench_compares_batches_with_upstream():
    result = run_script("sampling", "--arch", "tiny", "--tokens", "6", "--batch-sizes", "1,4", "--upstream-n", "1")
    assert_machine_record(result)
    (arch,) = result["results"]
    assert arch["tokens_per_sample"] == 6 and arch["n_params"] > 0
    up = arch["upstream"]
    assert up["tokens"] == 6 and up["tokens_per_s"] > 0 and up["cifs_per_s"] > 0
    assert [r["batch"] for r in arch["ours"]] == [1, 4]
    for row in arch["ours"]:
        assert row["tokens"] == 6 * row["batch"]
        assert row["tokens_per_s"] > 0 and row["cifs_per_s"] > 0
        assert row["speedup_vs_upstream"] == pytest.approx(row["tokens_per_s"] / up["tokens_per_s"])
        assert row["kv_cache_mib"] > 0 and row["peak_mem_mib"] is not None and row["peak_mem_mib"] >= 0


def test_upstream_script_writes_throughput():
    result = run_script("upstream_generate", "--arch", "tiny", "--tokens", "5", "--n", "2")
    assert_machine_record(result)
    assert result["fixed_tokens"] is True and result["samples"] == 2 and result["tokens"] == 10
    assert result["tokens_per_s"] > 0 and result["prompt_ids"]


def test_evaluation_bench_parallel_matches_single(shared_dir):
    csv = shared_dir / "data" / "mp20_subset" / "test.csv"
    result = run_script("evaluation", "--source", str(csv), "--n", "4", "--workers", "2", "--profile-n", "2")
    assert_machine_record(result)
    assert result["n"] == 4 and result["identical_verdicts"] is True and result["differences"] == []
    assert result["parse_ok"] == 4  # real structures' model views post-process and parse
    for run in result["runs"].values():
        assert run["cifs_per_s"] > 0
    assert result["runs"]["parallel"]["workers"] == 2 and result["speedup"] > 0
    profile = result["profile"]
    assert {"postprocess", "parse", "symmetry", "bond_length", "smact", "evaluate_one"} <= set(profile)
    assert profile["bond_length"]["calls"] == 2 and profile["bond_length"]["seconds"] > 0
    assert result["set_metrics_s"] > 0


def test_training_bench_reports_throughput_and_mfu(shared_dir, tmp_path):
    import pandas as pd

    rows = pd.read_csv(shared_dir / "data" / "mp20_subset" / "test.csv", nrows=12)
    source = tmp_path / "cifs.csv"
    rows[["material_id", "cif"]].to_csv(source, index=False)
    result = run_script("training", "--arch", "tiny", "--steps", "1", "--block-size", "32", "--batch-size", "2",
                        "--data-source", str(source), "--peak-tflops", "1")
    assert_machine_record(result)
    (row,) = result["results"]
    assert row["arch"] == "tiny" and row["window"] == 32 and row["tokens_per_step"] == 64
    assert row["tokens_per_s"] > 0 and row["step_s"] > 0
    assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 1.0)
    assert not list((Path(os.environ["CRYSTALLAB_RUNS"]) / "bench" / "train").iterdir())  # run folder removed


def test_upstream_last_logits_match_the_model_forward():
    upstream = load_bench_module("upstream_generate")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    idx = torch.randint(0, 371, (1, 11))
    with torch.no_grad():
        full, _ = model(idx)
        last = upstream._last_logits(model, idx)
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)


def test_upstream_generate_crops_context_and_honours_the_stop_rule(monkeypatch):
    upstream = load_bench_module("upstream_generate")
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8)).eval()
    seen = []

    def always_newline(_model, idx):
        seen.append(idx.shape[1])
        logits = torch.full((1, 371), -10.0)
        logits[0, NEWLINE_ID] = 10.0
        return logits

    monkeypatch.setattr(upstream, "_last_logits", always_newline)
    ids = upstream.upstream_generate(model, [5, 6, 7], 20, top_k=1)
    assert ids == [5, 6, 7, NEWLINE_ID]  # stops on the second consecutive sampled newline
    seen.clear()
    ids = upstream.upstream_generate(model, [5, 6, 7], 12, top_k=1, fixed_tokens=True)
    assert len(ids) == 3 + 12
    assert seen == [min(n, 8) for n in range(3, 15)]  # full recompute of the context, cropped at block_size


@pytest.mark.slow  # builds the tiny lab (about a minute) unless tests/app already did in this session
def test_dashboard_bench_times_pages_and_a_large_sample_set(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("crystallab_test_lab", REPO / "tests" / "app" / "lab.py")
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    base = tmp_path_factory.getbasetemp()  # the same lab as tests/app's, so a whole-suite run builds it once
    runs = lab.make_lab(base / "crystallab-lab", base / "crystallab-cache")
    result = run_script("dashboard", "--runs", str(runs), "--pages", "pages/train.py", "--n-samples", "30",
                        timeout=600)
    assert_machine_record(result)
    (page,) = result["pages"]
    assert page["page"] == "pages/train.py" and page["error"] is None
    assert page["cold_s"] > 0 and page["warm_s"] > 0 and page["elements"] > 0
    small, big = result["sample_page"]
    assert big["n"] == 30 and big["samples_shown"] == "30" and big["error"] is None
    assert small["samples_shown"] == str(small["n"])
    assert not (runs / "samples" / "bench-synthetic-30").exists()  # the synthetic set is removed afterwards


def test_csp_oracle_bench_finds_every_target_that_passes_the_validity_filter(shared_dir):
    targets = shared_dir / "data" / "mp20_subset" / "test.csv"
    result = run_script("csp_oracle", "--targets", str(targets), "--limit", "12", "--workers", "2")
    assert_machine_record(result)
    assert result["n_targets"] == 12
    # A perfect model finds the targets the CDVAE filter lets through, and no others; the text's 4-decimal
    # rounding costs a few of them (near-duplicate sites on special positions, see BENCHMARKS.md) and leaves a
    # rounding-sized RMSE.
    assert 0.5 < result["oracle_match_rate"] <= result["target_valid_rate"]
    assert result["oracle_rmse"] < 1e-3
    assert [r["workers"] for r in result["runs"]] == [1, 2] and all(r["samples_per_s"] > 0 for r in result["runs"])


def test_distribution_bench_reports_cov_and_wasserstein(shared_dir):
    data = shared_dir / "data" / "mp20_subset"
    result = run_script("distribution", "--train", str(data / "train.csv"), "--test", str(data / "test.csv"),
                        "--n-train", "3", "--n-test", "3", "--workers", "1", "--no-full-wdist")
    assert_machine_record(result)
    row = result["rows"][0]
    assert 0 <= row["cov_recall"] <= 1 and 0 <= row["cov_precision"] <= 1
    assert row["wdist_density"] >= 0 and row["wdist_n_elements"] >= 0
    assert result["n_fingerprinted"] == 6 and result["cutoffs"] == {"struct": 0.4, "comp": 10.0}
    assert "random subset" in result["train_label"]

"""Compare page (dash #13): the sweep form offers a finished run's checkpoint, sets where nothing parsed get a
message instead of empty plots, and "Sample sets" starts from the Sample page's sets rather than sweep cells.

Each test builds the few run folders it needs by hand under its own runs root (no tiny lab): sample sets are
written the way the sampler and the evaluator write them, with verdicts chosen so every number on the page is known.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pandas as pd
from apptest_helpers import open_page

from engine.evaluate.metrics import METRIC_DEFINITIONS
from engine.evaluate.report import write_sweep_report
from engine.lab.settings import get_settings


def _touch(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))


def _run(name: str, state: str, mtime: float) -> Path:
    """A training run folder with ``best.pt`` / ``last.pt`` (empty: the page only lists them) and its status."""
    run = get_settings().train_dir / name
    (run / "ckpt").mkdir(parents=True)
    for ckpt in ("best.pt", "last.pt"):
        (run / "ckpt" / ckpt).write_bytes(b"")
    status = {"state": state, "step": 10, "max_steps": 100}
    if state == "running":  # this test process stands in for the trainer: alive, on this host
        status.update(pid=os.getpid(), host=socket.gethostname())
    (run / "status.json").write_text(json.dumps(status))
    _touch(run, mtime)
    return run


def _sample_set(folder: Path, *, prompt: str = "Na4Cl4", n: int = 4, parsed: int = 0, valid: int = 0,
                mtime: float | None = None) -> Path:
    """An evaluated sample set of ``n`` samples, the first ``parsed`` of them parsed and ``valid`` valid."""
    folder.mkdir(parents=True)
    config = {
        "prompt": {"text": f"data_{prompt}\n", "formula": prompt, "z": None, "spacegroup": None, "label": prompt},
        "sampling": {"n": n, "temperature": 0.8, "top_k": 10, "top_p": 1.0, "seed": 1, "max_new_tokens": 300,
                     "constrain": True},
        "checkpoint": {"path": str(get_settings().train_dir / "old" / "ckpt" / "best.pt"), "step": 10,
                       "sha256": "ab" * 32, "run": "old"},
        "device": "cpu", "version": "0.1.0", "created_at": "2026-11-20T09:00:00+00:00",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "samples.jsonl").write_text("".join(
        json.dumps({"index": i, "name": f"{i:04d}", "postprocess_ok": i < parsed}) + "\n" for i in range(n)))
    ok = [i < parsed for i in range(n)]
    pd.DataFrame({
        "file": [f"{i:04d}.txt" for i in range(n)], "parse_ok": ok, "is_valid": [i < valid for i in range(n)],
        "failure_reason": [None if p else "truncated" for p in ok],
        "spacegroup": ["Fm-3m" if p else None for p in ok], "reduced_formula": ["NaCl" if p else None for p in ok],
    }).to_csv(folder / "eval.csv", index=False)
    values = {name: None for name in METRIC_DEFINITIONS}
    values.update(n=n, parse_rate=parsed / n, validity=valid / n, formula_hit_rate=parsed / n,
                  uniqueness_all=min(parsed, 1) / n, uniqueness_valid=min(valid, 1) / n,
                  distinct_formulas=min(parsed, 1), distinct_spacegroups=min(parsed, 1))
    (folder / "eval_summary.json").write_text(json.dumps(
        {name: {"value": v, "definition": METRIC_DEFINITIONS[name]} for name, v in values.items()}))
    if mtime is not None:
        _touch(folder / "config.json", mtime)
    return folder


def _sweep(name: str, *, parsed: int, valid: int = 0) -> Path:
    """A finished two-prompt sweep whose cells have ``parsed`` / ``valid`` of 4 samples each."""
    out = get_settings().sweeps_dir / name
    cells = [f"old-best__{p}__T0.8_k10_p1.0_n4_s1" for p in ("Na4Cl4", "Mg4O4")]
    for cell, prompt in zip(cells, ("Na4Cl4", "Mg4O4")):
        _sample_set(out / "cells" / cell, prompt=prompt, parsed=parsed, valid=valid)
    (out / "sweep.yaml").write_text(f"name: {name}\ncheckpoints: {{old-best: train/old/ckpt/best.pt}}\n"
                                    "prompts: [Na4Cl4, Mg4O4]\n")
    write_sweep_report(out, cells, checkpoints={"old-best": "train/old/ckpt/best.pt"}, title=name)
    return out


def test_sweep_form_preselects_the_newest_finished_run_not_one_still_training():
    old = _run("old", "completed", 1_000_000)
    _run("new", "running", 2_000_000)  # newer, but its checkpoints change while it trains
    at = open_page("pages/compare.py")
    picker = at.multiselect(key="sweep_ckpts")
    assert picker.value == [old / "ckpt" / "best.pt"]
    assert "train/new/ckpt/best.pt (still training)" in picker.options


def test_sweep_form_preselects_nothing_while_every_run_trains():
    _run("new", "running", 2_000_000)
    at = open_page("pages/compare.py")
    assert at.multiselect(key="sweep_ckpts").value == []


def test_nothing_parsed_shows_a_message_instead_of_empty_plots():
    _run("old", "completed", 1_000_000)
    _sweep("unparsed", parsed=0)
    at = open_page("pages/compare.py")
    assert not at.error, [e.value for e in at.error]
    assert any("None of the 8 samples parsed into a structure" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) == 0
    table = at.table[0].value
    assert list(table["formula hits"]) == ["0/4 (0%) [0%, 49%]"] * 2  # a count, not n/a (dash #13 c)
    assert list(table["space groups"]) == ["0", "0"]


def test_parsed_but_invalid_sets_plot_on_fixed_axes_with_a_note():
    _run("old", "completed", 1_000_000)
    _sweep("invalid", parsed=2, valid=0)
    at = open_page("pages/compare.py")
    assert any("4 of 8 samples parsed, none is valid" in c.value for c in at.caption)
    charts = at.get("plotly_chart")
    assert len(charts) >= 2
    layout = json.loads(charts[0].proto.spec)["layout"]
    assert layout["yaxis"]["range"] == [0, 1.05]  # 0 % to 100 %, not plotly's -100 %..100 % for all-zero data


def test_sample_sets_mode_starts_from_the_sample_pages_sets():
    s = get_settings()
    mine_old = _sample_set(s.samples_dir / "nacl", parsed=4, valid=4, mtime=1_000_000)
    mine_new = _sample_set(s.samples_dir / "kcl", prompt="K4Cl4", parsed=4, valid=2, mtime=1_100_000)
    for i in range(4):  # newer sweep cells must not push the user's own sets out of the selection
        _sample_set(s.sweeps_dir / "sw" / "cells" / f"c{i}", parsed=1, mtime=2_000_000 + i)
    at = open_page("pages/compare.py")
    at.radio(key="compare_mode").set_value("Sample sets").run()
    assert not at.exception, [e.value for e in at.exception]
    picker = at.multiselect(key="compare_sets")
    assert picker.value == [mine_new, mine_old]
    assert len(picker.options) == 6  # the sweep cells are still offered
    assert list(at.table[0].value["prompt"]) == ["K4Cl4", "Na4Cl4"]


def test_sets_with_equal_settings_are_told_apart_in_tables_and_distribution_plots():
    """Two sets of one checkpoint and prompt (e.g. the same request twice, or T 0.5 and T 1.0) are two rows and
    two bar colours, named by the set, not merged under their checkpoint."""
    s = get_settings()
    first = _sample_set(s.samples_dir / "nacl-a", parsed=4, valid=4, mtime=1_000_000)
    second = _sample_set(s.samples_dir / "nacl-b", parsed=2, valid=1, mtime=1_100_000)
    at = open_page("pages/compare.py")
    at.radio(key="compare_mode").set_value("Sample sets").run()
    assert not at.exception, [e.value for e in at.exception]
    assert list(at.table[0].value["set"]) == ["nacl-b", "nacl-a"]  # the names the Sample page gave them
    charts = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
              for c in at.get("plotly_chart")}
    sgs = charts["Detected space groups per compared set"]
    assert sorted(trace["name"] for trace in sgs["data"]) == [first.name, second.name]
    assert sgs["data"][0]["x"] == ["Fm-3m (225)"]  # space groups with their numbers


def test_ipt_summaries_are_shown_per_checkpoint():
    _run("old", "completed", 1_000_000)
    _sweep("invalid", parsed=2, valid=0)
    probe = get_settings().runs_dir / "ipt" / "p1"
    probe.mkdir(parents=True)
    (probe / "ipt_summary.json").write_text(json.dumps({"translations": 10, "seed": 0, "checkpoints": [
        {"label": "old-best", "family": "crystallm-gpt", "n_structures": 30, "ipt_mean": 0.125, "ipt_median": 0.1,
         "ppl_mean": 1.9}]}))
    at = open_page("pages/compare.py")
    (shown,) = [d.value for d in at.dataframe if "IPT mean" in d.value.columns]
    assert list(shown["checkpoint"]) == ["old-best"] and shown["IPT mean"][0] == 0.125


def test_distillation_reports_under_runs_are_listed_with_their_table():
    from engine.train.distill_report import write_report

    model = {"params": 1000, "size_mb": 0.004, "val_loss": 0.5, "sampling": {"validity": 0.9},
             "speed": {"b1": {"tokens_per_s": 100.0}, "b8": {"tokens_per_s": 800.0}}}
    report = {"teacher": "t.pt", "dataset": "builtin", "n_per_prompt": 200, "seed": 1, "prompts": [{"label": "Na4Cl4"}],
              "knobs": {}, "speed_batch": 8, "targets": {"speedup": 3.0, "validity_retention": 0.9},
              "created_at": "2026-12-02T00:00:00+00:00", "machine": "test",
              "models": {"teacher": {**model, "role": "teacher"},
                         "student": {**model, "role": "student", "params": 250, "gap_closed": 0.4,
                                     "speedup": {"b8": 3.5}, "target": "met: 3.5x faster"}}}
    folder = get_settings().runs_dir / "distill" / "chainA"
    folder.mkdir(parents=True)
    write_report(report, folder)
    at = open_page("pages/compare.py")
    assert not at.exception
    assert any("Distillation reports (1)" in e.label for e in at.expander)
    table = at.table[0].value
    assert list(table.index) == ["teacher", "student"] and table.loc["student", "gap closed"] == "0.4"

"""Report tables: the seed experiments' shapes and markdown layout, from hand-built evaluated sample sets.

Each sample set is written the way the sampler (``config.json``) and the evaluator (``eval_summary.json`` with
``{"value", "definition"}`` per metric) write them, with numbers chosen by hand so every cell of a table is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from engine.evaluate.metrics import METRIC_DEFINITIONS
from engine.evaluate.report import (
    compare_sample_sets,
    macro_display,
    macro_table,
    per_checkpoint_table,
    per_prompt_table,
    summary_markdown,
    sweep_rows,
    write_sweep_report,
)
from engine.lab.errors import InputError

SHA = "abcdef0123456789" * 4


def _set(folder: Path, *, ckpt: str = "nacl10", prompt: str = "Na2Cl2", t: float = 0.8, k: int = 10, n: int = 10,
         seed: int = 1, step: int = 450, evaluated: bool = True, constrain: bool = True, ckpt_path: str | None = None,
         sha: str = SHA, **metrics) -> Path:
    """Write a sample set's config.json and (unless not ``evaluated``) eval_summary.json and eval.csv."""
    folder.mkdir(parents=True)
    config = {
        "prompt": {"text": f"data_{prompt}\n", "formula": prompt, "z": 2, "spacegroup": None, "label": prompt},
        "sampling": {"n": n, "temperature": t, "top_k": k, "top_p": 1.0, "seed": seed, "max_new_tokens": 3000,
                     "constrain": constrain},
        "checkpoint": {"path": ckpt_path or f"/runs/{ckpt}.pt", "step": step, "sha256": sha, "run": ckpt},
        "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "version": "0.1.0", "created_at": "2026-11-20T09:00:00+00:00",
    }
    (folder / "config.json").write_text(json.dumps(config))
    if evaluated:
        values = {name: None for name in METRIC_DEFINITIONS}
        values.update(n=n, **metrics)
        summary = {name: {"value": v, "definition": METRIC_DEFINITIONS[name]} for name, v in values.items()}
        (folder / "eval_summary.json").write_text(json.dumps(summary))
        pd.DataFrame({"file": [f"{i:04d}.txt" for i in range(n)], "parse_ok": [True] * n}).to_csv(
            folder / "eval.csv", index=False)
    return folder


NACL10 = dict(parse_rate=1.0, validity=1.0, formula_hit_rate=1.0, uniqueness_all=0.5, uniqueness_valid=0.4,
              distinct_formulas=1, distinct_spacegroups=2)


def test_nacl10_table_has_the_seed_layout(tmp_path):
    df = compare_sample_sets([_set(tmp_path / "s", **NACL10)], labels=["nacl10"])
    md = summary_markdown(df, title="NaCl-10", checkpoints={"nacl10": "train/nacl_ft_small/ckpt/best.pt"})
    lines = md.splitlines()
    i = lines.index("## Per checkpoint")
    assert lines[i + 2 : i + 5] == [
        "| checkpoint | prompt | n | parsed | valid | formula hits | unique (valid) | space groups |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|",
        "| nacl10 | Na2Cl2 | 10 | 10/10 (100%) [72%, 100%] | 10/10 (100%) [72%, 100%] | 10/10 (100%) [72%, 100%] "
        "| 4/10 (40%) [17%, 69%] | 2 |",
    ]
    assert lines[0] == "# NaCl-10"
    assert ("Sampling: T = 0.8, top-k = 10, top-p = 1, seed = 1, constrained decoding on, at most 3000 new tokens "
            "per sample.") in lines
    # the checkpoint file is not there any more: its training data cannot be vouched for
    assert (f"- `nacl10`: train/nacl_ft_small/ckpt/best.pt (step 450, sha256 {SHA[:12]}; training data not "
            "recorded in the checkpoint)") in lines
    assert "## Per prompt: valid" not in md and "## Macro-average over prompts" not in md  # one prompt
    # every column shown is defined in the legend, in the evaluator's words; columns not shown are not
    assert f"- **valid**: {METRIC_DEFINITIONS['validity']}" in lines
    assert f"- **unique (valid)**: {METRIC_DEFINITIONS['uniqueness_valid']}" in lines
    assert not any(line.startswith("- **unique**") or line.startswith("- **novelty**") for line in lines)


def test_three_checkpoints_keep_their_order_and_optional_columns_appear_when_they_apply(tmp_path):
    sets = [
        _set(tmp_path / "a", ckpt="small", n=200, parse_rate=0.9, validity=0.75, formula_hit_rate=0.7,
             uniqueness_valid=0.3, distinct_spacegroups=9, novelty=0.5),
        _set(tmp_path / "b", ckpt="large", n=200, parse_rate=0.95, validity=0.8, formula_hit_rate=0.8,
             uniqueness_valid=0.2, distinct_spacegroups=7, novelty=0.25),
        _set(tmp_path / "c", ckpt="nacl10", n=200, parse_rate=1.0, validity=1.0, formula_hit_rate=1.0,
             uniqueness_valid=0.02, distinct_spacegroups=1, novelty=0.0),
    ]
    table = per_checkpoint_table(compare_sample_sets(sets))
    assert list(table["checkpoint"]) == ["small", "large", "nacl10"]  # as given, not alphabetical
    assert list(table.columns) == ["checkpoint", "prompt", "n", "parsed", "valid", "formula hits",
                                   "unique (valid)", "space groups", "novelty"]
    assert table.iloc[0].tolist() == ["small", "Na2Cl2", "200", "180/200 (90%) [85%, 93%]",
                                      "150/200 (75%) [69%, 80%]", "140/200 (70%) [63%, 76%]",
                                      "60/200 (30%) [24%, 37%]", "9", "50.0%"]


def _ablation(tmp_path: Path) -> pd.DataFrame:
    """Temperature ablation: 3 prompts x T 0.8 / 0.6 / 0.4; validity falls with T's rank, uniqueness too."""
    dirs = []
    for ti, t in enumerate((0.8, 0.6, 0.4)):
        for pi, prompt in enumerate(("Na2Cl2", "Mg1O1", "Ti1O2")):
            dirs.append(_set(tmp_path / f"{ti}{pi}", ckpt="small", prompt=prompt, t=t, k=5, n=200,
                             parse_rate=0.9 + 0.03 * ti, validity=0.5 + 0.1 * ti + 0.05 * pi,
                             uniqueness_all=0.9 - 0.2 * ti, uniqueness_valid=0.4 - 0.1 * ti,
                             distinct_formulas=3 - ti, distinct_spacegroups=6 - ti + pi))
    return compare_sample_sets(dirs)


def test_temperature_ablation_macro_averages_over_prompts(tmp_path):
    df = _ablation(tmp_path)
    macro = macro_table(df)
    assert list(macro["temperature"]) == [0.8, 0.6, 0.4] and set(macro["prompts"]) == {3}
    first = macro.iloc[0]
    assert first["valid_rate"] == pytest.approx((0.5 + 0.55 + 0.6) / 3)
    assert first["distinct_spacegroups"] == pytest.approx(7.0)
    display = macro_display(df)
    assert list(display.columns) == ["checkpoint", "T", "prompts", "mean parsed", "mean valid", "mean unique",
                                     "mean unique (valid)", "mean distinct formulas", "mean space groups"]
    # mean counts are whole numbers when whole ("1", not "1.0"), one decimal otherwise
    assert display.iloc[2].tolist() == ["small", "0.4", "3", "96.0%", "75.0%", "50.0%", "20.0%", "1", "5"]
    md = summary_markdown(df)
    assert "## Macro-average over prompts" in md
    assert "| small | 0.4 | 3 | 96.0% | 75.0% | 50.0% | 20.0% | 1 | 5 |" in md
    assert "Sampling: top-k = 5, top-p = 1, seed = 1, constrained decoding on" in md  # T varies: a column instead
    df.loc[df["prompt"] == "Na2Cl2", "distinct_spacegroups"] += 1  # means of 7, 6, 5 +1 on one of three prompts
    assert macro_display(df).iloc[0]["mean space groups"] == "7.3"


def test_per_prompt_table_pivots_prompts_against_checkpoints_and_settings(tmp_path):
    df = _ablation(tmp_path)
    pivot = per_prompt_table(df)
    assert list(pivot.columns) == ["prompt", "small T=0.8", "small T=0.6", "small T=0.4"]
    assert list(pivot["prompt"]) == ["Na2Cl2", "Mg1O1", "Ti1O2"]
    assert pivot.loc[1, "small T=0.6"] == "130/200 (65%) [58%, 71%]"  # validity 0.5 + 0.1 + 0.05
    with pytest.raises(ValueError, match="metric must be one of"):
        per_prompt_table(df, "validity")


def test_unevaluated_or_foreign_folders_are_refused_by_name(tmp_path):
    pending = _set(tmp_path / "pending", evaluated=False)
    with pytest.raises(InputError, match="has not been evaluated: run `crystallab evaluate"):
        compare_sample_sets([pending])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty is not a sample set"):
        compare_sample_sets([tmp_path / "empty"])
    with pytest.raises(InputError, match="one label per set"):
        compare_sample_sets([pending], labels=["a", "b"])


def test_labels_default_to_the_checkpoints_run(tmp_path):
    df = compare_sample_sets([_set(tmp_path / "x", ckpt="run-7", **NACL10)])
    assert df.loc[0, "checkpoint"] == "run-7" and df.loc[0, "checkpoint_sha256"] == SHA


def test_write_sweep_report_writes_csv_markdown_and_every_sample(tmp_path):
    sweep = tmp_path / "sweep"
    names = ["small__Na2Cl2__T0.8_k10_p1.0_n10_s1", "small__Mg1O1__T0.8_k10_p1.0_n10_s1"]
    for name, prompt in zip(names, ("Na2Cl2", "Mg1O1")):
        _set(sweep / "cells" / name, ckpt="ignored", prompt=prompt, **NACL10)
    df = write_sweep_report(sweep, names, checkpoints={"small": "pretrained/small.pt"}, title="two prompts")
    assert list(df["checkpoint"]) == ["small", "small"]  # the label comes from the cell name
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["cell"]) == names and list(summary["n_unique_valid"]) == [4, 4]
    assert len(pd.read_csv(sweep / "summary_macro.csv")) == 1
    samples = pd.read_csv(sweep / "samples.csv")
    assert len(samples) == 20 and set(samples["cell"]) == set(names)
    md = (sweep / "summary.md").read_text()
    assert md.startswith("# two prompts") and "- `small`: pretrained/small.pt" in md
    assert sweep_rows(sweep, []).empty and "No evaluated sample sets yet" in summary_markdown(sweep_rows(sweep, []))


def test_counts_agree_with_the_evaluators_per_sample_table(tmp_path, golden_canonical):
    """A set of real CIF texts (three copies of one structure) evaluated for real: the row's counts are those
    of eval.csv, and the copies count once towards uniqueness."""
    from pymatgen.core import Composition

    from engine.evaluate.evaluation import evaluate_sample_set

    by_formula = {}  # one small valid structure per reduced formula: four structures that cannot match
    for r in sorted(golden_canonical, key=lambda r: len(r["decoded"])):
        if r["validity"]["is_valid"]:
            by_formula.setdefault(Composition(r["decoded"].split("\n", 1)[0][5:]).reduced_formula, r)
    small = list(by_formula.values())[:4]
    texts = [small[0]["decoded"]] * 3 + [r["decoded"] for r in small[1:4]]
    folder = _set(tmp_path / "real", n=len(texts), evaluated=False)
    (folder / "raw").mkdir()
    for i, text in enumerate(texts):
        (folder / "raw" / f"{i:04d}.txt").write_text(text)
    evaluate_sample_set(folder, workers=1, timeout_s=60)
    row = compare_sample_sets([folder]).iloc[0]
    table = pd.read_csv(folder / "eval.csv")
    assert row["n"] == 6
    assert row["n_parsed"] == table["parse_ok"].sum() == 6
    assert row["n_valid"] == table["is_valid"].sum() >= 4
    assert row["n_unique"] == 4  # the three copies are one structure


def test_wilson_interval_matches_the_textbook_values():
    from engine.evaluate.report import wilson_interval

    assert wilson_interval(3, 4) == pytest.approx((0.3006, 0.9544), abs=1e-4)  # "0.75 [0.30, 0.95], n = 4"
    assert wilson_interval(0, 4) == pytest.approx((0.0, 0.4899), abs=1e-4)  # 0/4 still says "at most ~49 %"
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)


def _tiny_checkpoint(path: Path, dataset: str | None, fingerprint: str | None) -> Path:
    import torch

    from engine.models.checkpoint import save_checkpoint
    from engine.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=32))
    config = {"dataset": dataset} if dataset else {}
    return save_checkpoint(path, model=model, iter_num=450, best_val_loss=None, config=config,
                           meta={"run": "nacl10", "data_fingerprint": fingerprint})


def _legend_labels(lines: list[str]) -> set[str]:
    """Every label the legend defines (a bullet may define several, comma-separated)."""
    legend = lines[lines.index("## Legend"):]
    labels = set()
    for line in legend:
        if line.startswith("- **"):
            label = line[4:line.index("**:")]
            labels |= set(label.split(", ")) if label.startswith("mean ") else {label}
    return labels


def test_report_states_provenance_and_defines_every_column(tmp_path):
    from engine.models.checkpoint import checkpoint_sha256

    ckpt = _tiny_checkpoint(tmp_path / "nacl10.pt", "nacl10_train", "f00dfeed" * 8)
    sha = checkpoint_sha256(ckpt)
    sets = [_set(tmp_path / f"s{i}", prompt=prompt, n=4, ckpt_path=str(ckpt), sha=sha, parse_rate=0.75,
                 validity=0.75, formula_hit_rate=0.0, uniqueness_all=0.5, uniqueness_valid=0.5, distinct_formulas=1,
                 distinct_spacegroups=1)
            for i, prompt in enumerate(("Na2Cl2", "Mg1O1"))]
    env = {"crystallab": "0.1.0", "git_sha": "0123456789abcdef0123", "device": "cuda"}
    md = summary_markdown(compare_sample_sets(sets), title="t", environment=env)
    lines = md.splitlines()
    assert "constrained decoding on" in lines[2]
    assert "Software: crystallab 0.1.0, git 0123456789ab. Device: cuda:0 (NVIDIA H100 80GB HBM3)." in lines
    assert any(line.startswith("Dates: samples drawn 2026-11-20; report written 20") for line in lines)
    assert (f"- `nacl10`: {ckpt} (step 450, sha256 {sha[:12]}; trained on `nacl10_train` "
            "(data fingerprint f00dfeedf00d))") in lines
    # rates with n and their 95 % interval; a hit rate of 0 of 4 is a count, not n/a
    assert "| nacl10 | Na2Cl2 | 4 | 3/4 (75%) [30%, 95%] | 3/4 (75%) [30%, 95%] | 0/4 (0%) [0%, 49%] |" in md
    # every column header of every table is defined, and the legend speaks to readers, not to developers
    defined = _legend_labels(lines)
    for i, line in enumerate(lines):
        if line.startswith("|") and lines[i + 1].startswith("|:"):
            headers = [h.strip() for h in line.strip("|").split("|")]
            if headers[0] == "prompt":  # per-prompt table: the other columns are checkpoint labels
                headers = headers[:1]
            assert set(headers) <= defined, set(headers) - defined
    assert {"k/n (p%) [low, high]", "n/a", "T", "constrained"} <= defined
    assert "seed reports" not in md and "None" not in md


def test_a_checkpoint_replaced_since_sampling_is_not_credited_with_its_training_data(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "nacl10.pt", "nacl10_train", "f00dfeed" * 8)
    df = compare_sample_sets([_set(tmp_path / "s", ckpt_path=str(ckpt), sha="0" * 64, **NACL10)])
    assert df.loc[0, "checkpoint_dataset"] is None
    assert "training data not recorded in the checkpoint" in summary_markdown(df)


def test_summary_csv_has_intervals_and_round_trips_to_whole_counts(tmp_path):
    sweep = tmp_path / "sweep"
    names = ["a__Na2Cl2__T0.8_k10_p1.0_n4_s1", "a__Na2Cl2__T0.8_k10_p1.0_n4_s1_off"]
    _set(sweep / "cells" / names[0], n=4, parse_rate=0.0, validity=0.0, formula_hit_rate=0.0, distinct_spacegroups=0)
    _set(sweep / "cells" / names[1], n=4, constrain=False, parse_rate=0.75, validity=0.5, formula_hit_rate=0.25,
         distinct_spacegroups=2)
    write_sweep_report(sweep, names, checkpoints={}, title="t")
    summary = pd.read_csv(sweep / "summary.csv")
    for rate in ("parsed_rate", "valid_rate", "formula_hit_rate", "unique_valid_rate"):
        assert {f"{rate}_ci_low", f"{rate}_ci_high"} <= set(summary.columns)
    assert summary.loc[0, "valid_rate_ci_high"] == pytest.approx(0.4899, abs=1e-4)
    assert summary.loc[1, "parsed_rate_ci_low"] == pytest.approx(0.3006, abs=1e-4)
    assert pd.isna(summary.loc[0, "spacegroup_hit_rate_ci_low"])  # no prompt space group: no interval either
    assert list(summary["constrain"]) == [True, False]
    # the CSV read back (NaN columns make floats) still prints whole counts, and the switch as on/off
    table = per_checkpoint_table(summary)
    assert list(table["constrained"]) == ["on", "off"] and list(table["space groups"]) == ["0", "2"]
    assert list(table["n"]) == ["4", "4"] and table.loc[1, "formula hits"] == "1/4 (25%) [5%, 70%]"
    md = (sweep / "summary.md").read_text()
    assert "`volume` in cubic angstrom (A^3), `density` in g/cm^3" in md  # units of samples.csv
    assert "constrained decoding" not in md.split("## Per checkpoint")[0]  # it varies, so it is a column

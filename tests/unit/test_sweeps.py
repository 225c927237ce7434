"""Sweeps: config validation, deterministic cells, full runs, resume, stale-checkpoint redo, stop, and the CLI.

Sweeps run for real (sampler, post-processing, the evaluator's worker processes, the report) with a tiny random
GPT on CPU and a few short samples per cell; its texts do not parse, which is all these tests need.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import engine.evaluate.sweeps as sweeps
from engine.cli import main as cli_main
from engine.evaluate.sweep_config import (
    SweepConfig,
    cell_name,
    config_from_dict,
    dump_sweep_config,
    load_sweep_config,
    plan_cells,
    prompt_slug,
)
from engine.evaluate.sweeps import run_sweep
from engine.lab.errors import CheckpointError, ConfigError
from engine.lab.fsutil import sha256_file
from engine.lab.settings import get_settings
from engine.models.checkpoint import save_checkpoint
from engine.models.gpt import GPT, GPTConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two cores shared by many processes: one intra-op thread avoids oversubscription stalls.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_tiny(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=64))
    return save_checkpoint(path, model=model, iter_num=7, best_val_loss=None, config={}, meta={"run": "tiny"})


@pytest.fixture
def ckpt() -> Path:
    """A tiny checkpoint at ``<runs>/train/tiny/ckpt/best.pt`` (the path the configs below name relatively)."""
    return _save_tiny(get_settings().runs_dir / "train" / "tiny" / "ckpt" / "best.pt")


def _config(**changes) -> SweepConfig:
    raw = {
        "name": "t", "checkpoints": {"tiny": "train/tiny/ckpt/best.pt"}, "prompts": ["Na2Cl2", "Mg1O1"],
        "temperatures": [0.8, 0.4], "top_k": 10, "n": 2, "seeds": 3, "max_new_tokens": 24, "device": "cpu",
        "eval_workers": 1,
    }
    raw.update(changes)
    return config_from_dict(raw, "test")


class Recorder:
    """Progress callback that records events and can raise on the k-th occurrence of one."""

    def __init__(self, raise_on: tuple[str, int] | None = None) -> None:
        self.events: list[tuple[str, str | None, str]] = []
        self.raise_on = raise_on

    def __call__(self, event, cell, status) -> None:
        self.events.append((event, cell.name if cell else None, status.get("message", "")))
        if self.raise_on and event == self.raise_on[0]:
            if sum(e == event for e, _, _ in self.events) == self.raise_on[1]:
                raise KeyboardInterrupt

    def cells(self, event: str) -> list[str]:
        return [c for e, c, _ in self.events if e == event]


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_cells_are_named_deterministically_in_run_order():
    cells = plan_cells(_config(checkpoints={"a": "x.pt", "b": "y.pt"}))
    assert len(cells) == 2 * 2 * 2  # checkpoints x prompts x temperatures
    assert cells[0].name == "a__Na2Cl2__T0.8_k10_p1.0_n2_s3"
    assert [c.checkpoint for c in cells] == ["a"] * 4 + ["b"] * 4  # checkpoint outermost: loaded once each
    assert [c.name for c in cells] == [c.name for c in plan_cells(_config(checkpoints={"a": "x.pt", "b": "y.pt"}))]
    assert cell_name("m", cells[0].prompt, 1, 0, 0.95, 100, 1) == "m__Na2Cl2__T1.0_k0_p0.95_n100_s1"


def test_prompts_name_the_cell_as_written_or_by_formula_unit_and_z():
    cfg = _config(prompts=["MgO", {"formula": "NaCl", "z": 4, "spacegroup": 225}, ""])
    texts = [c.prompt for c in plan_cells(cfg)][::2]
    assert texts[0].text == "data_Mg1O1\n"  # a reduced formula without z is a one-unit cell, not six prompts
    assert texts[1].formula == "Na4Cl4" and texts[1].spacegroup == "Fm-3m"
    assert texts[2].text == "data_"
    assert [prompt_slug(p) for p in texts] == ["Mg1O1", "Na4Cl4_Fm-3m", "unconditional"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": [0.8]}, "unknown key 'temperature' (did you mean temperatures?)"),
        ({"temperatures": [-1]}, "temperatures must be >= 0"),
        ({"top_p": [0]}, "top_p must be in (0, 1]"),
        ({"n": [10, 10]}, "n lists a value twice"),
        ({"n": "ten"}, "n must be a number"),
        ({"prompts": ["Xy2O"]}, "prompts[0] (Xy2O)"),
        ({"prompts": ["Na2Cl2", "Na2Cl2"]}, "prompts[0] and prompts[1] are the same prompt"),
        ({"prompts": [{"formula": "NaCl", "zz": 2}]}, "prompts[0] has unknown key(s) ['zz']"),
        ({"checkpoints": {"a__b": "x.pt"}}, "checkpoint label 'a__b'"),
        ({"checkpoints": {}}, "checkpoints must map at least one label"),
        ({"device": "gpu"}, "device must be auto, cpu"),
        ({"name": "a/b"}, "name 'a/b' names a folder"),
    ],
)
def test_bad_config_is_refused_with_a_message_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as err:
        _config(**changes)
    assert message in str(err.value)
    assert str(err.value).startswith("test: ")  # and where it came from


def test_set_overrides_read_yaml_lists_commas_and_checkpoint_labels(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ncheckpoints: {a: x.pt}\nprompts: [Na2Cl2]\n")
    cfg = load_sweep_config(path, ["temperatures=[0.8, 0.6]", "top_k=5,10", "checkpoints.b=/abs/y.pt", "n=3"])
    assert cfg.temperatures == (0.8, 0.6) and cfg.top_k == (5, 10) and cfg.n == (3,)
    assert cfg.checkpoints == {"a": "x.pt", "b": "/abs/y.pt"}
    # the resolved config written to sweep.yaml reads back to the same config
    (tmp_path / "r.yaml").write_text(dump_sweep_config(cfg))
    assert load_sweep_config(tmp_path / "r.yaml") == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_config_validates(path):
    cfg = load_sweep_config(path)
    cells = plan_cells(cfg)
    assert cells and len({c.name for c in cells}) == len(cells)
    assert all(not Path(p).is_absolute() for p in cfg.checkpoints.values())  # portable: under the runs root


def test_seed_configs_have_the_seed_experiments_shapes():
    shapes = {name: plan_cells(load_sweep_config(CONFIGS / f"sweep_{name}.yaml"))
              for name in ("nacl10", "three_ckpts_na2cl2", "prompts", "temperature_ablation")}
    assert [(c.prompt.text, c.n) for c in shapes["nacl10"]] == [("data_Na2Cl2\n", 10)]
    assert {c.checkpoint for c in shapes["three_ckpts_na2cl2"]} == {"small", "large", "nacl10"}
    assert {c.n for c in shapes["three_ckpts_na2cl2"]} == {200}
    assert len({c.prompt.formula for c in shapes["prompts"]}) >= 7 and {c.n for c in shapes["prompts"]} == {100}
    ablation = shapes["temperature_ablation"]
    assert sorted({c.temperature for c in ablation}) == [0.4, 0.6, 0.8] and {c.top_k for c in ablation} == {5}
    assert len({c.prompt.formula for c in ablation}) == 3 and {c.n for c in ablation} == {200}


# ---------------------------------------------------------------------------------------------------------------
# Running


def test_sweep_writes_every_cell_and_the_summary_tables(ckpt):
    out = run_sweep(_config())
    assert out == get_settings().sweeps_dir / "t"
    names = [c.name for c in plan_cells(_config())]
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(names)
    for name in names:
        cell = out / "cells" / name
        assert len(list((cell / "raw").glob("*.txt"))) == 2
        assert (cell / "eval.csv").exists() and (cell / "eval_summary.json").exists()
        recorded = json.loads((cell / "config.json").read_text())
        assert recorded["checkpoint"]["sha256"] == sha256_file(ckpt)
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["cell"]) == names
    assert summary["valid_rate"].notna().all() and summary["parsed_rate"].notna().all()  # evaluator keys agree
    macro = pd.read_csv(out / "summary_macro.csv")
    assert sorted(macro["temperature"]) == [0.4, 0.8] and set(macro["prompts"]) == {2}
    assert len(pd.read_csv(out / "samples.csv")) == 4 * 2
    md = (out / "summary.md").read_text()
    for heading in ("## Per checkpoint", "## Per prompt: valid", "## Macro-average over prompts"):
        assert heading in md
    assert "| tiny | Na2Cl2 | 0.8 | 2 | 0/2 (0%) [0%, 66%] | 0/2 (0%) [0%, 66%] |" in md
    # what a paper needs: decoding mode, software and commit of the sweep's run, its device, the dates
    env = json.loads((out / "env.json").read_text())
    assert "constrained decoding on" in md and f"Device: {env['device']}." in md and "Dates: samples drawn" in md
    assert f"crystallab {env['crystallab']}, git {str(env['git_sha'])[:12]}" in md
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "completed" and status["cells_done"] == status["cells_total"] == 4
    assert load_sweep_config(out / "sweep.yaml") == _config()


def test_interrupted_sweep_resumes_without_redoing_finished_cells(ckpt, monkeypatch):
    cfg = _config()
    names = [c.name for c in plan_cells(cfg)]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, progress=Recorder(raise_on=("sample", 2)))  # interrupted as the second cell starts
    out = get_settings().sweeps_dir / "t"
    first = out / "cells" / names[0]
    assert (first / "eval_summary.json").exists()  # the finished cell's evaluation was waited for
    assert not (out / "cells" / names[1]).exists()
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}

    sampled = []
    real = sweeps._sample_cell
    monkeypatch.setattr(sweeps, "_sample_cell", lambda *a, **k: (sampled.append(a[1].name), real(*a, **k)))
    rec = Recorder()
    run_sweep(cfg, progress=rec)
    assert sampled == names[1:]
    assert rec.cells("skip") == names[:1]
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamps
    assert json.loads((out / "status.json").read_text())["cells_done"] == 4


def test_sampled_but_unevaluated_cell_is_only_evaluated(ckpt, monkeypatch):
    cfg = _config(prompts=["Na2Cl2"], temperatures=[0.8])
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, progress=Recorder(raise_on=("sampled", 1)))  # before its evaluation was queued
    cell = get_settings().sweeps_dir / "t" / "cells" / plan_cells(cfg)[0].name
    assert (cell / "config.json").exists() and not (cell / "eval_summary.json").exists()
    monkeypatch.setattr(sweeps, "_sample_cell", lambda *a, **k: pytest.fail("a sampled cell was sampled again"))
    run_sweep(cfg)
    assert (cell / "eval_summary.json").exists()


def test_changed_checkpoint_forces_the_cell_to_be_redone(ckpt):
    cfg = _config(prompts=["Na2Cl2"], temperatures=[0.8])
    out = run_sweep(cfg)
    cell = out / "cells" / plan_cells(cfg)[0].name
    old_sha = json.loads((cell / "config.json").read_text())["checkpoint"]["sha256"]
    _save_tiny(ckpt, seed=1)  # new weights at the same path (e.g. a training run wrote a new best.pt)
    rec = Recorder()
    run_sweep(cfg, progress=rec)
    assert rec.cells("redo") == [cell.name]
    message = next(m for e, _, m in rec.events if e == "redo")
    assert "checkpoint at its path changed" in message and old_sha[:12] in message
    assert json.loads((cell / "config.json").read_text())["checkpoint"]["sha256"] == sha256_file(ckpt) != old_sha
    assert json.loads((out / "status.json").read_text())["cells_redone"] == {cell.name: message.split(": ", 1)[1]}


def test_changed_sampling_setting_forces_a_redo(ckpt):
    run_sweep(_config(prompts=["Na2Cl2"], temperatures=[0.8]))
    rec = Recorder()
    run_sweep(_config(prompts=["Na2Cl2"], temperatures=[0.8], max_new_tokens=20), progress=rec)
    assert len(rec.cells("redo")) == 1
    assert "max_new_tokens 24 -> 20" in next(m for e, _, m in rec.events if e == "redo")


def test_stop_file_stops_between_cells_and_a_rerun_finishes(ckpt):
    cfg = _config()
    out = get_settings().sweeps_dir / "t"

    def stop_after_first(event, cell, status):
        if event == "sampled":
            (out / sweeps.STOP_FILE).write_text("stop\n")

    run_sweep(cfg, progress=stop_after_first)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["cells_done"] == 1
    assert not (out / sweeps.STOP_FILE).exists()  # consumed, so the next run goes on
    assert len(list((out / "cells").iterdir())) == 1
    run_sweep(cfg)
    assert json.loads((out / "status.json").read_text())["cells_done"] == 4


def test_missing_checkpoint_is_reported_before_anything_runs():
    with pytest.raises(CheckpointError) as err:
        run_sweep(_config())
    assert "checkpoint 'tiny'" in str(err.value) and "train/tiny/ckpt/best.pt" in str(err.value)
    assert not (get_settings().sweeps_dir / "t").exists()


def test_cli_runs_the_shipped_tiny_config_and_prints_the_report(capsys):
    _save_tiny(get_settings().runs_dir / "train" / "tiny_cpu" / "ckpt" / "best.pt")
    rc = cli_main(["sweep", str(CONFIGS / "sweep_tiny.yaml"), "--set", "n=2", "--set", "max_new_tokens=24",
                   "--out", "cli"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "## Per checkpoint" in printed.out and "[4/4]" in printed.err
    assert (get_settings().sweeps_dir / "cli" / "summary.md").exists()
    assert cli_main(["sweep", str(CONFIGS / "sweep_tiny.yaml"), "--set", "temprature=1"]) == 2
    assert "did you mean temperatures?" in capsys.readouterr().err


def test_an_existing_file_as_out_is_a_one_line_error_also_for_check(tmp_path, capsys):
    existing = tmp_path / "good0.cif"
    existing.write_text("data_x\n")
    config = str(CONFIGS / "sweep_tiny.yaml")
    for out, says in ((existing, "is a file"), (existing / "sub", f"lies under {existing}, which is a file")):
        for check in ([], ["--check"]):
            assert cli_main(["sweep", config, "--out", str(out), *check]) == 2
            printed = capsys.readouterr()
            assert printed.out == ""  # --check prints no config before the error
            assert says in printed.err and "give --out a folder" in printed.err and len(printed.err.splitlines()) == 1
    assert existing.read_text() == "data_x\n"


def test_a_failed_evaluation_fails_the_sweep_after_the_other_cells_finish(ckpt, monkeypatch):
    import engine.evaluate.evaluation

    cfg = _config()
    names = [c.name for c in plan_cells(cfg)]
    real = engine.evaluate.evaluation.evaluate_sample_set

    def flaky(set_dir, **kw):
        if Path(set_dir).name == names[1]:
            raise RuntimeError("evaluator bug")
        return real(set_dir, **kw)

    monkeypatch.setattr(engine.evaluate.evaluation, "evaluate_sample_set", flaky)
    with pytest.raises(RuntimeError, match="evaluator bug"):
        run_sweep(cfg)
    out = get_settings().sweeps_dir / "t"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["cells_done"] == 3
    assert status["cells_failed"] == {names[1]: "evaluation failed: evaluator bug"}
    assert list(pd.read_csv(out / "summary.csv")["cell"]) == [names[0], *names[2:]]


def test_train_dataset_by_name_feeds_the_novelty_index(ckpt, monkeypatch, shared_dir, tmp_path):
    from engine.data.datasets import build_dataset
    from engine.evaluate.metrics import TrainingIndex

    pd.read_csv(shared_dir / "data" / "mp20_subset" / "train.csv", nrows=8).to_csv(tmp_path / "few.csv", index=False)
    build_dataset([tmp_path / "few.csv"], get_settings().datasets_dir / "mini", val_fraction=0.25, workers=1)
    built = []
    real = TrainingIndex.from_dataset.__func__
    monkeypatch.setattr(TrainingIndex, "from_dataset",
                        classmethod(lambda cls, d, **k: (built.append(Path(d)), real(cls, d, **k))[1]))
    out = run_sweep(_config(prompts=["Na2Cl2"], temperatures=[0.8], train_dataset="mini"))
    assert built == [get_settings().datasets_dir / "mini"]
    assert "novelty" in pd.read_csv(out / "summary.csv").columns


# ---------------------------------------------------------------------------------------------------------------
# reference and stability keys (issue 13)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"reference": {"cutoffs": "mp20"}}, "reference needs a path"),
        ({"reference": {"path": "t.csv", "cutoffs": "mp21"}}, "reference.cutoffs: COV cutoffs 'mp21'"),
        ({"reference": {"path": "t.csv", "limit": 0}}, "reference.limit must be at least 1"),
        ({"reference": {"path": "t.csv", "cutof": 1}}, "reference has unknown key(s) ['cutof']"),
        ({"stability": {"potential": "m3gnet", "hull": "mp20"}}, "stability.potential 'm3gnet' is not one of"),
        ({"stability": {"potential": "chgnet"}}, "stability.hull '' must name a hull"),
        ({"stability": "chgnet"}, "stability must be a mapping"),
    ],
)
def test_bad_reference_or_stability_key_is_refused(changes, message):
    with pytest.raises(ConfigError) as err:
        _config(**changes)
    assert message in str(err.value)


def test_reference_and_stability_keys_resolve_and_round_trip(tmp_path):
    cfg = _config(reference="t.csv", stability={"potential": "SevenNet-0", "hull": "mp20"})
    assert cfg.reference == {"path": "t.csv", "cutoffs": [0.4, 10.0], "limit": None}
    assert cfg.stability == {"potential": "sevennet-0", "hull": "mp20"}
    assert _config(reference={"path": "t.csv", "cutoffs": [0.2, 4], "limit": 50}).reference["cutoffs"] == [0.2, 4.0]
    path = tmp_path / "sweep.yaml"
    path.write_text(dump_sweep_config(cfg))
    assert load_sweep_config(path) == cfg


def test_reference_gives_every_cell_distribution_metrics_and_a_done_cell_is_completed(ckpt, tmp_path):
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    ref = tmp_path / "ref.csv"
    pd.DataFrame({"material_id": ["a"], "cif": [str(CifWriter(nacl.get_primitive_structure()))]}).to_csv(ref,
                                                                                                        index=False)
    out = run_sweep(_config(prompts=["Na2Cl2"], temperatures=[0.8]))
    assert "cov_recall" not in json.loads(next((out / "cells").glob("*/eval_summary.json")).read_text())
    recorder = Recorder()
    run_sweep(_config(prompts=["Na2Cl2"], temperatures=[0.8], reference=str(ref)), progress=recorder)
    assert recorder.cells("skip") == [] and recorder.cells("sample") == []  # evaluated again, not resampled
    summary = pd.read_csv(out / "summary.csv")
    assert summary["cov_recall"].notna().all() and "wdist_density" in summary.columns
    md = (out / "summary.md").read_text()
    assert "## In the shape of the published tables" in md and "| ours: tiny / Na2Cl2" in md

"""Sequence-level distillation data, progressive chains (shrinking, resumable, with baselines) and their report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pymatgen.core import Lattice, Structure

from engine.cli import main
from engine.data.datasets import build_dataset
from engine.data.tokens import iter_cifs, load_token_dataset
from engine.lab.errors import ConfigError
from engine.models import family as fam
from engine.models.checkpoint import save_checkpoint
from engine.models.gpt import GPT, GPTConfig
from engine.train.chain import run_chain
from engine.train.config import load_config
from engine.train.seqdistill import build_seq_dataset, keep_valid_unique, parse_prompt_specs
from engine.train.trainer import train

TINY = ["dropout=0.0", "batch_size=4", "eval_iters=2", "warmup_iters=2", "learning_rate=3e-3", "device=cpu",
        "dtype=float32", "block_size=64"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def nacl(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nacl")
    (root / "cifs").mkdir()
    for k in range(8):
        s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.50 + 0.03 * k), ["Na", "Cl"],
                                      [[0, 0, 0], [0.5, 0.5, 0.5]])
        s.to(filename=str(root / "cifs" / f"{k}.cif"))
    build_dataset([str(root / "cifs")], root / "data", val_fraction=0.15, dedup=False, workers=1)
    return root / "data"


@pytest.fixture(scope="module")
def teacher(nacl, tmp_path_factory) -> Path:
    run = train(load_config(None, [f"dataset={nacl}", *TINY, "n_layer=2", "n_head=2", "n_embd=64", "max_iters=30",
                                   "eval_interval=30"]),
                run_dir=tmp_path_factory.mktemp("t") / "teacher", progress=False)
    return run / "ckpt" / "best.pt"


# --- sequence-level data ---


class FixedTexts(fam.FamilyModel):
    """A stand-in teacher family (tests only) that 'samples' the texts it was given, in order."""

    family, text_format, knobs = "test-fixed-texts", "crystallm-cif", ()
    texts: list[str] = []

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def load(cls, path: Path, device: Any) -> FixedTexts:
        return cls(Path(path))

    def generate(self, prompt, n, knobs, *, seed=1337, batch_size=None, progress=None, first_index=0):
        texts = self.texts[first_index:first_index + n]
        return [fam.Generation([], t, 100, True, None) for t in texts]

    def sequence_log_likelihood(self, texts):
        raise NotImplementedError

    def training_loss(self, batch):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"family": self.family, "step": 7, "run": "fixed"}


def test_seq_dataset_keeps_only_valid_unique_samples_and_records_provenance(nacl, tmp_path, monkeypatch):
    real = list(iter_cifs(load_token_dataset(nacl), "train"))
    broken = real[0][: len(real[0]) // 2]  # cut mid-way: truncated, never valid
    FixedTexts.texts = [real[0], broken, real[1], "data_Na4Cl4\nnonsense\n"]  # real[1]: same structure, scaled
    monkeypatch.setitem(fam._REGISTRY, FixedTexts.family, FixedTexts)
    ckpt = tmp_path / "fixed.pt"
    save_checkpoint(ckpt, model=GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)), iter_num=7,
                    best_val_loss=None, config={}, meta={"family": FixedTexts.family})
    record = build_seq_dataset(ckpt, parse_prompt_specs(["Na4Cl4"]), 4, tmp_path / "seq", seed=5, val_fraction=0.0,
                               workers=1)
    assert record["samples"] == 4 and record["kept"] == 1
    assert record["dropped"]["duplicate"] == 1 and sum(record["dropped"].values()) == 3
    assert record["teacher"]["path"] == str(ckpt) and len(record["teacher"]["sha256"]) == 64
    assert record["prompts"][0]["formula"] == "Na4Cl4" and record["seed"] == 5 and record["n_per_prompt"] == 4
    on_disk = json.loads((tmp_path / "seq" / "seqdistill.json").read_text())
    assert on_disk["kept"] == 1
    cifs = list(iter_cifs(load_token_dataset(tmp_path / "seq"), "train"))
    assert len(cifs) == 1 and "Na" in cifs[0]
    # Mixed with the real data: the kept sample plus every real CIF.
    mixed = build_seq_dataset(ckpt, parse_prompt_specs(["Na4Cl4"]), 4, tmp_path / "seq_mix", seed=5,
                              val_fraction=0.0, mix=[str(nacl.parent / "cifs")], workers=1)
    assert mixed["mixed_with"] == [str(nacl.parent / "cifs")]
    assert len(list(iter_cifs(load_token_dataset(tmp_path / "seq_mix"), "train"))) == 1 + 8


def test_keep_valid_unique_names_each_drop_reason():
    rows = [{"is_valid": False, "failure_reason": "truncated", "cif": None},
            {"is_valid": False, "failure_reason": None, "cif": "x"}]
    kept, dropped = keep_valid_unique(rows)
    assert kept == [] and dropped == {"truncated": 1, "not_valid": 1}


# --- chains ---


def _chain(tmp_path: Path, teacher: Path, nacl: Path, stages: list[dict], **more) -> Path:
    import yaml

    cfg = {"name": "c", "teacher": str(teacher), "dataset": str(nacl),
           "train": {k: yaml.safe_load(v) for k, v in (item.split("=") for item in TINY)} | {"max_iters": 6,
                                                                                               "eval_interval": 3},
           "stages": stages, **more}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_chain_whose_stages_do_not_shrink_is_refused_in_one_line(nacl, teacher, tmp_path, capsys):
    path = _chain(tmp_path, teacher, nacl, [{"name": "same", "n_layer": 2, "n_head": 2, "n_embd": 64}])
    with pytest.raises(ConfigError, match="does not shrink from its teacher 'teacher'") as err:
        run_chain(path, out=tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out" / "same").exists()
    grow = _chain(tmp_path, teacher, nacl, [{"name": "a", "n_layer": 1, "n_head": 2, "n_embd": 32},
                                            {"name": "b", "n_layer": 1, "n_head": 2, "n_embd": 48}])
    assert main(["distill", "chain", str(grow), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "stage 'b'" in err and "does not shrink from its teacher 'a'" in err and len(err.strip().splitlines()) == 1


def test_bad_alpha_in_a_chain_is_refused_before_training(nacl, teacher, tmp_path):
    path = _chain(tmp_path, teacher, nacl, [{"name": "a", "n_layer": 1, "n_head": 2, "n_embd": 32, "kd_alpha": 3}])
    with pytest.raises(ConfigError, match="chain stage a: kd_alpha must be in"):
        run_chain(path, out=tmp_path / "out")


def test_chain_trains_stages_with_parents_and_baselines_resumes_and_reports(nacl, teacher, tmp_path):
    stages = [{"name": "assistant", "n_layer": 1, "n_head": 2, "n_embd": 32},
              {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 16}]
    path = _chain(tmp_path, teacher, nacl, stages,
                  report={"prompts": ["Na4Cl4"], "n": 2, "speed_batch": 2, "val_batches": 1})
    said: list[str] = []
    folder = run_chain(path, out=tmp_path / "chain", progress=False, say=said.append)
    for run in ("assistant", "assistant-baseline", "tiny", "tiny-baseline"):
        assert json.loads((folder / run / "status.json").read_text())["state"] == "completed"
    meta = torch.load(folder / "tiny" / "ckpt" / "best.pt", weights_only=True)["crystallab"]
    assert meta["distill"]["teacher"] == str(folder / "assistant" / "ckpt" / "best.pt")
    chain = json.loads((folder / "chain.json").read_text())
    assert [(s["name"], s["parent"]) for s in chain["stages"]] == [("assistant", "teacher"), ("tiny", "assistant")]
    report = json.loads((folder / "distill_report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "assistant", "assistant-baseline", "tiny", "tiny-baseline"}
    assert models["teacher"]["params"] > models["assistant"]["params"] > models["tiny"]["params"]
    for name in ("assistant", "tiny"):
        m = models[name]
        assert m["baseline_val_loss"] == models[f"{name}-baseline"]["val_loss"]
        assert set(m["speed"]) == {"b1", "b2"} and m["speed"]["b2"]["tokens_per_s"] > 0 and "b2" in m["speedup"]
        assert m["sampling"]["per_prompt"]["Na4Cl4"]["n"] == 2
    assert "| tiny | student | assistant |" in (folder / "distill_report.md").read_text()
    # A rerun skips every finished stage.
    said.clear()
    run_chain(path, out=tmp_path / "chain", progress=False, report=False, say=said.append)
    assert sum("skipped" in line for line in said) == 4, said


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(nacl, teacher, tmp_path):
    path = _chain(tmp_path, teacher, nacl, [{"name": "a", "n_layer": 1, "n_head": 2, "n_embd": 32}],
                  baseline=False)

    class StopAt4:  # the trainer checks once per step
        calls = 0

        def is_set(self) -> bool:
            self.calls += 1
            return self.calls >= 4

    with pytest.raises(ConfigError, match="stage a ended stopped; rerun"):
        run_chain(path, out=tmp_path / "chain", progress=False, report=False, say=lambda m: None,
                  stop_event=StopAt4())
    status = tmp_path / "chain" / "a" / "status.json"
    assert json.loads(status.read_text())["state"] == "stopped"
    said: list[str] = []
    run_chain(path, out=tmp_path / "chain", progress=False, report=False, say=said.append)
    assert said == ["a: resuming from its ckpt/last.pt"]
    assert json.loads(status.read_text())["state"] == "completed"
    assert json.loads(status.read_text())["step"] == 6


def test_every_shipped_chain_config_loads():
    from engine.train.chain import load_chain

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("distill_*.yaml"))
    assert configs
    for path in configs:
        chain = load_chain(path)
        assert chain["stages"] and chain["report"]["n"] >= 200
        load_config(None, [f"{k}={v}" for k, v in chain["train"].items()])  # the shared keys are training keys

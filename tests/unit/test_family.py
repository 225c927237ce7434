"""The model-family seam: GPT family generation and scoring, knob checks, registry, plugin families."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from engine.crystal.prompts import build_prompts
from engine.crystal.tokenizer import encode
from engine.lab.errors import CheckpointError, ConfigError
from engine.models.checkpoint import save_checkpoint
from engine.models.crystallm import CrystaLLMGPT
from engine.models.family import (
    DEFAULT_FAMILY,
    FAMILY_MODULES_ENV,
    family_names,
    get_family,
    load_family_model,
    peek_family,
    resolve_knobs,
)
from engine.models.gpt import GPT, GPTConfig
from engine.sample.sampler import generate

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32))
    path = tmp_path_factory.mktemp("fam") / "ckpt.pt"
    return save_checkpoint(path, model=model, iter_num=3, best_val_loss=None, config={}, meta={"run": "t"})


def test_a_checkpoint_without_a_family_is_the_gpt_family(tiny_ckpt):
    assert peek_family(tiny_ckpt) == DEFAULT_FAMILY == "crystallm-gpt"
    model = load_family_model(tiny_ckpt, "cpu")
    assert isinstance(model, CrystaLLMGPT)
    info = model.describe()
    assert (info["family"], info["block_size"], info["step"]) == ("crystallm-gpt", 32, 3)


def test_gpt_family_generates_what_the_sampler_generates(tiny_ckpt):
    model = load_family_model(tiny_ckpt, "cpu")
    (prompt,) = build_prompts("Na2Cl2")
    knobs = resolve_knobs(type(model), {"temperature": 0.7, "max_new_tokens": 12})
    ours = model.generate(prompt, 3, knobs, seed=5)
    direct = generate(model.network, encode(prompt.text), n=3, temperature=0.7, top_k=10, max_new_tokens=12,
                      seed=5, allowed_elements=["Na", "Cl"], constrain_spacegroup=True)
    assert [g.ids for g in ours] == [g.ids for g in direct]


def test_sequence_log_likelihood_is_the_summed_next_token_log_prob(tiny_ckpt):
    model = load_family_model(tiny_ckpt, "cpu")
    text = "data_Na2Cl2\nloop_\n_atom_type_symbol\nNa\nCl\n"
    ids = torch.tensor(encode(text))
    logits, _ = model.network(ids[None, :-1])
    expected = torch.log_softmax(logits[0], -1).gather(-1, ids[1:, None]).sum().item()
    (score,) = model.sequence_log_likelihood([text])
    assert score.n_tokens == len(ids) - 1
    assert score.logp == pytest.approx(expected, abs=1e-4)
    assert score.perplexity == pytest.approx(float(torch.exp(torch.tensor(-expected / score.n_tokens))), rel=1e-5)


def test_texts_longer_than_the_context_are_scored_once_per_token(tiny_ckpt):
    model = load_family_model(tiny_ckpt, "cpu")
    text = "data_Na2Cl2\n" + "_cell_length_a 5.6400\n" * 12  # well past block_size 32
    (score,) = model.sequence_log_likelihood([text])
    assert score.n_tokens == len(encode(text)) - 1
    assert score.logp < 0 and torch.isfinite(torch.tensor(score.logp))


def test_training_loss_is_the_network_cross_entropy(tiny_ckpt):
    model = load_family_model(tiny_ckpt, "cpu")
    x = torch.randint(0, 371, (2, 8))
    y = torch.randint(0, 371, (2, 8))
    assert model.training_loss((x, y)).item() == pytest.approx(model.network(x, y)[1].item())


def test_knobs_are_checked_by_name_and_range():
    knobs = resolve_knobs(CrystaLLMGPT, {"temperature": 0, "top_k": 5})
    assert knobs["temperature"] == 0.0 and knobs["top_k"] == 5 and knobs["constrain"] is True
    with pytest.raises(ConfigError, match="'steps' is not a sampling setting of the crystallm-gpt family"):
        resolve_knobs(CrystaLLMGPT, {"steps": 64})
    with pytest.raises(ConfigError, match="top_p = 1.5 is outside its range"):
        resolve_knobs(CrystaLLMGPT, {"top_p": 1.5})
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        resolve_knobs(CrystaLLMGPT, {"temperature": float("nan")})
    with pytest.raises(ConfigError, match="max_new_tokens must be a whole number"):
        resolve_knobs(CrystaLLMGPT, {"max_new_tokens": 2.5})


def test_an_unknown_family_is_refused_with_the_known_ones(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"crystallab": {"family": "no-such-family"}}, path)
    with pytest.raises(CheckpointError, match="model family 'no-such-family' is not known.*crystallm-gpt"):
        load_family_model(path)


def test_a_plugin_module_registers_a_family(monkeypatch):
    monkeypatch.setenv(FAMILY_MODULES_ENV, "families.replay")
    monkeypatch.syspath_prepend(str(TESTS))
    assert "replay" in family_names()
    assert get_family("replay").family == "replay"


def test_a_plugin_module_that_cannot_be_imported_is_named(monkeypatch):
    monkeypatch.setenv(FAMILY_MODULES_ENV, "no_such_module_xyz")
    with pytest.raises(ConfigError, match="CRYSTALLAB_FAMILY_MODULES names module 'no_such_module_xyz'"):
        family_names()


def test_the_cli_help_does_not_import_torch_through_the_registry():
    probe = "import sys; from engine.models import family; family.family_names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture
def replay_family(monkeypatch):
    """The tests' replay family, registered the way a lab registers its own (detached jobs inherit it)."""
    monkeypatch.setenv(FAMILY_MODULES_ENV, "families.replay")
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    from families.replay import save_replay

    return save_replay


def _known_cifs(golden_canonical, k: int = 2) -> list[str]:
    records = sorted((r for r in golden_canonical if "error" not in r), key=lambda r: len(r["ids"]))
    return [r["decoded"] for r in records[:k]]


def test_a_sweep_compares_checkpoints_of_different_families_in_one_table(replay_family, golden_canonical,
                                                                          tmp_path):
    from engine.evaluate.sweep_config import config_from_dict
    from engine.evaluate.sweeps import run_sweep
    from engine.lab.settings import get_settings

    runs = get_settings().runs_dir
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=64))
    save_checkpoint(runs / "train" / "tiny" / "ckpt" / "best.pt", model=gpt, iter_num=1, best_val_loss=None,
                    config={}, meta={"run": "tiny"})
    texts = _known_cifs(golden_canonical)
    replay_family(runs / "train" / "replay" / "ckpt" / "best.pt", texts)
    config = config_from_dict({
        "name": "families", "checkpoints": {"gpt": "train/tiny/ckpt/best.pt", "replay": "train/replay/ckpt/best.pt"},
        "prompts": [""], "temperatures": [0.5], "n": [2], "seeds": [0], "max_new_tokens": 16, "device": "cpu",
        "eval_workers": 1, "knobs": {"stride": 1},
    }, "test")
    out = run_sweep(config, tmp_path / "sweep")
    table = pd.read_csv(out / "summary.csv").set_index("checkpoint")
    assert table.loc["replay", "family"] == "replay" and table.loc["gpt", "family"] == "crystallm-gpt"
    assert table.loc["replay", "other_knobs"] == "stride=1"
    assert table.loc["replay", "parsed_rate"] == 1.0  # it replays real CIFs
    cell = next((out / "cells").glob("replay__*"))
    assert (cell / "raw" / "0000.txt").read_text() == texts[0]
    assert json.loads((cell / "config.json").read_text())["checkpoint"]["family"] == "replay"


def test_a_sweep_knob_no_family_has_is_refused(replay_family, tmp_path):
    from engine.evaluate.sweep_config import config_from_dict
    from engine.evaluate.sweeps import run_sweep
    from engine.lab.settings import get_settings

    replay_family(get_settings().runs_dir / "train" / "replay" / "ckpt" / "best.pt", ["data_X\n"])
    config = config_from_dict({"name": "k", "checkpoints": {"replay": "train/replay/ckpt/best.pt"}, "prompts": [""],
                               "knobs": {"steps": 64}, "device": "cpu"}, "test")
    with pytest.raises(ConfigError, match="knobs steps belong to none of this sweep's model families"):
        run_sweep(config, tmp_path / "s")


def test_the_sample_cli_gives_other_families_their_knobs_and_refuses_foreign_flags(replay_family,
                                                                                    golden_canonical, tmp_path):
    from engine.cli import main as cli_main

    ckpt = replay_family(tmp_path / "replay.pt", _known_cifs(golden_canonical))
    out = tmp_path / "set"
    assert cli_main(["sample", "--ckpt", str(ckpt), "--n", "2", "--knob", "stride=2", "--device", "cpu",
                     "--out", str(out), "--no-evaluate"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["sampling"]["stride"] == 2 and "temperature" not in config["sampling"]
    assert cli_main(["sample", "--ckpt", str(ckpt), "--n", "1", "--temperature", "0.5", "--device", "cpu",
                     "--out", str(tmp_path / "other")]) == 2


def test_ckpt_inspect_describes_any_family(replay_family, tiny_ckpt, tmp_path, capsys):
    from engine.cli import main as cli_main

    assert cli_main(["ckpt", "inspect", str(tiny_ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "crystallm-gpt"
    replay = replay_family(tmp_path / "replay.pt", ["data_X\n", "data_Y\n"])
    assert cli_main(["ckpt", "inspect", str(replay)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["n_texts"], info["knobs"]) == ("replay", 2, {"stride": 1})


def test_csp_scores_a_checkpoint_of_another_family(replay_family, golden_canonical, tmp_path):
    """CSP through the seam: the replay family writes the target's own CIF back, so it is matched."""
    from engine.cli import main as cli_main

    record = sorted((r for r in golden_canonical if "error" not in r), key=lambda r: len(r["ids"]))[0]
    ckpt = replay_family(tmp_path / "replay.pt", [record["decoded"]])
    targets = tmp_path / "targets.csv"
    pd.DataFrame({"material_id": ["t0"], "cif": [record["symmetrized_cif"]]}).to_csv(targets, index=False)
    out = tmp_path / "csp"
    assert cli_main(["csp", "--ckpt", str(ckpt), "--targets", str(targets), "--k", "2", "--knob", "stride=1",
                     "--workers", "1", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["match_rate"] == 1.0 and summary["checkpoint"]["family"] == "replay"
    assert summary["sampling"]["stride"] == 1 and "temperature" not in summary["sampling"]

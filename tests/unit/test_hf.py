"""The Hugging Face causal-LM family on a tiny Llama built in the test: load offline, LoRA fine-tune through the
lab's trainer, sample (seeded, element-constrained), score, write and evaluate a sample set, and refuse bad
input with one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families.hf_tiny import TRAIN_ARGS, tiny_dataset, tiny_model

from engine.crystal.prompts import build_prompts
from engine.lab.errors import CheckpointError, ConfigError, InputError
from engine.lab.runs import RunFolder
from engine.models.family import load_family_model, peek_family
from engine.models.hf import HFCausalLM, load_base_model
from engine.sample.hf_logits import ElementConstraint
from engine.train.config import load_config
from engine.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def hf_data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("hfdata"))


@pytest.fixture(scope="session")
def lora_run(hf_model, hf_data, tmp_path_factory) -> Path:
    """A LoRA fine-tune (Gruver's defaults: rank 8, alpha 32, dropout 0.05, q_proj/v_proj) of 30 steps."""
    out = tmp_path_factory.mktemp("hfrun") / "lora"
    cfg = load_config(None, [f"dataset={hf_data}", f"hf_model={hf_model}", *TRAIN_ARGS, "max_iters=30",
                             "eval_interval=15", f"out_dir={out}"])
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYSTALLAB_RUNS", str(out.parent / "runs"))
    try:
        return train(cfg, progress=False)
    finally:
        mp.undo()


def _losses(run: Path, split: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunFolder(run).metrics() if r.get("split") == split}


def test_a_model_folder_loads_offline_and_describes_itself(hf_model):
    assert peek_family(hf_model) == "hf-causal-lm"
    m = load_family_model(hf_model)
    info = m.describe()
    assert info["family"] == "hf-causal-lm" and info["text_format"] == "gruver"
    assert info["architecture"] == "LlamaForCausalLM" and info["vocab_size"] == 400 and not info["adapter"]
    s = m.sequence_log_likelihood(["4.7 4.7 4.7\n90 90 90\nNa\n0.00 0.00 0.00\n", "x"])
    assert s[0].n_tokens > 10 and s[0].logp < 0 and s[1].n_tokens == 1


def test_lora_fine_tune_through_the_trainer_writes_folder_checkpoints(lora_run, hf_model):
    train_losses, val = _losses(lora_run, "train"), _losses(lora_run, "val")
    assert train_losses[30] < train_losses[5] and val[30] < val[0], (train_losses, val)
    status = RunFolder(lora_run).read_status()
    assert status["state"] == "completed" and status["best_ckpt"].endswith("ckpt/best")
    ckpt = lora_run / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last"]  # no temporary folders left behind
    meta = json.loads((ckpt / "best" / "crystallab.json").read_text())
    assert meta["family"] == "hf-causal-lm" and meta["adapter"] and meta["text_format"] == "gruver"
    assert meta["lora"] == {"rank": 8, "alpha": 32.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    assert meta["base"]["path"] == str(hf_model.resolve()) and len(meta["base"]["weights_sha256"]) == 64
    assert (ckpt / "best" / "adapter_model.safetensors").is_file()
    assert not (ckpt / "best" / "model.safetensors").exists()  # the adapter only, not a copy of the base


def test_a_run_samples_the_same_for_a_seed_whatever_the_batch(lora_run):
    m = load_family_model(lora_run / "ckpt" / "best")
    assert m.describe()["adapter"] and m.describe()["step"] == 30
    prompt = build_prompts("NaCl", 4)[0]
    knobs = {**m.default_knobs(), "max_new_tokens": 40}
    a = m.generate(prompt, 3, knobs, seed=5, batch_size=1)
    b = m.generate(prompt, 3, knobs, seed=5, batch_size=3)
    c = m.generate(prompt, 2, knobs, seed=5, batch_size=2, first_index=1)
    assert [x.ids for x in a] == [x.ids for x in b] and [x.ids for x in a[1:]] == [x.ids for x in c]
    assert [x.ids for x in m.generate(prompt, 3, knobs, seed=6)] != [x.ids for x in a]
    assert "The chemical formula is Na4Cl4." in m.tokenizer.decode(a[0].ids)
    assert m.sampling_record(prompt, knobs)["allowed_elements"] == ["Na", "Cl"]


def test_the_element_constraint_allows_only_the_prompts_elements(hf_model):
    m = load_family_model(hf_model)
    tok = m.tokenizer
    prompt_ids = [tok.bos_token_id] + tok("...lattice:\n", add_special_tokens=False)["input_ids"]
    proc = ElementConstraint(tok, len(prompt_ids), ["Na", "Cl"], tok.eos_token_id)
    V = len(tok)

    def allowed(body: str) -> set[str]:
        ids = torch.tensor([prompt_ids + tok(body, add_special_tokens=False)["input_ids"]])
        scores = proc(ids, torch.zeros(1, V))
        return {proc.strings[t] for t in range(V) if scores[0, t] > -float("inf")}

    at_element = allowed("4.1 4.1 4.1\n90 90 90\nNa\n0.00 0.00 0.00\n")
    assert at_element == {"N", "C", "</s>"}  # an element starts, or the crystal ends after a whole atom
    after_n = allowed("4.1 4.1 4.1\n90 90 90\nN")
    assert "a" in after_n and "i" not in after_n and "b" not in after_n
    on_coordinates = allowed("4.1 4.1 4.1\n90 90 90\nNa\n0.00 0.0")
    assert "0" in on_coordinates and "5" in on_coordinates


def test_sample_set_through_the_seam_is_parsed_and_evaluated(lora_run, tmp_path):
    from engine.sample.sample_sets import sample_to_dir

    out = sample_to_dir(lora_run / "ckpt" / "best", build_prompts("NaCl", 4)[0], tmp_path / "set", n=2,
                           max_new_tokens=30, top_p=0.9, seed=1, device="cpu", evaluate=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["checkpoint"]["family"] == "hf-causal-lm"
    assert cfg["sampling"]["text_format"] == "gruver" and cfg["sampling"]["top_p"] == 0.9
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 and (out / "eval.csv").is_file()


def test_a_generated_crystal_string_becomes_a_canonical_cif(hf_model):
    m = load_family_model(hf_model)
    prompt = m.prompt_text(build_prompts("NaCl", 4)[0])
    body = "5.6 5.6 5.6\n90 90 90\nNa\n0.00 0.00 0.00\nNa\n0.50 0.50 0.00\nNa\n0.50 0.00 0.50\nNa\n0.00 0.50 " \
           "0.50\nCl\n0.50 0.50 0.50\nCl\n0.00 0.00 0.50\nCl\n0.00 0.50 0.00\nCl\n0.50 0.00 0.00\n"
    ids = m.tokenizer(prompt + body, add_special_tokens=False)["input_ids"] + [m.tokenizer.eos_token_id]
    gen = m._generation([], ids, True)
    assert gen.finished and gen.text.startswith("data_Na4Cl4\n") and "_symmetry_space_group_name_H-M Fm-3m" in gen.text
    bad = m._generation([], m.tokenizer("4.1 x\n", add_special_tokens=False)["input_ids"], True)
    assert bad.text == "4.1 x\n"  # left as written: post-processing says why it is not a crystal


def test_full_fine_tune_saves_a_whole_model(hf_model, hf_data, tmp_path):
    cfg = load_config(None, [f"dataset={hf_data}", f"hf_model={hf_model}", *TRAIN_ARGS, "max_iters=2",
                             "eval_interval=2", "hf_lora_rank=0", f"out_dir={tmp_path / 'full'}"])
    run = train(cfg, progress=False)
    best = run / "ckpt" / "best"
    assert (best / "model.safetensors").is_file() and not json.loads((best / "crystallab.json").read_text())["adapter"]
    assert load_family_model(best).describe()["n_params"] == load_family_model(hf_model).describe()["n_params"]


def test_bad_inputs_are_one_line_errors_naming_them(hf_model, hf_data, tmp_path, lora_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty} is a folder that is no model"):
        load_family_model(empty)
    with pytest.raises(CheckpointError, match="not a Hugging Face model folder"):
        HFCausalLM.load(empty, "cpu")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_model / f, no_tok / f)
    with pytest.raises(CheckpointError, match=f"{no_tok} has no tokenizer"):
        load_family_model(no_tok)
    with pytest.raises(CheckpointError, match="never downloads.*download it where there is access"):
        load_family_model("meta-llama/Llama-2-7b-hf")
    with pytest.raises(InputError, match="quantize=4: 4-bit loading needs a CUDA GPU"):
        load_base_model(hf_model, torch.device("cpu"), 4)
    with pytest.raises(ConfigError, match="hf_lora_targets 'wq,wv' name no module"):
        train(load_config(None, [f"dataset={hf_data}", f"hf_model={hf_model}", *TRAIN_ARGS, "max_iters=2",
                                 "hf_lora_targets=wq,wv", f"out_dir={tmp_path / 'bad-targets'}"]), progress=False)
    with pytest.raises(ConfigError, match="needs hf_model"):
        load_config(None, ["objective=hf-causal-lm"])
    with pytest.raises(ConfigError, match="init_from must be scratch .* or resume"):
        load_config(None, ["objective=hf-causal-lm", f"hf_model={hf_model}", "init_from=finetune", "init_ckpt=x.pt"])


def test_a_changed_base_model_is_refused(lora_run, hf_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(hf_model, base)
    run_ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_run / "ckpt" / "best", run_ckpt)
    meta = json.loads((run_ckpt / "crystallab.json").read_text())
    meta["base"]["path"] = str(base)
    (run_ckpt / "crystallab.json").write_text(json.dumps(meta))
    assert load_family_model(run_ckpt).describe()["adapter"]
    (base / "config.json").write_text((base / "config.json").read_text().replace('"rms_norm_eps"', '"rms_norm_eps" '))
    with pytest.raises(CheckpointError, match="has changed since training"):
        load_family_model(run_ckpt)


class _StopAfter:
    """A stop flag that trips on its n-th check (the trainer checks once per step)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_an_interrupted_hf_run_resumes_with_the_losses_of_an_uninterrupted_one(mode, hf_model, hf_data, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(tmp_path / "runs"))
    args = [f"dataset={hf_data}", f"hf_model={hf_model}", *TRAIN_ARGS, "max_iters=8", "eval_interval=4",
            "log_interval=1", *(["hf_lora_rank=0"] if mode == "full" else [])]
    full = train(load_config(None, [*args, f"out_dir={tmp_path / 'full'}"]), progress=False)
    part = train(load_config(None, [*args, f"out_dir={tmp_path / 'part'}"]), progress=False, stop_event=_StopAfter(5))
    status = RunFolder(part).read_status()
    assert status["state"] == "stopped" and status["last_ckpt_step"] == 5
    assert (part / "ckpt" / "last" / "trainer_state.pt").is_file()

    assert train(load_config(None, ["init_from=resume", f"out_dir={part}"]), progress=False) == part
    a, b = _losses(full, "train"), _losses(part, "train")
    assert sorted(b) == list(range(1, 9)), "one continuous curve"
    for step in range(6, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert RunFolder(part).read_status()["state"] == "completed"
    meta = json.loads((part / "ckpt" / "last" / "crystallab.json").read_text())
    assert meta["step"] == 8 and meta["adapter"] == (mode == "lora")


def test_resume_of_an_hf_folder_without_trainer_state_is_one_line(lora_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(tmp_path / "runs"))
    run = tmp_path / "old"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("*.lock", "owner*"))
    (run / "ckpt" / "last" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"has no trainer_state.pt .* start a new run") as err:
        train(load_config(None, ["init_from=resume", f"out_dir={run}", "max_iters=40"]), progress=False)
    assert "\n" not in str(err.value)

"""LoRA through peft for the lab's GPT: only adapters train, adapter checkpoints load on their base (sha256 checked),
merged and unmerged models sample the same, ``ckpt merge`` writes a plain checkpoint, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.crystal.prompts import build_prompts
from engine.lab.errors import CheckpointError, ConfigError
from engine.models.checkpoint import checkpoint_info, load_checkpoint, load_model, save_checkpoint
from engine.models.family import load_family_model
from engine.models.gpt import GPT, GPTConfig
from engine.models.lora_checkpoint import merge_checkpoint
from engine.train.config import load_config
from engine.train.lora import LoraSettings, apply_lora, merge_lora
from engine.train.trainer import train

TINY = ["dropout=0.0", "batch_size=4", "eval_iters=2", "warmup_iters=2", "learning_rate=3e-3", "device=cpu",
        "dtype=float32", "cpu_threads=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _base(path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128))
    save_checkpoint(path, model=model, iter_num=100, best_val_loss=None, config={}, meta={})
    return path


@pytest.fixture(scope="module")
def lora_run(nacl10, tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint, LoRA run folder) after 30 steps of LoRA fine-tuning on NaCl."""
    root = tmp_path_factory.mktemp("lora")
    base = _base(root / "base.pt")
    cfg = load_config(None, [f"dataset={nacl10}", *TINY, "init_from=finetune", f"init_ckpt={base}", "block_size=64",
                             "lora_rank=4", "lora_alpha=8", "max_iters=30", "eval_interval=15", "log_interval=5"])
    return base, train(cfg, run_dir=root / "run", progress=False)


def test_lora_finetune_changes_only_adapter_weights_and_reports_trainable_params(lora_run):
    base_path, run = lora_run
    adapter = load_checkpoint(run / "ckpt" / "last.pt")
    assert adapter.iter_num == 30
    assert adapter.state_dict and all(".lora_" in k for k in adapter.state_dict)
    # 2 layers x (c_attn 32->96, attn c_proj 32->32, c_fc 32->128, mlp c_proj 128->32), r=4: A (4 x in) + B (out x 4)
    expected = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert sum(t.numel() for t in adapter.state_dict.values()) == expected
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.state_dict.items() if "lora_B" in k)  # B starts at 0
    lora = adapter.meta["lora"]
    assert lora["rank"] == 4 and lora["base"]["path"] == str(base_path.resolve())
    assert expected < sum(t.numel() for t in load_checkpoint(base_path).state_dict.values()) / 8  # adapters only
    assert f"LoRA: {expected:,} trainable parameters" in (run / "log.txt").read_text()
    # the base weights inside the adapted model are the base file's, untouched
    model, _ = load_model(run / "ckpt" / "last.pt")
    base = load_checkpoint(base_path).state_dict
    got = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    for key, tensor in got.items():
        want = base[key][: tensor.shape[0]] if key == "transformer.wpe.weight" else base[key]  # cropped 128 -> 64
        assert torch.equal(tensor, want), key


def test_merged_and_unmerged_adapters_give_identical_samples(lora_run, tmp_path):
    _, run = lora_run
    merged = merge_checkpoint(run / "ckpt" / "last.pt", tmp_path / "merged.pt")
    (prompt,) = build_prompts("Na2Cl2")
    out = {}
    for name, path in (("unmerged", run / "ckpt" / "last.pt"), ("merged", merged)):
        fam = load_family_model(path)
        greedy = fam.generate(prompt, 2, {**fam.default_knobs(), "temperature": 0.0, "max_new_tokens": 40}, seed=3)
        sampled = fam.generate(prompt, 3, {**fam.default_knobs(), "max_new_tokens": 40}, seed=3)
        out[name] = [g.ids for g in greedy + sampled]
    assert out["merged"] == out["unmerged"]
    # and the adapter matters: the base alone predicts otherwise
    idx = torch.tensor([out["merged"][0]])  # (1, T)
    with torch.no_grad():
        assert not torch.allclose(load_model(lora_run[0])[0](idx)[0], load_model(merged)[0](idx)[0], atol=1e-4)


def test_ckpt_merge_writes_a_plain_checkpoint_the_reader_loads_as_a_gpt(lora_run, tmp_path, capsys):
    _, run = lora_run
    out = tmp_path / "merged.pt"
    assert main(["ckpt", "merge", str(run / "ckpt" / "best.pt"), "--out", str(out)]) == 0
    raw = torch.load(out, weights_only=True)
    assert set(raw) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert not any("lora" in k or "base_layer" in k for k in raw["model"])
    ckpt = load_checkpoint(out)  # strict shape checks of the upstream layout
    assert ckpt.model_args["block_size"] == 64 and "lora" not in ckpt.meta
    assert ckpt.meta["parent"]["lora"]["rank"] == 4
    model = GPT(ckpt.model_config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    assert checkpoint_info(out)["problem"] is None
    assert main(["ckpt", "merge", str(run / "ckpt" / "best.pt"), "--out", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_resume_of_a_lora_run_continues_with_its_adapters(lora_run, tmp_path):
    import shutil

    _, run = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / ".lock").unlink(missing_ok=True)
    path = train(load_config(None, ["init_from=resume", f"out_dir={copy}", "max_iters=36"]), progress=False)
    resumed = load_checkpoint(path / "ckpt" / "last.pt")
    assert resumed.iter_num == 36 and resumed.meta["lora"]["base"] == load_checkpoint(run / "ckpt" / "last.pt"
                                                                                       ).meta["lora"]["base"]
    assert all(".lora_" in k for k in resumed.state_dict)


def test_a_changed_base_is_a_one_line_error(lora_run, tmp_path, capsys):
    import shutil

    base, run = lora_run
    moved = tmp_path / "run"
    shutil.copytree(run / "ckpt", moved)
    saved = base.read_bytes()
    try:
        _base(base)  # same shapes, rewritten: the file's bytes (creation time) differ
        torch.manual_seed(1)
        save_checkpoint(base, model=GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)), iter_num=100,
                        best_val_loss=None, config={}, meta={})
        with pytest.raises(CheckpointError, match="sha256"):
            load_model(moved / "last.pt")
        assert main(["ckpt", "merge", str(moved / "last.pt"), "--out", str(tmp_path / "m.pt")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "restore the original base" in err and "\n" not in err
    finally:
        base.write_bytes(saved)


def test_lora_targets_naming_no_module_and_bad_rank_are_one_line_errors(nacl10, tmp_path, capsys):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    with pytest.raises(ConfigError, match=r"'q_proj' names no module of GPT; choose among .*c_attn"):
        apply_lora(model, LoraSettings(4, 8.0, 0.0, ("c_attn", "q_proj")))
    with pytest.raises(ConfigError, match="lora_rank must be"):
        load_config(None, ["lora_rank=0", "init_from=finetune", "init_ckpt=x.pt"])
    with pytest.raises(ConfigError, match="LoRA adapts a trained model"):
        load_config(None, ["lora_rank=4"])
    base = _base(tmp_path / "base.pt")
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"dataset: {nacl10}\ninit_from: finetune\ninit_ckpt: {base}\nmax_iters: 2\nwarmup_iters: 0\ndevice: cpu\n")
    common = ["train", str(cfg), "--no-progress", "--run-dir", str(tmp_path / "r")]
    assert main([*common, "--set", "lora_rank=4", "--set", "lora_targets=c_attn,q_proj"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's own log lines
    assert last.startswith("error: lora_targets: 'q_proj' names no module of GPT; choose among")
    assert main([*common, "--set", "lora_rank=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lora_rank must be" in err and "\n" not in err


def test_merge_lora_equals_the_adapted_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()
    apply_lora(model, LoraSettings(2, 4.0, 0.0, ("c_attn", "c_fc")))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    idx = torch.randint(0, 371, (2, 16))
    with torch.no_grad():
        before = model(idx)[0]
        after = merge_lora(model)(idx)[0]
    assert torch.allclose(before, after, atol=1e-5)
    assert set(model.state_dict()) == set(GPT(model.config).state_dict())


def test_fine_tuning_from_an_adapter_checkpoint_says_merge_first(lora_run):
    from engine.train.objectives import build_gpt

    _, run = lora_run
    with pytest.raises(ConfigError, match=r"LoRA adapter checkpoint, not a whole model; merge it first"):
        build_gpt(None, load_checkpoint(run / "ckpt" / "last.pt"), print)

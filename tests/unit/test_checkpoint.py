"""Tests for engine.models.checkpoint: upstream compatibility, round trips, refusals with readable reasons, atomic saves."""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.lab.errors import CheckpointError
from engine.models.checkpoint import add_cli, checkpoint_info, load_checkpoint, load_model, save_checkpoint
from engine.models.gpt import GPT, GPTConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


def _model(seed: int = 0, config: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def _logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def _save(path: Path, model: GPT, **kw) -> Path:
    args = dict(model=model, iter_num=7, best_val_loss=1.25, config={"lr": 1e-3}, meta={"run": "r1"})
    return save_checkpoint(path, **{**args, **kw})


def _upstream_checkpoint(path: Path, model: GPT) -> None:
    """What CrystaLLM's train.py writes: compiled-model keys, AdamW state, a loss tensor, no crystallab meta."""
    params = list(model.parameters())
    # AdamW's state-dict layout, built by hand (constructing an optimizer costs seconds of lazy imports)
    optimizer = {
        "state": {i: {"step": torch.tensor(100000.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": p.detach() ** 2}
                  for i, p in enumerate(params)},
        "param_groups": [{"params": list(range(len(params))), "lr": 1e-4, "betas": (0.9, 0.99), "eps": 1e-8,
                          "weight_decay": 0.1, "amsgrad": False, "maximize": False, "foreach": None,
                          "capturable": False, "differentiable": False, "fused": None}],
    }
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {
            "model": state,
            "optimizer": optimizer,
            "model_args": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=371, dropout=0.1),
            "iter_num": 100000,
            "best_val_loss": torch.tensor(0.2853),
            "config": {"dataset": "mp_oqmd_nomad_cifs_semisymm_Z_props_all", "max_iters": 100000},
        },
        path,
    )


def test_upstream_checkpoint_loads_as_is_with_identical_logits(tmp_path):
    model = _model()
    path = tmp_path / "ckpt.pt"
    _upstream_checkpoint(path, model)
    idx = torch.randint(0, 371, (2, 16))
    loaded, ckpt = load_model(path)
    assert torch.equal(_logits(loaded, idx), _logits(model.eval(), idx))
    assert ckpt.is_upstream and ckpt.meta == {}
    assert ckpt.iter_num == 100000
    assert ckpt.best_val_loss == pytest.approx(0.2853)
    assert ckpt.config["max_iters"] == 100000
    assert ckpt.optimizer_state["state"]  # AdamW moments are kept for resuming
    assert not loaded.training and loaded.lm_head.weight is loaded.transformer.wte.weight


def test_stray_mask_buffer_is_dropped(tmp_path):
    model = _model()
    state = model.state_dict()
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    torch.save({"model": state, "model_args": CFG.to_model_args()}, tmp_path / "old.pt")
    loaded, _ = load_model(tmp_path / "old.pt")
    idx = torch.randint(0, 371, (1, 10))
    assert torch.equal(_logits(loaded, idx), _logits(model, idx))


def test_round_trip_keeps_logits_meta_optimizer_and_extra(tmp_path):
    model = _model(1)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    extra = {"scaler": {"scale": np.float32(1024.0)}, "rng": torch.get_rng_state(), "seen": {3, 1}}
    path = _save(
        tmp_path / "run" / "last.pt",
        model,
        optimizer=opt,
        meta={"run": "r1", "data_fingerprint": "abc", "parent": {"path": Path("/x/ckpt.pt"), "step": 100000}},
        extra=extra,
    )
    loaded, ckpt = load_model(path)
    idx = torch.randint(0, 371, (2, 12))
    assert torch.equal(_logits(loaded, idx), _logits(model, idx))
    assert ckpt.iter_num == 7 and ckpt.best_val_loss == 1.25 and ckpt.config == {"lr": 1e-3}
    assert ckpt.meta["run"] == "r1" and ckpt.meta["step"] == 7 and ckpt.meta["data_fingerprint"] == "abc"
    assert ckpt.meta["parent"] == {"path": "/x/ckpt.pt", "step": 100000}  # Path stored as plain str
    assert ckpt.meta["vocab_fingerprint"] and ckpt.meta["created_at"] and ckpt.meta["version"]
    assert ckpt.extra["scaler"] == {"scale": 1024.0} and ckpt.extra["seen"] == [1, 3]
    assert torch.equal(ckpt.extra["rng"], extra["rng"])
    fresh = _model(2).configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    fresh.load_state_dict(ckpt.optimizer_state)  # optimizer state is usable for resuming
    raw = torch.load(path, weights_only=True)  # plain data only: readable without executing code
    assert set(raw) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config", "crystallab"}


def test_compiled_wrapper_is_saved_without_prefix(tmp_path):
    model = _model()

    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule (same attribute)
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    _save(tmp_path / "c.pt", Wrapper(model))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert "transformer.wte.weight" in raw["model"]


def test_vocab_size_mismatch_is_refused_readably(tmp_path):
    model = _model(config=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=372))
    torch.save({"model": model.state_dict(), "model_args": model.config.to_model_args()}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match=r"v\.pt has vocab_size 372 but the CrystaLLM vocabulary has 371"):
        load_model(tmp_path / "v.pt")


def test_vocab_fingerprint_mismatch_is_refused(tmp_path):
    path = _save(tmp_path / "f.pt", _model())
    raw = torch.load(path, weights_only=True)
    raw["crystallab"]["vocab_fingerprint"] = "0" * 64
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="different vocabulary"):
        load_checkpoint(path)
    info = checkpoint_info(path)  # still describable, with the reason
    assert info["vocab_ok"] is False and "different vocabulary" in info["problem"]


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    state = _model().state_dict()
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 32)
    torch.save({"model": state, "model_args": CFG.to_model_args()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "s.pt")
    msg = str(err.value)
    assert "transformer.h.1.mlp.c_fc.weight" in msg and "(64, 32)" in msg and "(128, 32)" in msg


def test_wte_shape_checked_against_model_args(tmp_path):
    state = _model().state_dict()
    args = {**CFG.to_model_args(), "n_embd": 64, "n_head": 1}
    torch.save({"model": state, "model_args": args}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight has shape \(371, 32\).*\(371, 64\)"):
        load_checkpoint(tmp_path / "w.pt")


class _Marker:
    """Unpickling this would create a file: proof that code from the checkpoint ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


class _SystemCall:
    """Unpickling this would run a shell command through os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickled_code_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    state = _model().state_dict()
    torch.save({"model": state, "model_args": CFG.to_model_args(), "config": _Marker(str(marker))}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="contains pickled Python objects .* would execute code") as err:
        load_checkpoint(tmp_path / "e.pt")
    assert "e.pt" in str(err.value) and "weights_only=False" in str(err.value)
    assert "truncated" not in str(err.value) and "Weights only load failed" not in str(err.value)
    assert not marker.exists()


def test_a_blocked_module_call_is_named_as_code_not_as_a_broken_file(tmp_path):
    """torch words a call into a blocked module (os.system) differently from other globals; both are code."""
    marker = tmp_path / "pwned"
    torch.save({"model": _SystemCall(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(err.value)
    assert "would execute code" in message and "system" in message
    assert "truncated" not in message and "`" not in message  # no cut-off torch text (pages render markdown)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_text("data_NaCl\n_cell_length_a 5.6\n"), "is not a PyTorch checkpoint: it is neither"),
        (lambda p: p.write_bytes(bytes(range(7, 200))), "is not a PyTorch checkpoint: it is neither"),
        (lambda p: zipfile.ZipFile(p, "w").close(), "zip archive but not a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: torch.save({"model": {}}, p), "lacks model_args"),
        (lambda p: torch.save({"model_args": CFG.to_model_args()}, p), "lacks model"),
        (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor"),
    ],
    ids=["text", "binary", "foreign-zip", "empty", "no-model-args", "no-model", "bare-tensor"],
)
def test_files_that_are_not_checkpoints_are_refused_by_name(tmp_path, make, expected):
    path = tmp_path / "thing.pt"
    make(path)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "truncated" not in str(err.value)  # whole files: no advice to re-copy them


def test_a_cut_off_checkpoint_is_called_truncated(tmp_path):
    whole = _save(tmp_path / "whole.pt", _model())
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt looks truncated.*no zip central directory.*re-copy"):
        load_checkpoint(cut)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    _save(tmp_path / "last.pt", _model())
    with pytest.raises(CheckpointError, match="is a folder.*last.pt"):
        load_checkpoint(tmp_path)
    run = tmp_path / "run"  # a training run folder: its checkpoints live in ckpt/
    (run / "ckpt").mkdir(parents=True)
    _save(run / "ckpt" / "best.pt", _model())
    with pytest.raises(CheckpointError, match=r"is a folder.*ckpt/best\.pt"):
        load_checkpoint(run)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = _save(tmp_path / "last.pt", _model(0), iter_num=10)
    before = path.read_bytes()

    def torn_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, _model(1), iter_num=20)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).iter_num == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def _ckpt_cli(argv: list[str]) -> int:
    """Run ``crystallab ckpt ...`` through this module's own parser registration."""
    parser = argparse.ArgumentParser(prog="crystallab")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_info_and_cli_inspect(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    _upstream_checkpoint(path, _model())
    info = checkpoint_info(path)
    assert info["step"] == 100000 and info["upstream"] is True and info["vocab_ok"] is True
    assert info["problem"] is None and info["has_optimizer"] is True
    assert info["n_params"] == CFG.num_params(non_embedding=False)
    assert info["size_bytes"] == path.stat().st_size and len(info["sha256"]) == 64
    assert _ckpt_cli(["ckpt", "inspect", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sha256"] == info["sha256"] and printed["model_args"]["n_embd"] == 32
    with pytest.raises(CheckpointError, match="does not exist"):
        _ckpt_cli(["ckpt", "inspect", str(tmp_path / "missing.pt")])


def test_sha256_is_recomputed_when_the_file_changes(tmp_path):
    path = _save(tmp_path / "last.pt", _model(0))
    first = checkpoint_info(path)["sha256"]
    assert checkpoint_info(path)["sha256"] == first
    _save(path, _model(1))
    assert checkpoint_info(path)["sha256"] != first


def _flip_weight_bytes(path: Path, n: int = 1000) -> None:
    """Invert ``n`` bytes inside the largest tensor record of a torch zip checkpoint (the file stays loadable)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        with open(path, "rb") as fh:
            fh.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(fh.read(4), dtype="<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    data = bytearray(path.read_bytes())
    for i in range(start, start + min(n, info.file_size)):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


def test_flipped_weight_bytes_are_reported_by_inspect_and_refused_on_load(tmp_path, capsys):
    path = _save(tmp_path / "last.pt", _model())
    assert checkpoint_info(path)["problem"] is None and len(checkpoint_info(path)["weights_sha256"]) == 64
    _flip_weight_bytes(path)
    info = checkpoint_info(path)
    assert "corrupted" in info["problem"]
    assert _ckpt_cli(["ckpt", "inspect", str(path)]) == 2
    assert "corrupted" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(path)


def test_nan_weights_are_refused_for_sampling_and_reported(tmp_path):
    model = _model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    path = _save(tmp_path / "nan.pt", model)  # saved as is: the digest matches, the values do not
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights \(transformer.h.0.mlp.c_fc.weight\)"):
        load_model(path)
    assert "NaN" in checkpoint_info(path)["problem"]
    upstream = tmp_path / "upstream.pt"
    _upstream_checkpoint(upstream, model)  # no recorded digest: the finiteness check still holds
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(upstream)

"""Masked-diffusion family: the LLaDA loss, AR initialisation, annealed attention, the reverse process, the infill
contract (mask_id, masked_log_probs, fill) and one-line errors for wrong checkpoints and bad knobs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.crystal.prompts import build_prompts
from engine.crystal.tokenizer import encode
from engine.lab.errors import CheckpointError, ConfigError
from engine.models.checkpoint import load_model, save_checkpoint
from engine.models.crystallm import CrystaLLMGPT
from engine.models.diffusion import MaskedDiffusionModel, checkpoint_fields, prompt_positions
from engine.models.diffusion_net import (
    MASK_ID,
    DiffusionGPT,
    LengthModel,
    anneal_ratio,
    annealed_attention_mask,
    masked_diffusion_loss,
)
from engine.models.family import load_family_model, peek_family, resolve_knobs
from engine.models.gpt import GPT, GPTConfig
from engine.sample.diffusion import _guided_logits, commit_counts, denoise, plan_schedule

SHAPE = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96)
LENGTHS = LengthModel(intercept=20.0, per_element=5.0, per_atom=1.0, residual_q95=2.0, mean_tokens=40.0,
                      max_tokens=60, n_cifs=3)


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(SHAPE)


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpt") / "gpt.pt"
    return save_checkpoint(path, model=_gpt(), iter_num=5, best_val_loss=None, config={}, meta={"run": "g"})


def _diff_ckpt(path: Path, variant: str = "direct") -> Path:
    net = DiffusionGPT.from_gpt(_gpt(), variant)
    return save_checkpoint(path, model=net, iter_num=7, best_val_loss=None, config={},
                           meta={"run": "d", **checkpoint_fields(variant, LENGTHS)})


@pytest.fixture(scope="module")
def diff_ckpt(tmp_path_factory) -> Path:
    return _diff_ckpt(tmp_path_factory.mktemp("diff") / "diff.pt")


class _Stub(torch.nn.Module):
    """Uniform logits where the input is the mask, a confidently wrong prediction (id 0) elsewhere."""

    def forward(self, idx, attn_mask=None):
        logits = torch.zeros(*idx.shape, MASK_ID + 1)
        logits[..., 0] = torch.where(idx == MASK_ID, 0.0, 50.0)
        return logits, None


def test_loss_counts_masked_positions_only_weighted_by_one_over_p():
    x = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # (2, 6), no target is id 0
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[:, 0] = True  # the prompt: never masked
    p = torch.tensor([0.25, 0.5])
    loss = masked_diffusion_loss(_Stub(), x, keep=keep, generator=torch.Generator().manual_seed(3),
                                 variant="direct", p=p)
    draws = torch.rand(2, 6, generator=torch.Generator().manual_seed(3))  # the same draws the loss made
    masked = (draws < p[:, None]) & ~keep
    assert masked.any() and (~masked).any()
    # Each masked token: uniform over 371 ids -> CE ln(371), weighted 1/p; unmasked tokens (CE ~ 50) do not count.
    expected = sum(math.log(371) / float(p[b]) for b, t in masked.nonzero().tolist()) / (2 * 6)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_ar_checkpoint_initialises_identical_weights_except_the_mask_row():
    gpt = _gpt()
    net = DiffusionGPT.from_gpt(gpt, "direct")
    a, b = gpt.state_dict(), net.state_dict()
    assert set(a) == set(b)
    for key in a:
        if key in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(b[key][:371], a[key]) and b[key].shape[0] == 372
            assert torch.allclose(b[key][MASK_ID], a[key].mean(0))
        else:
            assert torch.equal(a[key], b[key]), key


def test_annealed_attention_goes_from_causal_to_full():
    g = torch.Generator().manual_seed(0)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(annealed_attention_mask(2, 6, 0.0, g)[:, 0], causal.expand(2, 6, 6))
    half = annealed_attention_mask(200, 6, 0.5, g)  # (200, 1, 6, 6)
    assert bool(half[:, 0][:, causal].all())  # always at least causal
    upper = half[:, 0][:, ~causal].float().mean()
    assert 0.4 < float(upper) < 0.6
    assert annealed_attention_mask(2, 6, 1.0, g) is None  # full bidirectional
    assert [anneal_ratio(s, 100) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert anneal_ratio(0, 0) == 1.0


def test_prompt_positions_cover_the_data_line_and_optionally_the_spacegroup_block():
    text = ("data_Na4Cl4\nloop_\n_atom_type_symbol\nNa 0.9 1.8 1.1\n_symmetry_space_group_name_H-M Fm-3m\n"
            "_cell_length_a 5.0\n\ndata_K1\n")
    ids = torch.tensor([encode(text)])
    nl = [i for i, t in enumerate(ids[0].tolist()) if t == 142]
    line = prompt_positions(ids)[0]
    assert line[: nl[0] + 1].all() and not line[nl[0] + 1 : nl[-2] + 1].any() and line[nl[-2] + 1 :].all()
    block = prompt_positions(ids, through_spacegroup=True)[0]
    hm_end = nl[4]  # the newline ending the space-group line
    assert block[: hm_end + 1].all() and not block[hm_end + 1 : nl[-2] + 1].any()


def test_masked_log_probs_row_i_is_token_i_for_both_variants(tmp_path):
    ids = torch.tensor([encode("data_Na1Cl1\n_cell_length_a 5.0\n")])
    ids[0, 3:6] = MASK_ID
    for variant in ("direct", "shift"):
        model = MaskedDiffusionModel.load(_diff_ckpt(tmp_path / f"{variant}.pt", variant), "cpu")
        out = model.masked_log_probs(ids)
        assert out.shape == (1, ids.shape[1], 371)
        raw = torch.log_softmax(model.network(ids)[0][..., :371], -1)
        at = raw if variant == "direct" else torch.cat([raw[:, :1], raw[:, :-1]], 1)
        assert torch.allclose(out, at, atol=1e-5)
        assert torch.allclose(out.exp().sum(-1), torch.ones(1, ids.shape[1]), atol=1e-4)


def test_schedule_spreads_commits_evenly():
    c = commit_counts(torch.tensor([10, 3]), 4)
    assert c.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]
    assert plan_schedule(40, 64, 0).steps == 40  # never more steps than positions
    p = plan_schedule(40, 16, 10)
    assert (p.n_blocks, p.steps_per_block, p.steps) == (4, 4, 16)


def test_guidance_combines_conditional_and_unconditional_logits(diff_ckpt):
    net = MaskedDiffusionModel.load(diff_ckpt, "cpu").network
    x = torch.tensor([encode("data_Na1Cl1\n")])
    x = torch.cat([x, torch.full((1, 6), MASK_ID)], 1)
    prompt = x != MASK_ID
    cond = net.token_logits(x)
    uncond = net.token_logits(torch.where(prompt, MASK_ID, x))
    assert torch.allclose(_guided_logits(net, x, prompt, 0.0), cond)
    assert torch.allclose(_guided_logits(net, x, prompt, 1.5), uncond + 2.5 * (cond - uncond), atol=1e-5)


def test_greedy_with_steps_equal_to_length_is_deterministic_and_seeds_repeat(diff_ckpt):
    model = MaskedDiffusionModel.load(diff_ckpt, "cpu")
    (prompt,) = build_prompts("Na2Cl2")
    length = model.canvas_length(prompt, 8)
    n_new = length - len(encode(prompt.text))
    greedy = resolve_knobs(MaskedDiffusionModel, {"temperature": 0, "steps": n_new})
    a = model.generate(prompt, 2, greedy, seed=1)
    b = model.generate(prompt, 2, greedy, seed=99)
    assert [g.ids for g in a] == [g.ids for g in b] and a[0].ids == a[1].ids
    hot = resolve_knobs(MaskedDiffusionModel, {"temperature": 1.0, "steps": 8, "top_k": 0})
    c, d = model.generate(prompt, 3, hot, seed=5), model.generate(prompt, 3, hot, seed=5)
    assert [g.ids for g in c] == [g.ids for g in d]
    assert c[0].ids != c[1].ids  # each sample draws from its own stream
    e = model.generate(prompt, 2, hot, seed=5, first_index=1)  # sample i does not depend on the call
    assert [g.ids for g in e] == [g.ids for g in c[1:]]
    rec = model.sampling_record(prompt, hot)
    assert rec["canvas_length"] == length == math.ceil(20 + 5 * 2 + 4 + 2 + 8)
    assert all(t.text.startswith(prompt.text) for t in c)


def test_fill_keeps_unmasked_tokens_and_fills_every_mask(diff_ckpt):
    model = MaskedDiffusionModel.load(diff_ckpt, "cpu")
    ids = encode("data_Na1Cl1\n_cell_length_a 5.0\n")
    holes = list(ids)
    for i in (2, 5, 7):
        holes[i] = model.mask_id
    knobs = {"steps": 3, "temperature": 0.7, "remasking": "random", "cfg_scale": 1.0}
    out = model.fill(holes, knobs, seed=4)
    assert len(out) == len(ids) and MASK_ID not in out
    assert all(out[i] == ids[i] for i in range(len(ids)) if i not in (2, 5, 7))
    assert out == model.fill(holes, knobs, seed=4)


def test_families_load_their_own_checkpoints_and_refuse_the_other(gpt_ckpt, diff_ckpt):
    assert peek_family(diff_ckpt) == "masked-diffusion"
    model = load_family_model(diff_ckpt, "cpu")
    assert isinstance(model, MaskedDiffusionModel) and model.mask_id == MASK_ID
    info = model.describe()
    assert (info["vocab_size"], info["base_vocab_size"], info["variant"], info["step"]) == (372, 371, "direct", 7)
    with pytest.raises(CheckpointError) as err:
        MaskedDiffusionModel.load(gpt_ckpt, "cpu")
    assert str(gpt_ckpt) in str(err.value) and "\n" not in str(err.value) and "crystallm-gpt" in str(err.value)
    for load in (lambda: CrystaLLMGPT.load(diff_ckpt, "cpu"), lambda: load_model(diff_ckpt)):
        with pytest.raises(CheckpointError) as err:
            load()
        assert str(diff_ckpt) in str(err.value) and "\n" not in str(err.value) and "masked-diffusion" in str(err.value)


def test_model_card_and_ckpt_inspect_ask_the_family_not_a_branch(gpt_ckpt, diff_ckpt, capsys):
    from engine.app.dashboard import model_card
    from engine.cli import main

    gpt, diff = model_card(gpt_ckpt), model_card(diff_ckpt)
    assert (gpt["family"], diff["family"]) == ("crystallm-gpt", "masked-diffusion")
    assert gpt["caption"].startswith("step 5 |") and "M parameters" in gpt["caption"]
    assert diff["caption"] == "masked-diffusion model | run d | step 7" and diff["problem"] is None
    assert {k.name for k in diff["knobs"]} >= {"steps", "cfg_scale", "remasking"}
    assert main(["ckpt", "inspect", str(diff_ckpt)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["step"], info["variant"], info["problem"]) == ("masked-diffusion", 7, "direct", None)
    assert len(info["sha256"]) == 64


@pytest.mark.parametrize("given, fragment", [
    ({"steps": 0}, "steps = 0 is outside"),
    ({"steps": -3}, "steps = -3 is outside"),
    ({"cfg_scale": "strong"}, "cfg_scale must be a number"),
    ({"remasking": "lowest"}, "remasking must be one of low_confidence, random"),
])
def test_bad_knobs_are_one_line_errors_naming_the_knob(given, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_knobs(MaskedDiffusionModel, given)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_sequence_log_likelihood_is_a_repeatable_bound(diff_ckpt):
    model = MaskedDiffusionModel.load(diff_ckpt, "cpu")
    text = "data_Na1Cl1\n_cell_length_a 5.0\n"
    (a,), (b,) = model.sequence_log_likelihood([text]), model.sequence_log_likelihood([text])
    assert a == b and a.logp < 0 and a.n_tokens == len(encode(text)) - 1


def test_denoise_leaves_no_mask_with_blocks(diff_ckpt):
    net = MaskedDiffusionModel.load(diff_ckpt, "cpu").network
    canvas = torch.tensor([encode("data_Na1Cl1\n") + [MASK_ID] * 20] * 2)
    out = denoise(net, canvas, steps=6, temperature=0.5, top_k=5, cfg_scale=0.0, remasking="low_confidence",
                  block_length=7, seeds=[1, 2])
    assert not bool((out == MASK_ID).any()) and torch.equal(out[:, :5], canvas[:, :5])


def test_a_sweep_samples_gpt_and_diffusion_checkpoints_side_by_side(gpt_ckpt, diff_ckpt):
    from engine.evaluate.sweep_config import config_from_dict
    from engine.evaluate.sweeps import run_sweep

    cfg = config_from_dict({
        "name": "mix", "checkpoints": {"gpt": str(gpt_ckpt), "diff": str(diff_ckpt)}, "prompts": ["Na2Cl2"],
        "temperatures": [0.8], "top_k": 5, "n": 2, "seeds": 1, "max_new_tokens": 16, "device": "cpu",
        "eval_workers": 1, "knobs": {"steps": 4},
    }, "test")
    out = run_sweep(cfg)
    records = {json.loads(p.read_text())["checkpoint"].get("family", "crystallm-gpt"): json.loads(p.read_text())
               for p in (out / "cells").glob("*/config.json")}
    assert set(records) == {"crystallm-gpt", "masked-diffusion"}
    diff = records["masked-diffusion"]["sampling"]
    assert (diff["steps"], diff["top_k"], diff["temperature"]) == (4, 5, 0.8) and "max_new_tokens" not in diff
    assert (out / "summary.csv").exists()

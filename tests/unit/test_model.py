"""Tests for engine.models.gpt: CrystaLLM-compatible shapes and names, KV-cache decoding, cropping, dropout, optimizer."""

from __future__ import annotations

import pytest
import torch

from engine.lab.errors import ConfigError
from engine.models.gpt import GPT, PRESETS, ContextLengthError, GPTConfig, KVCache, state_dict_shapes

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)


def _model(config: GPTConfig = SMALL, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def _greedy(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> torch.Tensor:
    """Greedy decoding, either recomputing the whole sequence each step or feeding one token to a cache."""
    seq = prompt
    cache = KVCache.for_model(model, prompt.shape[0]) if use_cache else None
    step_input = prompt
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(step_input if use_cache else seq, kv_cache=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            seq = torch.cat([seq, nxt], dim=1)
            step_input = nxt
    return seq


def test_parameter_names_match_crystallm_layout():
    keys = set(_model().state_dict())
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(SMALL.n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected.add(f"transformer.h.{i}.{part}.weight")
    assert keys == expected  # no biases, no attn.bias mask buffer


def test_lm_head_is_tied_to_token_embedding():
    model = _model()
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("bias", [False, True])
def test_config_parameter_count_and_shapes_match_built_model(bias):
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=48, block_size=40, bias=bias)
    model = GPT(cfg)
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in set(model.parameters()))
    assert cfg.num_params(non_embedding=False) == model.num_params(non_embedding=False)
    assert cfg.num_params() == model.num_params() == model.num_params(False) - 40 * 48
    assert state_dict_shapes(cfg) == {k: tuple(t.shape) for k, t in model.state_dict().items()}


def test_published_sizes():
    # Counted from the config (checked against a built model above) so the test needs no 800 MB of weights.
    # CrystaLLM's reported totals (25.9 M, 203.8 M) include the position table; non_embedding leaves it out.
    assert round(PRESETS["small"].num_params(non_embedding=False) / 1e6, 1) == 25.9
    assert round(PRESETS["large"].num_params(non_embedding=False) / 1e6, 1) == 203.8
    assert round(PRESETS["medium"].num_params(non_embedding=False) / 1e6) == 86
    assert PRESETS["small"].num_params() == 25_364_480


def test_model_args_round_trip_and_validation():
    cfg = PRESETS["small"]
    args = cfg.to_model_args()
    assert args == {
        "n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 1024,
        "bias": False, "vocab_size": 371, "dropout": 0.0,
    }  # fmt: skip
    assert GPTConfig.from_model_args({**args, "some_fork_key": 1}) == cfg
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig.from_model_args({"n_layer": 1, "n_head": 3})
    with pytest.raises(ConfigError, match="divisible"):
        GPTConfig(n_layer=1, n_head=3, n_embd=32, block_size=8)


def test_loss_matches_cross_entropy_and_ignores_minus_one():
    model = _model()
    idx = torch.randint(0, 371, (2, 10))
    targets = torch.randint(0, 371, (2, 10))
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 10, 371)
    keep = targets != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    _, no_loss = model(idx)
    assert no_loss is None


def test_kv_cache_incremental_logits_equal_full_forward():
    model = _model()
    idx = torch.randint(0, 371, (3, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.for_model(model, 3)
        # a prefill chunk, a second multi-token chunk (causal within the chunk), then single tokens
        parts = [model(idx[:, :9], kv_cache=cache)[0], model(idx[:, 9:16], kv_cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(16, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_greedy_decode_same_with_and_without_cache():
    model = _model(seed=3)
    prompt = torch.randint(0, 371, (2, 5))
    assert torch.equal(_greedy(model, prompt, 40, True), _greedy(model, prompt, 40, False))


def test_kv_cache_keep_drops_and_reorders_rows():
    model = _model()
    idx = torch.randint(0, 371, (3, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.for_model(model, 3)
        model(idx[:, :8], kv_cache=cache)
        cache.keep([2, 0])  # row 1 finished; rows swap order
        step, _ = model(idx[[2, 0], 8:9], kv_cache=cache)
        cache.keep(torch.tensor([False, True]))
        step2, _ = model(idx[[0], 9:10], kv_cache=cache)
    torch.testing.assert_close(step[:, 0], full[[2, 0], 8], atol=1e-5, rtol=0)
    torch.testing.assert_close(step2[:, 0], full[[0], 9], atol=1e-5, rtol=0)
    cache.reset()
    assert cache.pos == 0 and cache.batch_size == 1


def test_kv_cache_keep_copies_a_prefilled_prompt_into_every_row_and_swaps_rows_in_place():
    model = _model(seed=5)
    prompt = torch.randint(0, 371, (1, 6))
    nxt = torch.randint(0, 371, (3, 2))
    idx = torch.cat([prompt.expand(3, -1), nxt], dim=1)  # (3, 8): one prompt, three continuations
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.for_model(model, 1)
        model(prompt, kv_cache=cache)
        cache.keep([0, 0, 0])  # grows the batch: a new buffer holding the prompt thrice
        step, _ = model(nxt[:, :1], kv_cache=cache)
        cache.keep([1, 0])  # shrinks and swaps within the same buffer
        step2, _ = model(nxt[[1, 0], 1:2], kv_cache=cache)
    torch.testing.assert_close(step[:, 0], full[:, 6], atol=1e-5, rtol=0)
    torch.testing.assert_close(step2[:, 0], full[[1, 0], 7], atol=1e-5, rtol=0)
    assert cache.batch_size == 2


def test_positions_past_block_size_raise_clear_error():
    model = _model()
    with pytest.raises(ContextLengthError, match="context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = KVCache.for_model(model, 1)
    model(torch.zeros(1, 64, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_crop_block_size_keeps_the_first_positions_and_runs():
    model = _model()
    idx = torch.randint(0, 371, (1, 20))
    before, _ = model(idx)
    wpe = model.transformer.wpe.weight[:24].detach().clone()
    model.crop_block_size(24)
    assert model.config.block_size == 24
    assert model.transformer.wpe.weight.shape == (24, 32)
    assert torch.equal(model.transformer.wpe.weight, wpe)
    after, _ = model(idx)
    torch.testing.assert_close(after, before)
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ConfigError):
        model.crop_block_size(100)


def test_dropout_is_off_in_eval_and_on_in_training():
    model = _model(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.5))
    idx = torch.randint(0, 371, (2, 16))
    a, _ = model(idx)
    b, _ = model(idx)
    assert torch.equal(a, b)
    model.train()
    c, _ = model(idx)
    assert not torch.allclose(a, c)
    # attention dropout specifically (the upstream bug): it must be inactive once back in eval mode
    model.eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(attn(x), attn(x))


def test_optimizer_decays_matrices_only():
    model = _model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, bias=True))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params(non_embedding=False)  # tied weight appears once


def test_init_scales_residual_projections():
    model = _model(PRESETS["tiny"])
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * 2) ** 0.5, rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)

"""The CrystaLLM language model: a nanoGPT-style GPT-2 decoder with CrystaLLM's exact parameter names.

Parameter names match CrystaLLM's ``ckpt.pt`` state dicts (``transformer.wte``, ``transformer.h.{i}.attn.c_attn``,
``lm_head`` ...), so published checkpoints load strictly. Differences from upstream, all invisible to the weights:

- attention runs through ``F.scaled_dot_product_attention``; there is no ``attn.bias`` mask buffer, so
  ``crop_block_size`` needs nothing but the position table;
- attention dropout is applied only in training mode (upstream leaves it on while sampling);
- ``forward`` returns logits for every position and accepts a `KVCache` for incremental decoding;
- positions past ``block_size`` raise `ContextLengthError` instead of an index error deep inside an embedding.

Sampling lives in ``engine.sample.sampler``; this file only computes logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.nn import functional as F

from engine.lab.errors import ConfigError, CrystallabError

VOCAB_SIZE = 371
"""Size of CrystaLLM's frozen vocabulary (``engine/resources/crystallm_vocab.json``)."""


class ContextLengthError(CrystallabError, ValueError):
    """A sequence (or a KV cache) would run past the model's context window or the cache's length."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT; the fields and their meaning are those of CrystaLLM's checkpoint ``model_args``."""

    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; ``n_embd / n_head`` is the head dimension (64 in CrystaLLM's models)."""
    n_embd: int
    """Width of the residual stream (embedding size), in channels."""
    block_size: int
    """Context window: the most tokens (prompt + generated) the model can attend over."""
    bias: bool = False
    """Whether Linear and LayerNorm layers carry bias vectors (CrystaLLM: no)."""
    vocab_size: int = VOCAB_SIZE
    """Number of token ids; 371 for the CrystaLLM vocabulary."""
    dropout: float = 0.0
    """Dropout probability (embeddings, attention weights, residual branches); only active in training mode."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "choose n_embd = 64 * n_head for CrystaLLM-style heads"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.n_embd // self.n_head

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count of a `GPT` of this shape, without building it (same convention as `GPT.num_params`)."""
        c = self.n_embd
        linear_bias = 9 * c if self.bias else 0  # c_attn 3C + attn c_proj C + c_fc 4C + mlp c_proj C
        norm = 2 * c if self.bias else c
        per_layer = 12 * c * c + linear_bias + 2 * norm
        n = self.n_layer * per_layer + norm + self.vocab_size * c  # blocks, ln_f, wte (= lm_head)
        return n if non_embedding else n + self.block_size * c

    @classmethod
    def from_model_args(cls, model_args: dict[str, Any]) -> GPTConfig:
        """Build a config from a checkpoint's ``model_args`` dict (CrystaLLM layout).

        Raises:
            ConfigError: a required key is missing or a value is impossible. Unknown keys are ignored because
                upstream forks sometimes add their own.
        """
        known = {f.name for f in fields(cls)}
        required = {"n_layer", "n_head", "n_embd", "block_size"}
        missing = sorted(required - set(model_args))
        if missing:
            raise ConfigError(f"model_args lacks {', '.join(missing)} (found keys: {sorted(model_args)})")
        kwargs = {k: v for k, v in model_args.items() if k in known}
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if k in kwargs and isinstance(kwargs[k], float) and kwargs[k].is_integer():
                kwargs[k] = int(kwargs[k])
        if "bias" in kwargs:
            kwargs["bias"] = bool(kwargs["bias"])
        if "dropout" in kwargs:
            kwargs["dropout"] = float(kwargs["dropout"])
        return cls(**kwargs)

    def to_model_args(self) -> dict[str, Any]:
        """The CrystaLLM ``model_args`` dict: plain Python values only."""
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    # Trains on a laptop CPU in seconds; for tests, smoke runs and the tiny config preset.
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=256),
    # CrystaLLM's published shapes.
    "small": GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=1024),
    "medium": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "large": GPTConfig(n_layer=16, n_head=16, n_embd=1024, block_size=2048),
}


def state_dict_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The keys and tensor shapes of ``GPT(config).state_dict()``, computed without building the model.

    Lets checkpoint loading name the first mismatching tensor before any memory is spent on a model.
    """
    c, v = config.n_embd, config.vocab_size

    def linear(name: str, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (out_f, in_f), **({f"{name}.bias": (out_f,)} if config.bias else {})}

    def norm(name: str) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (c,), **({f"{name}.bias": (c,)} if config.bias else {})}

    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (v, c),
        "transformer.wpe.weight": (config.block_size, c),
    }
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        shapes |= norm(f"{p}.ln_1") | linear(f"{p}.attn.c_attn", 3 * c, c) | linear(f"{p}.attn.c_proj", c, c)
        shapes |= norm(f"{p}.ln_2") | linear(f"{p}.mlp.c_fc", 4 * c, c) | linear(f"{p}.mlp.c_proj", c, 4 * c)
    shapes |= norm("transformer.ln_f")
    shapes["lm_head.weight"] = (v, c)
    return shapes


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding of a batch of sequences.

    All rows share one position counter ``pos`` (the sampler starts every row from the same prompt length).
    ``keep(indices)`` selects/reorders rows so finished sequences can leave the batch.

    Attributes:
        k: Keys, shape (n_layer, B, n_head, max_len, head_dim).
        v: Values, same shape.
        pos: Number of positions already written (the next token's position).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        # Uninitialised on purpose: attention only ever reads positions below `pos`, which were written.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0

    @classmethod
    def for_model(
        cls,
        model: GPT,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache sized for ``model`` (``max_len`` defaults to its block size) on the model's device.

        Pass the compute dtype (e.g. ``torch.bfloat16`` under autocast) to avoid a cast on every step.
        """
        cfg = model.config
        param = next(model.parameters())
        return cls(
            cfg.n_layer,
            batch_size,
            cfg.n_head,
            max_len or cfg.block_size,
            cfg.head_dim,
            device=param.device,
            dtype=dtype or param.dtype,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        """Forget everything cached (the buffers are reused, not reallocated)."""
        self.pos = 0

    def keep(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (ints, in the new order, or a boolean mask over rows).

        Indices may repeat (``keep([0] * B)`` copies a prefilled prompt into B rows). Only the ``pos`` written
        positions are copied; a batch that shrinks is compacted into the leading rows of the same buffers, so
        dropping finished rows allocates nothing beyond the gathered prefix.
        """
        idx = torch.as_tensor(indices, device=self.k.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        n, p = idx.numel(), self.pos
        if n <= self.batch_size:
            k, v = self.k[:, :n], self.v[:, :n]  # views; the gathers below are copies made before writing
        else:
            shape = (self.k.shape[0], n, *self.k.shape[2:])
            k = torch.empty(shape, device=self.k.device, dtype=self.k.dtype)
            v = torch.empty(shape, device=self.v.device, dtype=self.v.dtype)
        k[:, :, :, :p] = self.k[:, idx, :, :p]  # (n_layer, n, nh, pos, hs)
        v[:, :, :, :p] = self.v[:, idx, :, :p]
        self.k, self.v = k, v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys/values (B, n_head, T, head_dim) at ``pos``; return all cached so far.

        ``pos`` is advanced by `GPT.forward` once every layer has written, not here.
        """
        t = k.shape[2]
        end = self.pos + t
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, pos+T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection (``c_attn``) and output ``c_proj``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None or kv_cache.pos == 0:
            if kv_cache is not None:
                kv_cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        else:
            start = kv_cache.pos
            k_all, v_all = kv_cache.update(layer, k, v)  # (B, nh, start+T, hs)
            k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            mask = None
            if T > 1:
                # is_causal aligns the triangle top-left, which is wrong when queries start at `start`:
                # query i (absolute position start+i) may see keys 0..start+i.
                key_pos = torch.arange(start + T, device=x.device)  # (start+T,)
                query_pos = torch.arange(start, start + T, device=x.device)  # (T,)
                mask = key_pos[None, :] <= query_pos[:, None]  # (T, start+T)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: 4x expansion, tanh-approximated GELU, projection back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """GPT-2 style decoder with learned positions and ``lm_head`` tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2 and CrystaLLM
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)."""
        if self.transformer.wte.weight.is_meta:
            return  # a meta model has no storage to fill; its weights arrive via load_state_dict(assign=True)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every given position, and the mean cross-entropy when ``targets`` are given.

        Args:
            idx: Token ids, shape (B, T).
            targets: Next-token ids, shape (B, T); ``-1`` marks positions left out of the loss.
            kv_cache: When given, ``idx`` continues the cached sequences at position ``kv_cache.pos``; its
                keys/values are appended and ``pos`` advances by T.

        Returns:
            ``(logits, loss)``: logits of shape (B, T, vocab_size); loss is a scalar tensor or None.

        Raises:
            ContextLengthError: the positions would pass ``block_size`` or the cache's length.
        """
        B, T = idx.shape
        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            if kv_cache.batch_size != B:
                raise ValueError(f"KV cache holds {kv_cache.batch_size} rows but the batch has {B}")
            if start + T > kv_cache.max_len:
                raise ContextLengthError(
                    f"KV cache of length {kv_cache.max_len} cannot take {T} more tokens at position {start}"
                )
        if start + T > self.config.block_size:
            raise ContextLengthError(
                f"positions {start}..{start + T - 1} exceed the model's context of {self.config.block_size} "
                "tokens: crop the sequence to the last block_size tokens (or use a model with a longer context)"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        if kv_cache is not None:
            kv_cache.pos += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context window (e.g. to fine-tune a 2048 model at 1024) by cropping the position table.

        Raises:
            ConfigError: ``block_size`` is not between 1 and the current block size.
        """
        if not 1 <= block_size <= self.config.block_size:
            raise ConfigError(
                f"cannot crop block_size to {block_size}: it must be between 1 and the model's "
                f"{self.config.block_size}"
            )
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight.detach()[:block_size].clone())
        wpe.num_embeddings = block_size
        self.config = replace(self.config, block_size=block_size)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once).

        As upstream, ``non_embedding`` leaves out the position table ``wpe`` but keeps ``wte``, because ``wte``
        is also the output layer.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) at full context, PaLM appendix B style.

        ``6 N`` for the weight matmuls plus ``12 L H Q T`` for attention scores and their use, with N the
        non-embedding parameter count, L layers, H heads, Q head dim and T the block size. Divide
        tokens/s x this by the device's peak FLOP/s for MFU.
        """
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings only (not on LayerNorm weights or biases).

        Uses the fused CUDA kernel when ``device_type == "cuda"``.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = {}
        if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

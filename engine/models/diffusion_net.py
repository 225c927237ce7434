"""The masked-diffusion network: the lab's GPT with one extra mask token and bidirectional (or annealed) attention.

`DiffusionGPT` subclasses `engine.models.gpt.GPT`, so its parameters keep CrystaLLM's names (an autoregressive
checkpoint's weights copy over one to one) and the trainer, checkpoints and freezing treat it as a GPT. The
differences are all in `DiffusionGPT.forward`:

- the vocabulary is CrystaLLM's 371 ids unchanged plus ``MASK_ID`` = 371 (so ``vocab_size`` = 372); the mask row of
  the tied embedding / output layer is never a prediction (`base_logits` drops it);
- attention is bidirectional, or, while adapting an AR model (DiffuGPT), an annealed mask: causal OR
  Bernoulli(r) with r rising from 0 to 1 (`annealed_attention_mask`);
- the ``shift`` variant keeps the AR meaning of the output head (position i predicts token i + 1);
  `token_logits` realigns it so that row i is always the distribution of token i.

The LLaDA training loss (`masked_diffusion_loss`) and the length statistics (`LengthModel`) live here too, so both
the family (`engine.models.diffusion`) and the trainer's objective (`engine.train.diffusion`) use one definition.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.nn import functional as F

from engine.models.gpt import GPT, VOCAB_SIZE, ContextLengthError, GPTConfig

BASE_VOCAB_SIZE = VOCAB_SIZE
"""CrystaLLM's 371 token ids, unchanged."""
MASK_ID = VOCAB_SIZE
"""Id of the ``<mask>`` token: the first id after the base vocabulary (371)."""
MASK_TOKEN = "<mask>"
VARIANTS = ("direct", "shift")
"""``direct``: position i predicts token i (LLaDA). ``shift``: position i predicts token i + 1 (DiffuGPT)."""
DEFAULT_EPS = 1e-3
"""Smallest mask probability of the LLaDA schedule p = (1 - eps) t + eps."""


class DiffusionGPT(GPT):
    """A GPT that reads ``<mask>`` tokens and attends in both directions.

    Attributes:
        variant: ``"direct"`` or ``"shift"`` (see `VARIANTS`).
    """

    def __init__(self, config: GPTConfig, variant: str = "direct") -> None:
        if config.vocab_size != BASE_VOCAB_SIZE + 1:
            raise ValueError(f"a diffusion network needs vocab_size {BASE_VOCAB_SIZE + 1}, got {config.vocab_size}")
        if variant not in VARIANTS:
            raise ValueError(f"diffusion variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__(config)
        self.variant = variant

    @classmethod
    def from_gpt(cls, gpt: GPT, variant: str) -> DiffusionGPT:
        """A diffusion network with ``gpt``'s weights, one new token row (the mask) appended.

        The mask row is the mean of the existing token rows (a neutral input that starts with an average logit).
        Every other weight is copied exactly.
        """
        shape = replace(gpt.config, vocab_size=BASE_VOCAB_SIZE + 1)
        net = cls(shape, variant)
        state = {k: v.detach().clone() for k, v in gpt.state_dict().items()}
        wte = state["transformer.wte.weight"]  # (371, C)
        state["transformer.wte.weight"] = torch.cat([wte, wte.mean(0, keepdim=True)], 0)  # (372, C)
        state["lm_head.weight"] = state["transformer.wte.weight"]
        net.load_state_dict(state)
        return net

    def forward(  # type: ignore[override]
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: Any = None,
        *,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Logits of every position over all 372 ids, in the network's own alignment (see `token_logits`).

        Args:
            idx: Token ids (B, T), some of them ``MASK_ID``.
            targets, kv_cache: Not supported (a masked model has no next-token loss and no cache); must be None.
            attn_mask: Boolean (T, T) or (B, 1, T, T), True where a query may attend to a key; None: full.

        Returns:
            ``(logits (B, T, 372), None)``.
        """
        if targets is not None or kv_cache is not None:
            raise TypeError("DiffusionGPT has no next-token loss and no KV cache; use masked_diffusion_loss")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ContextLengthError(f"{T} tokens exceed the model's context of {self.config.block_size} tokens")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = x + _attend(block.attn, block.ln_1(x), attn_mask, self.training)  # (B, T, C)
            x = x + block.mlp(block.ln_2(x))  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        return self.lm_head(x), None  # (B, T, V)

    def token_logits(self, idx: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the 371 base ids where row i is the distribution of token i, whatever the variant.

        For ``shift`` the output at i - 1 is moved to row i; row 0 has no left neighbour and keeps the output at
        position 0 (position 0 is a ``data_`` token in every prompt, never masked).
        """
        logits = base_logits(self(idx, attn_mask=attn_mask)[0])  # (B, T, 371)
        if self.variant == "shift":
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # (B, T, 371)
        return logits


def _attend(attn: Any, x: torch.Tensor, mask: torch.Tensor | None, training: bool) -> torch.Tensor:
    """The GPT block's attention (same ``c_attn`` / ``c_proj`` weights) with an explicit mask instead of causal."""
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)  # 3 x (B, T, C)
    q = q.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if training else 0.0)
    y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
    return attn.resid_dropout(attn.c_proj(y))


def base_logits(logits: torch.Tensor) -> torch.Tensor:
    """The base-vocabulary part of (..., 372) logits: the mask id is never predicted."""
    return logits[..., :BASE_VOCAB_SIZE]


def annealed_attention_mask(batch: int, T: int, ratio: float, generator: torch.Generator | None,
                            device: torch.device | str = "cpu") -> torch.Tensor | None:
    """DiffuGPT's annealed attention: causal OR Bernoulli(``ratio``) per (query, key), per sequence.

    Args:
        ratio: r in [0, 1]; 0 is causal, 1 full bidirectional (returned as None, the cheap path).
        generator: CPU generator drawing the Bernoulli entries (reproducible masks).

    Returns:
        Boolean (B, 1, T, T), True where attention is allowed; None when ``ratio >= 1``.
    """
    if ratio >= 1.0:
        return None
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    extra = torch.rand(batch, 1, T, T, generator=generator) < ratio  # (B, 1, T, T)
    return (causal | extra).to(device)


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """r at optimizer step ``step``: linear from 0 to 1 over ``anneal_steps`` (0: bidirectional from the start)."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def mask_probabilities(batch: int, generator: torch.Generator | None, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Per-sequence mask probabilities p = (1 - eps) t + eps with antithetic t_i = (u + i / B) mod 1; (B,)."""
    u = torch.rand((), generator=generator)
    t = (u + torch.arange(batch, dtype=torch.float64) / batch) % 1.0  # (B,)
    return ((1 - eps) * t + eps).float()


def masked_diffusion_loss(network: torch.nn.Module, x: torch.Tensor, *, keep: torch.Tensor | None,
                          generator: torch.Generator | None, variant: str, eps: float = DEFAULT_EPS,
                          p: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """LLaDA's loss: cross-entropy on masked tokens only, each weighted 1/p, summed and divided by B * T.

    In expectation over t it is an upper bound on the negative log-likelihood per token (nats); report it as
    such, never as a perplexity comparable with the AR model's.

    Args:
        network: A `DiffusionGPT` (possibly wrapped by torch.compile / DDP: it is called, not inspected).
        x: Clean token ids (B, T).
        keep: Boolean (B, T), True for tokens never masked (the prompt); None: any token may be masked.
        generator: CPU generator for t and the masks (the same generator state gives the same loss).
        variant: ``direct`` (logit i scores token i) or ``shift`` (logit i - 1 scores token i; token 0 is kept).
        p: Per-sequence mask probabilities (B,) to use instead of drawing them (tests).
        attn_mask: Attention mask passed to the network (annealing); None: bidirectional.
    """
    B, T = x.shape
    if p is None:
        p = mask_probabilities(B, generator, eps)  # (B,)
    p = p.to(x.device)
    draws = torch.rand(B, T, generator=generator).to(x.device)  # (B, T)
    masked = draws < p[:, None]  # (B, T)
    if keep is not None:
        masked &= ~keep
    if variant == "shift":
        masked[:, 0] = False  # no position predicts token 0
    noisy = torch.where(masked, torch.full_like(x, MASK_ID), x)  # (B, T)
    logits = base_logits(network(noisy, attn_mask=attn_mask)[0]).float()  # (B, T, 371)
    if variant == "shift":
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # row i: prediction of token i
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x.reshape(-1), reduction="none").view(B, T)  # (B, T)
    weighted = torch.where(masked, ce / p[:, None], torch.zeros_like(ce))  # (B, T)
    return weighted.sum() / (B * T)


# ----------------------------------------------------------------------------------------------------------------
# Canvas length


@dataclass(frozen=True)
class LengthModel:
    """Tokens per CIF predicted from the prompt's composition, fitted on the training data by least squares.

    tokens ~ intercept + per_element * (number of elements) + per_atom * (atoms in the cell formula).

    Attributes:
        intercept, per_element, per_atom: Fitted coefficients (tokens).
        residual_q95: 95th percentile of (actual - predicted) tokens on the training CIFs.
        mean_tokens: Mean tokens per CIF (the prediction for an unconditional prompt).
        max_tokens: Longest training CIF, in tokens.
        n_cifs: CIFs the fit saw.
    """

    intercept: float
    per_element: float
    per_atom: float
    residual_q95: float
    mean_tokens: float
    max_tokens: int
    n_cifs: int

    def predict(self, counts: dict[str, int] | None) -> float:
        """Expected tokens of a CIF (end included) for a cell composition (element -> atoms); None: unconditional."""
        if not counts:
            return self.mean_tokens
        return self.intercept + self.per_element * len(counts) + self.per_atom * sum(counts.values())

    def canvas_length(self, counts: dict[str, int] | None, margin: int, block_size: int) -> int:
        """Canvas tokens: the prediction plus its 95 % residual plus ``margin``, capped at the context."""
        guess = self.predict(counts) + max(0.0, self.residual_q95) + margin
        return int(max(1, min(block_size, math.ceil(guess))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LengthModel:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def fit(cls, lengths: list[int], n_elements: list[int], n_atoms: list[int]) -> LengthModel:
        """Least-squares fit on per-CIF (tokens, elements, atoms); falls back to the mean when under-determined."""
        y = torch.tensor(lengths, dtype=torch.float64)  # (N,)
        if len(lengths) == 0:
            raise ValueError("no CIFs to fit the length model on")
        X = torch.stack([torch.ones_like(y), torch.tensor(n_elements, dtype=torch.float64),
                         torch.tensor(n_atoms, dtype=torch.float64)], 1)  # (N, 3)
        coef = torch.linalg.lstsq(X, y[:, None], driver="gelsd").solution[:, 0]  # (3,)
        resid = y - X @ coef  # (N,)
        return cls(intercept=float(coef[0]), per_element=float(coef[1]), per_atom=float(coef[2]),
                   residual_q95=float(torch.quantile(resid, 0.95)), mean_tokens=float(y.mean()),
                   max_tokens=int(y.max()), n_cifs=len(lengths))

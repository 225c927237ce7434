"""LLaDA's reverse process for a masked-diffusion network: fill a canvas of masks in a fixed number of steps.

`denoise` takes canvases (B, L) in which some positions are ``MASK_ID`` and returns them with every mask
replaced. Per step, for each masked position of the current block:

- logits over the 371 base ids (row i = token i, whatever the variant); with classifier-free guidance
  (``cfg_scale`` w > 0) the network also runs with the prompt masked and the logits become u + (w + 1)(c - u);
- banned ids (element constraints) and a top-k filter set logits to -inf;
- a candidate token per position by Gumbel-max in float64 at ``temperature`` (0: argmax);
- the k most confident candidates (``low_confidence`` remasking: the model's probability of the candidate;
  ``random``: a uniform draw) are committed and the rest stay masked. The masks of a block are committed over
  that block's steps as evenly as possible (the first steps take the remainder, as LLaDA's
  ``get_num_transfer_tokens``).

Semi-autoregressive blocks (``block_length`` > 0) diffuse the masked positions block by block, left to right,
each block getting an equal share of the steps. Every row draws from its own generator seeded from
``(seed, sample index)`` (`engine.sample.sampler.sample_seed`), so the same seed gives the same samples and sample
i does not depend on the batch it is drawn in (up to batch-shape floating-point rounding). There is no KV cache:
a step costs one full forward pass over the canvas (two with guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.diffusion_net import MASK_ID
from engine.sample.sampler import sample_seed

REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class Schedule:
    """How a canvas is denoised: blocks and steps.

    Attributes:
        n_blocks: Blocks diffused one after another, left to right.
        steps_per_block: Denoising steps in each block (total steps = n_blocks * steps_per_block).
        block_length: Positions per block (the last may be shorter); the whole masked span when one block.
    """

    n_blocks: int
    steps_per_block: int
    block_length: int

    @property
    def steps(self) -> int:
        return self.n_blocks * self.steps_per_block


def plan_schedule(span: int, steps: int, block_length: int) -> Schedule:
    """Blocks and steps for a masked span of ``span`` positions (from the first mask to the last).

    ``block_length`` 0 (or >= span) is one block. ``steps`` is split evenly over the blocks (at least one step
    each) and never exceeds one step per position.
    """
    span = max(1, span)
    length = span if block_length <= 0 or block_length >= span else block_length
    n_blocks = -(-span // length)
    per_block = max(1, min(length, steps // n_blocks))
    return Schedule(n_blocks, per_block, length)


def commit_counts(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step for each row: (B,) masked counts -> (B, steps), summing to the counts."""
    base = n_masked[:, None] // steps  # (B, 1)
    rem = n_masked[:, None] % steps  # (B, 1)
    idx = torch.arange(steps, device=n_masked.device)[None, :]  # (1, S)
    return base + (idx < rem).long()  # (B, S)


@torch.inference_mode()
def denoise(
    network: torch.nn.Module,
    canvas: torch.Tensor,
    *,
    steps: int,
    temperature: float,
    top_k: int | None,
    cfg_scale: float,
    remasking: str,
    block_length: int,
    seeds: list[int],
    prompt: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace every ``MASK_ID`` of ``canvas`` by the reverse process described in the module docstring.

    Args:
        network: A `engine.models.diffusion_net.DiffusionGPT` (eval mode is set here).
        canvas: Token ids (B, L) on the network's device; unmasked positions are kept verbatim.
        steps: Denoising steps in all (split over blocks; see `plan_schedule`).
        temperature: Gumbel-max temperature; 0 is argmax (deterministic).
        top_k: Keep the k most likely ids per position; None or 0: off.
        cfg_scale: Guidance scale w; 0 is off.
        remasking: ``low_confidence`` or ``random``.
        block_length: Semi-autoregressive block length in positions; 0: one block.
        seeds: One generator seed per row (`sample_seed(seed, index)`).
        prompt: Boolean (B, L), the positions masked for the unconditional pass of guidance; None: no guidance.
        banned: Boolean (371,), ids never produced (e.g. elements outside the prompt); None: none.

    Returns:
        (B, L) ids with no mask left.
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    network.eval()
    x = canvas.clone()  # (B, L)
    B, L = x.shape
    device = x.device
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    masked0 = x == MASK_ID  # (B, L)
    if not bool(masked0.any()):
        return x
    pos = torch.arange(L, device=device)
    cols = masked0.any(0).nonzero().flatten()
    first, last = int(cols.min()), int(cols.max())
    plan = plan_schedule(last - first + 1, steps, block_length)
    for b in range(plan.n_blocks):
        lo, hi = first + b * plan.block_length, min(last + 1, first + (b + 1) * plan.block_length)
        in_block = (pos >= lo) & (pos < hi)  # (L,)
        counts = commit_counts(((x == MASK_ID) & in_block).sum(1), plan.steps_per_block)  # (B, S)
        for s in range(plan.steps_per_block):
            masked = (x == MASK_ID) & in_block  # (B, L)
            if not bool(masked.any()):
                break
            logits = _guided_logits(network, x, prompt, cfg_scale).double()  # (B, L, V)
            if banned is not None:
                logits[..., banned.to(device)] = -torch.inf
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # (B, L, 1)
                logits = logits.masked_fill(logits < kth, -torch.inf)
            uniforms = torch.stack([torch.rand(L, logits.size(-1) + 1, generator=g, dtype=torch.float64)
                                    for g in gens]).to(device)  # (B, L, V + 1): V for Gumbel, 1 for random remasking
            if temperature > 0:
                gumbel = -torch.log(-torch.log(uniforms[..., :-1].clamp_min(1e-300)))  # (B, L, V)
                x0 = torch.argmax(logits / temperature + gumbel, dim=-1)  # (B, L)
            else:
                x0 = torch.argmax(logits, dim=-1)  # (B, L)
            if remasking == "low_confidence":
                conf = torch.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]  # (B, L)
            else:
                conf = uniforms[..., -1]  # (B, L)
            conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
            k = counts[:, s]  # (B,)
            order = torch.argsort(conf, dim=-1, descending=True, stable=True)  # (B, L)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, pos.expand(B, L))  # rank of each position by confidence
            commit = masked & (rank < k[:, None])  # (B, L)
            x = torch.where(commit, x0, x)
        # A row whose block still holds masks (fewer steps than positions never happens, but be safe): argmax fill.
        left = (x == MASK_ID) & in_block
        if bool(left.any()):
            x = torch.where(left, _guided_logits(network, x, prompt, cfg_scale).argmax(-1), x)
    return x


def _guided_logits(network: torch.nn.Module, x: torch.Tensor, prompt: torch.Tensor | None,
                   cfg_scale: float) -> torch.Tensor:
    """Float32 base-vocabulary logits (B, L, 371), row i for token i; guided as u + (w + 1)(c - u) when w > 0."""
    cond = network.token_logits(x).float()  # (B, L, V)
    if cfg_scale <= 0 or prompt is None or not bool(prompt.any()):
        return cond
    uncond = network.token_logits(torch.where(prompt, torch.full_like(x, MASK_ID), x)).float()  # (B, L, V)
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def row_seeds(seed: int, first_index: int, n: int) -> list[int]:
    """Generator seeds of samples ``first_index .. first_index + n - 1`` of a run seeded ``seed``."""
    return [sample_seed(seed, first_index + i) for i in range(n)]

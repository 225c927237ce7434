"""The ``masked-diffusion`` training objective (config ``objective: masked-diffusion``): LLaDA's recipe.

Per sequence t ~ U(0, 1) with antithetic sampling, mask probability p = (1 - eps) t + eps, cross-entropy on the
masked positions weighted 1/p and normalised by all positions (`engine.models.diffusion_net.masked_diffusion_loss`):
an upper bound on the NLL in nats per token, logged as ``loss_kind: nll_bound``, never a perplexity.

- The prompt is never masked (the ``data_`` line; with ``diffusion_keep_spacegroup`` the atom-property block and
  the space-group line too), so prompts mean what they mean for the GPT; in a share ``diffusion_prompt_dropout``
  of the sequences it is masked like the rest, which trains the unguided pass of classifier-free guidance.
- A share ``diffusion_random_length`` of training batches is cropped to a random length.
- ``init_from: finetune`` from an autoregressive checkpoint (ours or CrystaLLM's ``ckpt.pt``) copies every weight
  and appends the mask row (`DiffusionGPT.from_gpt`); ``diffusion_variant: shift`` keeps the AR shift and
  ``diffusion_anneal_steps`` anneals attention from causal to bidirectional (DiffuGPT). From scratch, and from a
  diffusion checkpoint (resume, further fine-tuning), too.
- Masks, times and annealed attention are drawn from ``(seed, step, call)``, so a resumed run repeats the losses;
  evaluation batches use fixed masks and full bidirectional attention (what sampling uses).
- The length statistics of the training split (`LengthModel`) go into every checkpoint for the sampler's canvas.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from engine.crystal.prompts import parse_formula_spec
from engine.crystal.tokenizer import decode
from engine.crystal.vocab import NEWLINE_ID
from engine.lab.errors import ConfigError, CrystallabError
from engine.models.diffusion import FAMILY, checkpoint_fields, prompt_positions
from engine.models.diffusion_net import (
    BASE_VOCAB_SIZE,
    DiffusionGPT,
    LengthModel,
    anneal_ratio,
    annealed_attention_mask,
    masked_diffusion_loss,
)
from engine.models.gpt import GPTConfig
from engine.train.batches import derive_seed
from engine.train.objectives import Objective, build_gpt

MIN_CROP = 8
"""Shortest random-length crop, in tokens."""
MAX_LENGTH_CIFS = 20_000
"""Most training CIFs read to fit the length statistics (evenly spaced over the split)."""


class MaskedDiffusionObjective(Objective):
    """LLaDA's masked-diffusion loss on a `DiffusionGPT`."""

    name = "masked-diffusion"
    loss_kind = "nll_bound"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.variant = config.diffusion_variant
        self.lengths: LengthModel | None = None
        self._key: tuple[int, bool] | None = None
        self._calls = 0

    def build(self, config: Any, ckpt: Any | None, info: Callable[..., None]) -> torch.nn.Module:
        self.lengths = length_model(config.dataset)
        info("length statistics from %d training CIFs: tokens = %.1f + %.1f x elements + %.2f x atoms "
             "(95 %% residual %.1f)", self.lengths.n_cifs, self.lengths.intercept, self.lengths.per_element,
             self.lengths.per_atom, self.lengths.residual_q95)
        c = config
        if ckpt is None:
            shape = GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                              bias=c.bias, dropout=c.dropout, vocab_size=BASE_VOCAB_SIZE + 1)
            info("new masked-diffusion network (%s variant)", self.variant)
            return DiffusionGPT(shape, self.variant)
        family = ckpt.meta.get("family") or "crystallm-gpt"
        if family == FAMILY:
            recorded = ckpt.meta.get("diffusion_variant", "direct")
            if recorded != self.variant:
                raise ConfigError(f"{ckpt.path} is a {recorded}-variant diffusion model but the config asks for "
                                  f"diffusion_variant: {self.variant}; set diffusion_variant: {recorded}")
            shape = GPTConfig.from_model_args(ckpt.model_args)
            net = DiffusionGPT(replace(shape, dropout=c.dropout), self.variant)
            net.load_state_dict(ckpt.state_dict)
            if c.block_size < shape.block_size:
                net.crop_block_size(c.block_size)
            return net
        if family != "crystallm-gpt":
            raise CrystallabError(f"{ckpt.path} is a {family} checkpoint; a masked-diffusion run starts from a "
                                  "CrystaLLM GPT checkpoint, a diffusion checkpoint, or from scratch")
        gpt = build_gpt(config, ckpt, info)
        info("initialised from the autoregressive %s: every weight copied, mask row (id %d) added; %s variant%s",
             ckpt.path, BASE_VOCAB_SIZE, self.variant,
             f", attention annealed causal -> bidirectional over {c.diffusion_anneal_steps} steps"
             if c.diffusion_anneal_steps else "")
        return DiffusionGPT.from_gpt(gpt, self.variant)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, step: int, train: bool
             ) -> torch.Tensor:
        c = self.config
        key = (step, train)
        self._calls = self._calls + 1 if key == self._key else 0
        self._key = key
        g = torch.Generator().manual_seed(derive_seed(c.seed, "diffusion", train, step, self._calls))
        B, T = x.shape
        attn = None
        if train:
            if float(torch.rand((), generator=g)) < c.diffusion_random_length and T > MIN_CROP:
                x = x[:, : int(torch.randint(MIN_CROP, T + 1, (), generator=g))]
                T = x.shape[1]
            attn = annealed_attention_mask(B, T, anneal_ratio(step, c.diffusion_anneal_steps), g, x.device)
        keep = prompt_positions(x, through_spacegroup=c.diffusion_keep_spacegroup)  # (B, T)
        if train and c.diffusion_prompt_dropout > 0:
            dropped = (torch.rand(B, generator=g) < c.diffusion_prompt_dropout).to(x.device)  # (B,)
            keep &= ~dropped[:, None]
        return masked_diffusion_loss(model, x, keep=keep, generator=g, variant=self.variant, attn_mask=attn)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {**checkpoint_fields(self.variant, self.lengths), "objective": self.name,
                "diffusion_anneal_steps": self.config.diffusion_anneal_steps}

    def describe(self) -> str:
        return f"{self.name} ({self.variant})"


def length_model(dataset: str) -> LengthModel:
    """Tokens per CIF against the composition on its ``data_`` line, fitted on the dataset's training split."""
    from engine.data.datasets import resolve_dataset_dir
    from engine.data.tokens import cif_lengths, load_token_dataset

    ds = load_token_dataset(resolve_dataset_dir(dataset))
    return fit_lengths(np.asarray(ds.train), ds.train_starts, cif_lengths(ds.train, ds.train_starts))


def fit_lengths(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> LengthModel:
    """`LengthModel.fit` on the CIFs starting at ``starts`` (at most `MAX_LENGTH_CIFS`, evenly spaced)."""
    pick = np.unique(np.linspace(0, len(starts) - 1, min(len(starts), MAX_LENGTH_CIFS)).astype(np.int64))
    toks, n_el, n_at = [], [], []
    for i in pick:
        head = np.asarray(ids[starts[i]: starts[i] + 64])
        end = np.flatnonzero(head == NEWLINE_ID)
        line = decode(head[: end[0]].tolist()) if end.size else ""
        try:
            counts = parse_formula_spec(line[len("data_"):])
        except CrystallabError:
            continue  # a data_ line that is not a composition (hand-made data): no length sample
        if not counts:
            continue
        toks.append(int(lengths[i]))
        n_el.append(len(counts))
        n_at.append(sum(counts.values()))
    if not toks:
        raise ConfigError("no CIF of the training split has a composition on its data_ line, so the canvas "
                          "length cannot be learned; train on canonical CIFs (crystallab data build)")
    return LengthModel.fit(toks, n_el, n_at)


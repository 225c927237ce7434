"""What a training run optimises: the trainer's one seam for model families and training modes.

The trainer (`engine.train.trainer`) owns everything a run shares whatever it trains: the run folder, batches,
schedule, clipping, mixed precision, checkpoints, early stopping, stop/resume. An `Objective` owns what differs:
which network is built (new, or from a checkpoint), the loss of a batch, and what its checkpoints record so the
family can be loaded back. CrystaLLM's next-token objective is `NextTokenObjective`; masked diffusion,
distillation and LoRA are further objectives (or wrappers of one), chosen by `objective_for` from the config, so
the trainer never branches on a family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, Callable

import torch

from engine.lab.errors import ConfigError
from engine.models.gpt import GPT, GPTConfig


class Objective(ABC):
    """One training objective. Subclasses are small; the trainer calls them in this order:

    ``build`` once (before the optimizer exists), then ``loss`` per micro-batch (training, ``train=True``) and per
    evaluation batch (``train=False``, under ``torch.no_grad``), and ``checkpoint_fields`` at every save.
    """

    name: str = "objective"

    @abstractmethod
    def build(self, config: Any, ckpt: Any | None, info: Callable[..., None]) -> torch.nn.Module:
        """The network to train: new (``ckpt`` None) shaped by ``config``, or initialised from ``ckpt``.

        Args:
            config: The run's resolved `TrainConfig`.
            ckpt: A loaded `engine.models.checkpoint.Checkpoint` (fine-tune or resume), or None.
            info: ``info(msg, *args)`` logs on rank 0 (what was built, what was cropped ...).
        """

    @abstractmethod
    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, step: int, train: bool
             ) -> torch.Tensor:
        """Scalar loss of one batch; ``x``/``y`` are the (B, T) input and next-token target windows.

        ``model`` may be wrapped (``torch.compile``, DDP): call it, do not reach into it. ``step`` (the optimizer
        step, or the evaluation batch index) seeds any randomness so resumed runs repeat their losses.
        """

    def checkpoint_fields(self) -> dict[str, Any]:
        """Extra provenance for ``meta.crystallab`` (e.g. ``family``, ``mask_id``) so the family loads back."""
        return {}

    def describe(self) -> str:
        return self.name


class NextTokenObjective(Objective):
    """CrystaLLM's objective: a causal GPT, cross-entropy of every next token (nats per token)."""

    name = "next-token"

    def build(self, config: Any, ckpt: Any | None, info: Callable[..., None]) -> torch.nn.Module:
        return build_gpt(config, ckpt, info)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, step: int, train: bool
             ) -> torch.Tensor:
        return model(x, y)[1]


def build_gpt(config: Any, ckpt: Any | None, info: Callable[..., None]) -> GPT:
    """A `GPT` shaped by ``config`` (new) or by ``ckpt`` (its weights loaded, the position table cropped to
    ``config.block_size`` when that is smaller)."""
    c = config
    if ckpt is None:
        return GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                             bias=c.bias, dropout=c.dropout))
    shape = GPTConfig.from_model_args(ckpt.model_args)
    model = GPT(replace(shape, dropout=c.dropout))
    model.load_state_dict(ckpt.state_dict)
    if c.block_size < shape.block_size:
        # Before the optimizer exists: the cropped table is a new parameter, nothing stale refers to it.
        model.crop_block_size(c.block_size)
        info("cropped the position table from %d to %d tokens", shape.block_size, c.block_size)
    return model


def _distill(config: Any) -> Objective:
    from engine.train.distill import DistillObjective  # late: it imports this module

    return DistillObjective(config)


# Objectives by the config's ``objective`` key; later stages register theirs here (masked diffusion, ...).
OBJECTIVES: dict[str, Callable[[Any], Objective]] = {"next-token": lambda config: NextTokenObjective(),
                                                     "distill": _distill}


def objective_for(config: Any) -> Objective:
    """The objective a config asks for (``objective`` key, default ``next-token``)."""
    name = getattr(config, "objective", None) or "next-token"
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is unknown; choose one of {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](config)

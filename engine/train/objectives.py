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
from pathlib import Path
from typing import Any, Callable

import torch

from engine.lab.errors import ConfigError
from engine.models.checkpoint import require_gpt
from engine.models.gpt import GPT, GPTConfig


class Objective(ABC):
    """One training objective. Subclasses are small; the trainer calls them in this order:

    ``build`` once (before the optimizer exists), then ``loss`` per micro-batch (training, ``train=True``) and per
    evaluation batch (``train=False``, under ``torch.no_grad``), and ``checkpoint_fields`` at every save.
    """

    name: str = "objective"
    loss_kind: str = "nll"
    """What the loss is, recorded next to it in ``metrics.jsonl``: ``nll`` (nats/token) or ``nll_bound`` (an upper
    bound on it, e.g. masked diffusion; never to be read as a perplexity equal to the AR one)."""

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

    def config_problem(self, config: Any) -> str | None:
        """Why ``config`` cannot train this objective (one line), or None; checked when the config is loaded."""
        return None

    def sampler(self, ds: Any, split: str, window: int, batch_size: int, seed: int, starts: Any) -> Any:
        """Where the trainer draws batches of ``split``: anything with ``batch(*key, device=...) -> (x, y)``.

        The default draws token windows of the dataset (`WindowSampler`); an objective whose model reads another
        tokenization (a Hugging Face model) builds its own batches from the dataset's structures.
        """
        from engine.train.batches import WindowSampler

        return WindowSampler(ds.train if split == "train" else ds.val, window, batch_size, seed, starts)

    def save(self, ckpt_dir: Path, name: str, *, model: torch.nn.Module, optimizer: Any, step: int,
             best_val_loss: float | None, config: dict[str, Any], meta: dict[str, Any], extra: dict[str, Any]
             ) -> Path:
        """Write checkpoint ``name`` (``last`` / ``best``) into ``ckpt_dir`` atomically; return its path.

        The default is CrystaLLM's ``NAME.pt`` layout (`engine.models.checkpoint.save_checkpoint`).
        """
        from engine.models.checkpoint import save_checkpoint

        path = ckpt_dir / f"{name}.pt"
        save_checkpoint(path, model=model, optimizer=optimizer, iter_num=step, best_val_loss=best_val_loss,
                        config=config, meta=meta, extra=extra, weights=self.checkpoint_weights(model))
        return path

    def last_checkpoint(self, ckpt_dir: Path) -> Path:
        """Where `save` writes a run's ``last`` checkpoint (what a resume continues from)."""
        return ckpt_dir / "last.pt"

    def load_resume(self, path: Path, mmap: bool = False) -> Any:
        """The ``last`` checkpoint at ``path`` with everything a resume needs: weights (or where they are),
        ``iter_num``, ``best_val_loss``, ``optimizer_state``, ``extra`` (scaler, early-stopping state) and ``meta``.
        ``build`` receives it as ``ckpt``."""
        from engine.models.checkpoint import load_checkpoint

        return load_checkpoint(path, mmap=mmap)

    def checkpoint_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The weights a checkpoint stores; None: the whole state dict (LoRA stores only its adapters)."""
        return None

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
    if ckpt is not None and ckpt.meta.get("lora"):
        raise ConfigError(f"init_ckpt {ckpt.path} is a LoRA adapter checkpoint, not a whole model; merge it first "
                          f"(crystallab ckpt merge {ckpt.path} --out merged.pt) and fine-tune from the merged file")
    if ckpt is None:
        return GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                             bias=c.bias, dropout=c.dropout))
    require_gpt(ckpt, ckpt.path)
    shape = GPTConfig.from_model_args(ckpt.model_args)
    model = GPT(replace(shape, dropout=c.dropout))
    model.load_state_dict(ckpt.state_dict)
    if c.block_size < shape.block_size:
        # Before the optimizer exists: the cropped table is a new parameter, nothing stale refers to it.
        model.crop_block_size(c.block_size)
        info("cropped the position table from %d to %d tokens", shape.block_size, c.block_size)
    return model


def _masked_diffusion(config: Any) -> Objective:
    from engine.train.diffusion import MaskedDiffusionObjective  # lazy: reading a config needs no torch model code

    return MaskedDiffusionObjective(config)


def _hf_objective(config: Any) -> Objective:
    from engine.train.hf_objective import HFObjective  # late: transformers is imported only by HF runs

    return HFObjective(config)


def _distill(config: Any) -> Objective:
    from engine.train.distill import DistillObjective  # late: it imports this module

    return DistillObjective(config)


# Objectives by the config's ``objective`` key; later stages register theirs here.
OBJECTIVES: dict[str, Callable[[Any], Objective]] = {
    "next-token": lambda config: NextTokenObjective(),
    "masked-diffusion": _masked_diffusion,
    "hf-causal-lm": _hf_objective,
    "distill": _distill,
}


def objective_for(config: Any) -> Objective:
    """The objective a config asks for (``objective`` key, default ``next-token``); with ``lora_rank`` set, it is
    wrapped by `engine.train.lora.LoraObjective` (adapters on the network the objective builds)."""
    name = getattr(config, "objective", None) or "next-token"
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is unknown; choose one of {', '.join(sorted(OBJECTIVES))}")
    objective = OBJECTIVES[name](config)
    if getattr(config, "lora_rank", None) is not None:
        from engine.train.lora import LoraObjective

        objective = LoraObjective(objective, config)
    return objective

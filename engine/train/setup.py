"""The parts a training run is assembled from: processes and devices, precision, schedule, freezing, stopping.

Kept apart from `engine.train.trainer` (which wires them into a loop and a run folder) so each can be read and
tested on its own.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.lab.errors import ConfigError
from engine.models.gpt import GPT, GPTConfig
from engine.train.config import ARCH_KEYS, TrainConfig

log = logging.getLogger("engine.train.trainer")

# Keys a resumed run must share with the run it continues, or its batches and parameters would not line up.
RESUME_IDENTITY_KEYS = ("dataset", "seed", "starts_only", *ARCH_KEYS, "bias", "batch_size",
                        "gradient_accumulation_steps", "freeze_embeddings", "train_last_n_layers",
                        "lora_rank", "lora_alpha", "lora_targets")


class StopFlag(Protocol):
    """Anything with ``is_set()``, e.g. a `threading.Event`."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a ``torchrun`` launch (rank 0 of 1 when launched alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(config: TrainConfig, dist: Dist = Dist()) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else MPS, else CPU."""
    name = config.device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and dist.world_size > 1:
        name = f"cuda:{dist.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={config.device!r} but CUDA is not available here; use device: auto or cpu")
    return torch.device(name)


def resolve_dtype(config: TrainConfig, device: torch.device) -> str:
    """``auto``: bfloat16 on CUDA GPUs that support it, float32 elsewhere."""
    if config.dtype == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if config.dtype == "float16" and device.type != "cuda":
        raise ConfigError(f"dtype float16 needs a CUDA device (got {device}); use float32 or bfloat16")
    if config.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use dtype: float16 (with loss scaling) or float32")
    return config.dtype


MAX_TOKENS_PER_STEP = 2**24
"""Most tokens one optimizer step may see (batch_size x block_size x gradient_accumulation_steps): 16.8 M,
five times GPT-3's batch and ten times CrystaLLM small's 1.3 M; beyond it a step takes minutes for no gain."""
MAX_EVAL_TOKENS = 2**28
"""Most tokens one evaluation may read (2 splits x eval_iters x batch_size x block_size): 268 M, forty times
CrystaLLM's own evaluation; beyond it every evaluation takes longer than the training between evaluations."""
ACTIVATION_FLOATS_PER_TOKEN_LAYER = 18
"""Activations kept for the backward pass per token, per layer, in units of n_embd (q, k, v, attention output,
two LayerNorm inputs, the 4x MLP input and GELU output, residuals): a lower bound that ignores allocator slack."""


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a new run can still use on ``device``: free GPU memory (CUDA), available RAM (CPU); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in open("/proc/meminfo", encoding="ascii"):
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None  # MPS shares RAM with the system and reports no free figure


def estimate_memory(config: TrainConfig, dtype: str) -> dict[str, float]:
    """Bytes a training run needs at least: weights, gradients and AdamW state (16 bytes per parameter: float32
    weights, gradients and two moments) plus one micro-batch's activations and logits.

    Returns:
        ``{"params", "state_bytes", "activation_bytes", "total_bytes"}``.
    """
    shape = GPTConfig(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,  # type: ignore[arg-type]
                      block_size=config.block_size, bias=config.bias)  # type: ignore[arg-type]
    params = shape.num_params(non_embedding=False)
    width = 4 if dtype == "float32" else 2
    tokens = config.batch_size * shape.block_size
    activations = tokens * width * (shape.n_layer * ACTIVATION_FLOATS_PER_TOKEN_LAYER * shape.n_embd + 2 * shape.n_embd)
    logits = tokens * shape.vocab_size * 4 * 2  # float32 logits and their gradient
    state = 16 * params
    return {"params": params, "state_bytes": state, "activation_bytes": activations + logits,
            "total_bytes": state + activations + logits}


def check_resources(config: TrainConfig, device: torch.device, dtype: str) -> str:
    """Refuse a run that cannot fit its device or whose steps would not end in reasonable time; return a note.

    Raises:
        ConfigError: too many tokens per step or per evaluation, or more memory than the device has free
            (the message gives the estimate in GB and what to lower).
    """
    c = config
    per_step = c.batch_size * c.block_size * c.gradient_accumulation_steps  # type: ignore[operator]
    if per_step > MAX_TOKENS_PER_STEP:
        raise ConfigError(
            f"batch_size {c.batch_size} x block_size {c.block_size} x gradient_accumulation_steps "
            f"{c.gradient_accumulation_steps} = {per_step:,} tokens per optimizer step exceeds {MAX_TOKENS_PER_STEP:,}; "
            "lower batch_size or gradient_accumulation_steps"
        )
    per_eval = 2 * c.eval_iters * c.batch_size * c.block_size  # type: ignore[operator]
    if per_eval > MAX_EVAL_TOKENS:
        raise ConfigError(
            f"eval_iters {c.eval_iters} x batch_size {c.batch_size} x block_size {c.block_size} x 2 splits = "
            f"{per_eval:,} tokens per evaluation exceeds {MAX_EVAL_TOKENS:,}; lower eval_iters (CrystaLLM: 100 or less)"
        )
    est = estimate_memory(c, dtype)
    need = est["total_bytes"] / 1e9
    free = free_memory_bytes(device)
    detail = (f"about {need:.2f} GB: {est['state_bytes'] / 1e9:.2f} GB of weights, gradients and AdamW state for "
              f"{est['params'] / 1e6:,.1f} M parameters and {est['activation_bytes'] / 1e9:.2f} GB of activations for "
              f"batch_size {c.batch_size} x block_size {c.block_size}")
    if free is not None and est["total_bytes"] > free:
        raise ConfigError(
            f"this run needs {detail}, but {device} has {free / 1e9:.2f} GB free; lower batch_size (and raise "
            "gradient_accumulation_steps to keep the effective batch), block_size, n_layer or n_embd"
        )
    return f"memory: {detail}" + (f" ({free / 1e9:.1f} GB free on {device})" if free is not None else "")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    if not config.decay_lr:
        return config.learning_rate
    end = config.resolved_lr_decay_iters
    min_lr = config.resolved_min_lr
    if step >= end:
        return min_lr
    ratio = (step - config.warmup_iters) / max(1, end - config.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.learning_rate - min_lr)


def apply_freezing(model: GPT, config: TrainConfig) -> str:
    """Freeze what the fine-tuning options ask for; return a one-line summary of what trains."""
    frozen: list[torch.nn.Parameter] = []
    if config.freeze_embeddings or config.train_last_n_layers is not None:
        # wte is tied to lm_head: freezing the token table freezes the output layer as well.
        frozen += [model.transformer.wte.weight, model.transformer.wpe.weight]
    if config.train_last_n_layers is not None:
        blocks = model.transformer.h
        if config.train_last_n_layers > len(blocks):
            raise ConfigError(f"train_last_n_layers={config.train_last_n_layers} but the model has {len(blocks)}")
        for block in list(blocks)[: len(blocks) - config.train_last_n_layers]:
            frozen += list(block.parameters())
    for p in frozen:
        p.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {trainable:,} of {total:,}"


class Tracker:
    """Best validation loss, early stopping and the overfitting warning, across evaluations."""

    def __init__(self, patience: int | None, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.best_step: int | None = None
        self.bad_evals = 0
        self.prev: tuple[float, float] | None = None  # (train, val) at the previous evaluation

    def update(self, step: int, train_loss: float, val_loss: float) -> tuple[bool, bool, str]:
        """Record an evaluation; return (improved, stop early, warning text or "")."""
        improved = val_loss < self.best - self.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = val_loss, step, 0
        else:
            self.bad_evals += 1
        warning = ""
        if self.prev is not None and val_loss > self.prev[1] and train_loss < self.prev[0] and not improved:
            warning = (
                f"overfitting: validation loss rose to {val_loss:.4f} while training loss fell to "
                f"{train_loss:.4f} (best validation {self.best:.4f} at step {self.best_step}); "
                "best.pt keeps the best model"
            )
        self.prev = (train_loss, val_loss)
        stop = self.patience is not None and self.bad_evals >= self.patience
        return improved, stop, warning

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "prev": list(self.prev) if self.prev else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_step = state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.prev = tuple(state["prev"]) if state.get("prev") else None  # type: ignore[assignment]


class StopRequested(KeyboardInterrupt):
    """A stop (SIGINT, SIGTERM or a ``STOP`` file) arrived while the run was being set up: no step to finish.

    A `KeyboardInterrupt` subclass, so code that catches `Exception` does not swallow it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SignalStop:
    """SIGINT / SIGTERM end the run cleanly instead of killing it (main thread only; elsewhere a no-op).

    While ``immediate`` (setup: building the model, opening the data, the step-0 evaluation, which can take
    minutes on a large model) a signal raises `StopRequested` at once, so the run can record ``stopped`` and exit.
    Inside `deferred` (the training loop, status writes) it only sets ``flag``: the loop finishes its step, saves
    ``ckpt/last.pt`` and exits. A second Ctrl-C raises `KeyboardInterrupt` ("now").
    """

    def __init__(self, immediate: bool = False) -> None:
        self.flag = False
        self.reason: str | None = None
        self.immediate = immediate
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.flag and signum == signal.SIGINT and not self.immediate:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.flag, self.reason = True, self.reason or name
        if self.immediate:
            raise StopRequested(name)
        log.warning("received %s: finishing this step, saving ckpt/last.pt and stopping", name)

    @contextmanager
    def deferred(self) -> Iterator[SignalStop]:
        """Inside, a signal only sets ``flag`` (for work that must not be cut short, and the training loop)."""
        before, self.immediate = self.immediate, False
        try:
            yield self
        finally:
            self.immediate = before

    def raise_if_set(self) -> None:
        """Raise `StopRequested` for a signal that arrived inside `deferred`."""
        if self.flag:
            raise StopRequested(self.reason or "a stop request")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

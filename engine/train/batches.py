"""Training and evaluation batches: random token windows, as CrystaLLM, but reproducible and small-data safe.

A batch is ``batch_size`` windows of ``window + 1`` consecutive tokens (inputs and next-token targets). Windows
start at CIF starts (``starts.pkl``) or at any token, and may run across CIF boundaries (no loss masking), as
upstream.

Two differences from upstream matter to users:

- **Stateless randomness.** The windows of training step ``s``, micro-batch ``m`` on rank ``r`` depend only on
  ``(seed, s, m, r)``. Resuming at step ``s`` therefore draws exactly the batches the uninterrupted run would
  have drawn, whatever happened before, with no sampler state to save.
- **Small data.** A split shorter than the context cannot hold a full window (upstream crashed on
  ``len(data) - block_size < 0``); `plan_context` shortens the window to what the data holds and says so.
  Evaluation uses the same windows at every evaluation, so validation losses are comparable step to step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends on ``seed`` and every part (e.g. ``("train", step, micro, rank)``)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


@dataclass(frozen=True)
class ContextPlan:
    """Context lengths chosen for one run from the model's context and the size of each split."""

    model_block_size: int
    """Context of the model that will be trained (may be lower than the config's for scratch runs)."""
    train_window: int
    """Tokens per training window (inputs; targets are shifted by one)."""
    val_window: int
    """Tokens per validation window; 0 when the validation split is too small to evaluate."""
    message: str
    """What was done and why, for the log and ``status.json`` (empty when nothing had to change)."""


def plan_context(block_size: int, n_train: int, n_val: int, *, can_lower_model: bool) -> ContextPlan:
    """Fit the training context to the data.

    Args:
        block_size: The model's context (tokens).
        n_train: Tokens in the training split.
        n_val: Tokens in the validation split.
        can_lower_model: True for a new model: its context is lowered to the training window, so no position
            is left untrained. False when the positions are already trained (fine-tuning, resume): the model
            keeps its context and only the windows are shorter.

    Raises:
        ValueError: the training split has fewer than 2 tokens (nothing to predict).
    """
    if n_train < 2:
        raise ValueError(f"the training split holds {n_train} tokens; at least 2 are needed")
    train_window = min(block_size, n_train - 1)
    val_window = min(train_window, n_val - 1) if n_val >= 2 else 0
    notes = []
    model_block = block_size
    if train_window < block_size:
        if can_lower_model:
            model_block = train_window
            notes.append(
                f"the training split has only {n_train} tokens, fewer than block_size + 1 = {block_size + 1}: "
                f"the context was lowered to {train_window} tokens for this run (the new model's block_size)"
            )
        else:
            notes.append(
                f"the training split has only {n_train} tokens, fewer than block_size + 1 = {block_size + 1}: "
                f"training windows are {train_window} tokens; the model keeps its context of {block_size}"
            )
    if n_val < 2:
        notes.append("the validation split is empty: no validation loss, early stopping and best.pt are off")
    elif val_window < train_window:
        notes.append(f"the validation split has only {n_val} tokens: validation windows are {val_window} tokens")
    return ContextPlan(model_block, train_window, val_window, "; ".join(notes))


class WindowSampler:
    """Windows of ``window + 1`` tokens from one split of a token dataset."""

    def __init__(
        self,
        data: np.ndarray,
        window: int,
        batch_size: int,
        seed: int,
        starts: np.ndarray | None = None,
    ) -> None:
        """
        Args:
            data: The split's token ids (``uint16`` memmap).
            window: Input tokens per window (``<= len(data) - 1``).
            batch_size: Windows per batch.
            seed: Run seed; each batch derives its own generator from it.
            starts: Offsets where CIFs begin; when given, windows only start there.
        """
        if not 1 <= window <= len(data) - 1:
            raise ValueError(f"window {window} does not fit a split of {len(data)} tokens")
        self.data = data
        self.window = window
        self.batch_size = batch_size
        self.seed = seed
        last = len(data) - window - 1  # the last offset whose window + target fits
        if starts is not None:
            starts = np.asarray(starts, dtype=np.int64)
            starts = starts[(starts >= 0) & (starts <= last)]
        if starts is not None and len(starts) == 0:
            starts = None  # no CIF start leaves room for a window (tiny split): any offset will do
        self.starts = starts
        self.n_offsets = len(starts) if starts is not None else last + 1

    def offsets(self, *key: object) -> np.ndarray:
        """The ``batch_size`` window offsets for ``key`` (e.g. ``("train", step, micro, rank)``)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, *key))
        ix = torch.randint(self.n_offsets, (self.batch_size,), generator=g).numpy()
        return self.starts[ix] if self.starts is not None else ix

    def batch(self, *key: object, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (batch_size, window) int64 on ``device``."""
        rows = np.stack([np.asarray(self.data[i : i + self.window + 1], dtype=np.int64) for i in self.offsets(*key)])
        xy = torch.from_numpy(rows)  # (B, T + 1)
        if torch.device(device).type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        else:
            xy = xy.to(device)
        return xy[:, :-1], xy[:, 1:]  # (B, T), (B, T)

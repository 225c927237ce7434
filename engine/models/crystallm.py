"""CrystaLLM's autoregressive GPT as a model family (`engine.models.family`): the first family behind the seam.

The network is `engine.models.gpt.GPT`, checkpoints are CrystaLLM's ``ckpt.pt`` layout
(`engine.models.checkpoint`), and decoding is the batched KV-cache sampler (`engine.sample.sampler.generate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from engine.crystal.tokenizer import encode
from engine.crystal.vocab import VOCAB_SIZE
from engine.models.family import FamilyModel, Generation, Knob, SequenceScore, register_family


@register_family
class CrystaLLMGPT(FamilyModel):
    """A loaded CrystaLLM-style GPT (ours or upstream's ``ckpt.pt``)."""

    family = "crystallm-gpt"
    text_format = "crystallm-cif"
    knobs = (
        Knob("temperature", 0.8, "float", 0.0, 10.0, "softmax temperature; 0 decodes greedily"),
        Knob("top_k", 10, "int", 0, VOCAB_SIZE, "keep the k most likely tokens; 0 = off", none_ok=True),
        Knob("top_p", 1.0, "float", 1e-6, 1.0, "nucleus filter: smallest set reaching this mass; 1 = off"),
        Knob("max_new_tokens", 3000, "int", 1, 100_000, "token budget per sample; a longer text is 'truncated'"),
        Knob("constrain", True, "bool", help="restrict element tokens to the prompt's elements and the token "
             "after the space-group tag to space-group symbols"),
    )

    def __init__(self, network: Any, checkpoint: Any, path: Path | None, device: torch.device) -> None:
        self.network = network
        """The `engine.models.gpt.GPT` module (eval mode, on ``device``)."""
        self.checkpoint = checkpoint
        """The `engine.models.checkpoint.Checkpoint` it came from (weights already moved into ``network``)."""
        self.path = path
        self._device = device

    @classmethod
    def load(cls, path: Path, device: Any) -> "CrystaLLMGPT":
        from engine.models.checkpoint import load_model

        dev = torch.device(device)
        network, ckpt = load_model(path, dev)
        return cls(network, ckpt, Path(path), dev)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def block_size(self) -> int:
        return int(self.network.config.block_size)

    def generate(
        self,
        prompt: Any,
        n: int,
        knobs: Mapping[str, Any],
        *,
        seed: int = 1337,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        first_index: int = 0,
    ) -> list[Generation]:
        from engine.sample.sampler import generate

        k = self.sampling_record(prompt, knobs)
        return generate(
            self.network, encode(prompt.text), n=n, temperature=k["temperature"], top_k=k["top_k"],
            top_p=k["top_p"], max_new_tokens=k["max_new_tokens"], seed=seed, batch_size=batch_size,
            allowed_elements=k["allowed_elements"], constrain_spacegroup=k["constrain_spacegroup"],
            device=self._device, progress=progress, first_index=first_index,
        )

    def sampling_record(self, prompt: Any, knobs: Mapping[str, Any]) -> dict[str, Any]:
        """The knobs, and what the decoder applies: allowed elements (the prompt's, when constrained), the
        space-group constraint and the KV cache."""
        k = {**self.default_knobs(), **knobs}
        k["allowed_elements"] = (prompt.elements or None) if k["constrain"] else None
        k["constrain_spacegroup"] = bool(k["constrain"])
        k["use_cache"] = True
        return k

    @torch.inference_mode()
    def sequence_log_likelihood(self, texts: Sequence[str]) -> list[SequenceScore]:
        """Sum of next-token log-probabilities of each text (its first token conditions the rest).

        Texts longer than the context are scored with a sliding window: each token is scored once, with at least
        half a context of history.
        """
        was_training = self.network.training
        self.network.eval()
        try:
            return [self._score(encode(t)) for t in texts]
        finally:
            self.network.train(was_training)

    def _score(self, ids: list[int]) -> SequenceScore:
        if len(ids) < 2:
            return SequenceScore(0.0, 0)
        block = self.block_size
        seq = torch.tensor(ids, dtype=torch.long, device=self._device)
        total, scored, start = 0.0, 1, 0  # `scored`: targets up to this position are already counted
        while scored < len(ids):
            window = seq[start : start + block + 1]  # (<= block + 1,)
            logits, _ = self.network(window[None, :-1])  # (1, T, V)
            logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
            targets = window[1:]  # (T,)
            picked = logp.gather(-1, targets[:, None])[:, 0]  # (T,)
            first = scored - (start + 1)  # skip targets an earlier window scored
            total += float(picked[first:].sum())
            scored = start + len(window)
            start = max(start + 1, scored - 1 - block // 2)
        return SequenceScore(total, len(ids) - 1)

    @torch.no_grad()
    def token_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, 371) of token ids ``idx`` (B, T), float32, in eval mode (no dropout)."""
        was_training = self.network.training
        self.network.eval()
        try:
            logits, _ = self.network(idx.to(self._device))  # (B, T, V)
        finally:
            self.network.train(was_training)
        return logits.float()

    def training_loss(self, batch: Any) -> torch.Tensor:
        """Mean next-token cross-entropy of ``batch = (x, y)``, LongTensors (B, T); ``y == -1`` is ignored."""
        x, y = batch
        _, loss = self.network(x, y)
        return loss

    def describe(self) -> dict[str, Any]:
        cfg = self.network.config
        return {
            "family": self.family,
            "text_format": self.text_format,
            "path": str(self.path) if self.path else None,
            "n_params": self.network.num_params(non_embedding=False),
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "block_size": cfg.block_size,
            "vocab_size": cfg.vocab_size,
            "step": self.checkpoint.iter_num if self.checkpoint is not None else None,
            "run": self.checkpoint.meta.get("run") if self.checkpoint is not None else None,
            "upstream": self.checkpoint.is_upstream if self.checkpoint is not None else None,
            "knobs": self.default_knobs(),
        }

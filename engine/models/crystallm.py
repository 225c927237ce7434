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
    def checkpoint_card(cls, path: Path) -> dict[str, Any]:
        """`engine.models.checkpoint.checkpoint_info`: identity, shape, step, vocabulary check, provenance."""
        from engine.models.checkpoint import checkpoint_info

        info = checkpoint_info(path)
        best = info["best_val_loss"]
        caption = (f"step {info['step']:,} | {info['n_params'] / 1e6:.2f} M parameters | context "
                   f"{info['model_args'].get('block_size')} | best val loss "
                   f"{'-' if best is None else format(best, '.4f')}"
                   + (" | CrystaLLM checkpoint" if info["upstream"] else ""))
        return {"info": {"family": cls.family, **info}, "problem": info["problem"], "caption": caption}

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

    # -- token-level decoding (the capability scored decoding, `engine.sample.mcts`, looks for) ---------------
    def prompt_ids(self, prompt: Any) -> list[int]:
        """The prompt's token ids."""
        return encode(prompt.text)

    def decode_ids(self, ids: Sequence[int]) -> str:
        """Text of token ids (prompt included)."""
        from engine.crystal.tokenizer import decode

        return decode(ids)

    @torch.inference_mode()
    def next_token_logits(self, ids: Sequence[int], prompt: Any, knobs: Mapping[str, Any]) -> torch.Tensor:
        """Logits (V,) float32 on the CPU of the token after ``ids``, the grammar's forbidden tokens at -inf
        (the constraints `generate` applies under the same knobs)."""
        from engine.sample.sampler import grammar_mask

        k = self.sampling_record(prompt, knobs)
        was_training = self.network.training
        self.network.eval()
        try:
            block = self.block_size
            x = torch.tensor(list(ids)[-block:], dtype=torch.long, device=self._device)[None]  # (1, T)
            logits = self.network(x)[0][:, -1].float()  # (1, V)
        finally:
            self.network.train(was_training)
        masked = grammar_mask(list(ids), logits, k["allowed_elements"], k["constrain_spacegroup"])  # (1, V)
        return masked[0].cpu()

    def continue_ids(self, ids: Sequence[int], n: int, prompt: Any, knobs: Mapping[str, Any], *, seed: int,
                     first_index: int, max_new_tokens: int) -> list[Generation]:
        """``n`` continuations of ``ids`` decoded together (one prefill, KV cache), sample ``i`` drawn from the
        random stream ``first_index + i`` of ``seed``; at most ``max_new_tokens`` new tokens each."""
        from engine.sample.sampler import generate

        k = self.sampling_record(prompt, knobs)
        return generate(
            self.network, list(ids), n=n, temperature=k["temperature"], top_k=k["top_k"], top_p=k["top_p"],
            max_new_tokens=max_new_tokens, seed=seed, batch_size=n, allowed_elements=k["allowed_elements"],
            constrain_spacegroup=k["constrain_spacegroup"], device=self._device, first_index=first_index,
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
    def sequence_log_likelihood(self, texts: Sequence[str], batch_size: int = 32) -> list[SequenceScore]:
        """Sum of next-token log-probabilities of each text (its first token conditions the rest).

        Texts longer than the context are scored with a sliding window: each token is scored once, with at least
        half a context of history. Texts of equal token length share their windows and are scored together, up
        to ``batch_size`` at a time (infill ranks dozens of same-length rewrites of one CIF).
        """
        was_training = self.network.training
        self.network.eval()
        try:
            encoded = [encode(t) for t in texts]
            out: list[SequenceScore | None] = [None] * len(texts)
            by_length: dict[int, list[int]] = {}
            for i, ids in enumerate(encoded):
                by_length.setdefault(len(ids), []).append(i)
            for members in by_length.values():
                for a in range(0, len(members), batch_size):
                    chunk = members[a:a + batch_size]
                    for i, score in zip(chunk, self._score([encoded[i] for i in chunk])):
                        out[i] = score
            return out
        finally:
            self.network.train(was_training)

    def _score(self, batch: list[list[int]]) -> list[SequenceScore]:
        """Scores of texts of one token length, computed together."""
        n = len(batch[0])
        if n < 2:
            return [SequenceScore(0.0, 0) for _ in batch]
        block = self.block_size
        seq = torch.tensor(batch, dtype=torch.long, device=self._device)  # (B, n)
        total = torch.zeros(len(batch), dtype=torch.float64, device=self._device)  # (B,)
        scored, start = 1, 0  # `scored`: targets up to this position are already counted
        while scored < n:
            window = seq[:, start : start + block + 1]  # (B, <= block + 1)
            logits, _ = self.network(window[:, :-1])  # (B, T, V)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            picked = logp.gather(-1, window[:, 1:, None])[..., 0]  # (B, T)
            first = scored - (start + 1)  # skip targets an earlier window scored
            total += picked[:, first:].double().sum(dim=1)
            scored = start + window.shape[1]
            start = max(start + 1, scored - 1 - block // 2)
        return [SequenceScore(float(t), n - 1) for t in total.tolist()]

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

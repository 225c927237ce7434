"""The masked-diffusion family (`engine.models.family`): a LLaDA-style model over CrystaLLM's CIF tokens.

The network is `engine.models.diffusion_net.DiffusionGPT` (the lab's GPT, bidirectional, plus a ``<mask>`` id);
checkpoints are the lab's ``ckpt.pt`` layout with ``crystallab.family = "masked-diffusion"``, the mask id, the
base vocabulary size, the variant (``direct`` / ``shift``) and the length statistics of the training data.
Training is the ``masked-diffusion`` objective (`engine.train.diffusion`); decoding is LLaDA's reverse process
(`engine.sample.diffusion`).

Generation starts from the prompt followed by masks on a fixed-length canvas. Its length is predicted from the
prompt's composition with the training data's statistics (`LengthModel`), plus ``length_margin``; the text is
trimmed at the CIF end (the first blank line after the prompt) and `sampling_record` says which length was used.

For the infill tools: `MaskedDiffusionModel.mask_id`, `MaskedDiffusionModel.masked_log_probs` and
`MaskedDiffusionModel.fill`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from engine.crystal.prompts import parse_formula_spec
from engine.crystal.tokenizer import decode, encode
from engine.crystal.vocab import DATA_ID, ELEMENTS, NEWLINE_ID, STOI
from engine.lab.errors import CheckpointError
from engine.models.diffusion_net import (
    BASE_VOCAB_SIZE,
    MASK_ID,
    MASK_TOKEN,
    VARIANTS,
    DiffusionGPT,
    LengthModel,
    mask_probabilities,
)
from engine.models.family import FamilyModel, Generation, Knob, SequenceScore, register_family
from engine.models.gpt import ContextLengthError

FAMILY = "masked-diffusion"
HM_ID = STOI["_symmetry_space_group_name_H-M"]
ELBO_DRAWS = 16
"""Mask draws per text in `MaskedDiffusionModel.sequence_log_likelihood` (its Monte-Carlo estimate)."""


def checkpoint_fields(variant: str, lengths: LengthModel | None) -> dict[str, Any]:
    """What a diffusion checkpoint records in ``meta.crystallab`` so this family loads it back."""
    return {"family": FAMILY, "mask_id": MASK_ID, "base_vocab_size": BASE_VOCAB_SIZE, "added_tokens": [MASK_TOKEN],
            "diffusion_variant": variant, "length_stats": lengths.to_dict() if lengths else None}


def prompt_positions(ids: torch.Tensor, *, through_spacegroup: bool = False) -> torch.Tensor:
    """Boolean (B, T): the prompt part of each CIF in a row of tokens (rows may hold several CIFs or parts).

    The ``data_`` line (from its ``data_`` token through its newline); with ``through_spacegroup`` every line
    from the ``data_`` line through the next ``_symmetry_space_group_name_H-M`` line (the atom-property block and
    the space-group line, which a space-group prompt gives).
    """
    B, T = ids.shape
    is_nl = (ids == NEWLINE_ID).long()  # (B, T)
    line_no = torch.cumsum(is_nl, 1) - is_nl  # (B, T): a newline belongs to the line it ends
    lines = torch.arange(T, device=ids.device).expand(B, T)  # (B, NL) line indices (at most T lines)
    has_data = torch.zeros(B, T, dtype=torch.long, device=ids.device).scatter_add_(
        1, line_no, (ids == DATA_ID).long()) > 0  # (B, NL)
    if not through_spacegroup:
        region = has_data
    else:
        has_hm = torch.zeros(B, T, dtype=torch.long, device=ids.device).scatter_add_(
            1, line_no, (ids == HM_ID).long()) > 0  # (B, NL)
        last_data = torch.cummax(torch.where(has_data, lines, -1), 1).values  # (B, NL)
        last_hm = torch.cummax(torch.where(has_hm, lines, -1), 1).values  # (B, NL)
        hm_before = torch.cat([torch.full_like(last_hm[:, :1], -1), last_hm[:, :-1]], 1)  # (B, NL): HM line < L
        region = (last_data >= 0) & (hm_before < last_data)  # (B, NL)
    return region.gather(1, line_no)  # (B, T)


@register_family
class MaskedDiffusionModel(FamilyModel):
    """A loaded masked-diffusion CIF model."""

    family = FAMILY
    text_format = "crystallm-cif"
    knobs = (
        Knob("steps", 64, "int", 1, 8192, "denoising steps; best quality at one step per canvas token"),
        Knob("temperature", 0.8, "float", 0.0, 10.0, "Gumbel-max temperature; 0 decodes greedily"),
        Knob("top_k", 8, "int", 0, BASE_VOCAB_SIZE, "keep the k most likely tokens per position; 0 = off",
             none_ok=True),
        Knob("cfg_scale", 0.0, "float", 0.0, 100.0, "classifier-free guidance w: u + (w + 1)(c - u); 0 = off"),
        Knob("remasking", "low_confidence", "choice", choices=("low_confidence", "random"), help="which predictions are committed each step: "
             "low_confidence (most confident first) or random"),
        Knob("block_length", 0, "int", 0, 8192, "semi-autoregressive block length in tokens; 0 = one block"),
        Knob("length_margin", 8, "int", 0, 8192, "tokens added to the predicted CIF length for the canvas"),
        Knob("constrain", True, "bool", help="never produce element tokens outside the prompt's composition"),
    )

    def __init__(self, network: DiffusionGPT, checkpoint: Any, path: Path | None, device: torch.device) -> None:
        self.network = network
        """The `DiffusionGPT` (eval mode, on ``device``)."""
        self.checkpoint = checkpoint
        self.path = path
        self._device = device
        meta = checkpoint.meta if checkpoint is not None else {}
        stats = meta.get("length_stats")
        self.lengths: LengthModel | None = LengthModel.from_dict(stats) if stats else None
        """Length statistics of the training data (None: the canvas is the whole context)."""

    # --- the contract the infill tools use ---
    mask_id: int = MASK_ID
    """Id of the ``<mask>`` token (371, right after CrystaLLM's base vocabulary)."""

    @torch.inference_mode()
    def masked_log_probs(self, ids: torch.LongTensor) -> torch.Tensor:
        """Log-probabilities of every position's token given a partly masked canvas.

        Args:
            ids: (B, T) token ids, some of them `mask_id`; T at most the context (``block_size``).

        Returns:
            (B, T, 371) float32 log-probabilities over the base vocabulary (the mask id excluded); row i is the
            distribution of token i for either variant (the ``shift`` variant is realigned here).

        Raises:
            ContextLengthError: T exceeds the context.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self._device)
        self._check_length(ids.shape[-1])
        self.network.eval()
        return torch.log_softmax(self.network.token_logits(ids).float(), dim=-1)

    def fill(self, ids: list[int], knobs: Mapping[str, Any], seed: int) -> list[int]:
        """Denoise every `mask_id` of a fixed-length canvas with the reverse process `generate` uses.

        Args:
            ids: Token ids (length at most ``block_size``), some of them `mask_id`; others are kept verbatim.
            knobs: This family's knobs (missing ones take their defaults; checked as `resolve_knobs` does).
                ``length_margin`` and ``constrain`` do not apply (the canvas length is given).
            seed: Seed of the draw (same seed, same result).

        Returns:
            The canvas with no mask left, same length.

        Raises:
            ConfigError: a bad knob value. ContextLengthError: the canvas exceeds the context.
        """
        from engine.models.family import resolve_knobs
        from engine.sample.diffusion import denoise, row_seeds

        k = resolve_knobs(type(self), knobs)
        self._check_length(len(ids))
        canvas = torch.tensor([list(ids)], dtype=torch.long, device=self._device)  # (1, L)
        out = denoise(self.network, canvas, steps=k["steps"], temperature=k["temperature"], top_k=k["top_k"],
                      cfg_scale=k["cfg_scale"], remasking=k["remasking"], block_length=k["block_length"],
                      seeds=row_seeds(seed, 0, 1), prompt=prompt_positions(canvas) & (canvas != MASK_ID))
        return out[0].tolist()

    # --- FamilyModel ---
    @classmethod
    def load(cls, path: Path, device: Any) -> MaskedDiffusionModel:
        from engine.models.checkpoint import load_checkpoint

        path = Path(path)
        ckpt = load_checkpoint(path, mmap=True)
        family = ckpt.meta.get("family") or "crystallm-gpt"
        if family != FAMILY:
            raise CheckpointError(
                f"{path} is a {family} checkpoint, not a {FAMILY} one: train one with objective: masked-diffusion "
                f"(init_from: finetune, init_ckpt: {path.name} converts it), or load this file as its own family"
            )
        variant = ckpt.meta.get("diffusion_variant", "direct")
        if ckpt.meta.get("mask_id") != MASK_ID or variant not in VARIANTS:
            raise CheckpointError(f"{path} records mask_id {ckpt.meta.get('mask_id')!r} and variant {variant!r}; "
                                  f"this lab reads mask_id {MASK_ID} and variants {', '.join(VARIANTS)}")
        dev = torch.device(device)
        network = DiffusionGPT(ckpt.model_config, variant)
        network.load_state_dict(ckpt.state_dict, strict=True)
        ckpt.state_dict = {}
        network.to(dev).eval()
        return cls(network, ckpt, path, dev)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def block_size(self) -> int:
        return int(self.network.config.block_size)

    def _check_length(self, n: int) -> None:
        if n > self.block_size:
            raise ContextLengthError(f"a canvas of {n} tokens exceeds the model's context of {self.block_size} "
                                     "tokens: shorten it or use a model with a longer context")

    def canvas_length(self, prompt: Any, margin: int) -> int:
        """Canvas tokens for ``prompt`` (prompt included): predicted CIF length + margin, within the context."""
        counts = parse_formula_spec(prompt.formula) if prompt.formula else None
        if self.lengths is None:
            return self.block_size
        return max(len(encode(prompt.text)) + 1, self.lengths.canvas_length(counts, margin, self.block_size))

    def sampling_record(self, prompt: Any, knobs: Mapping[str, Any]) -> dict[str, Any]:
        """The knobs plus the canvas length, the blocks and steps actually run, and the applied constraint."""
        from engine.sample.diffusion import plan_schedule

        k = {**self.default_knobs(), **knobs}
        length = self.canvas_length(prompt, k["length_margin"])
        plan = plan_schedule(length - len(encode(prompt.text)), k["steps"], k["block_length"])
        k.update(canvas_length=length, length_source="training-data statistics" if self.lengths else "context",
                 n_blocks=plan.n_blocks, steps_per_block=plan.steps_per_block, steps_run=plan.steps,
                 allowed_elements=(prompt.elements or None) if k["constrain"] else None,
                 variant=self.network.variant)
        return k

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
        """``n`` CIF texts for a prompt: a canvas of prompt + masks, denoised, trimmed at the CIF end.

        A text without a blank line inside the canvas is unfinished (``truncated_reason = "canvas_length"``).
        """
        from engine.sample.diffusion import denoise, row_seeds
        from engine.sample.sampler import DEFAULT_BATCH_SIZE

        k = self.sampling_record(prompt, knobs)
        prompt_ids = encode(prompt.text)
        length = k["canvas_length"]
        banned = None
        if k["allowed_elements"]:
            banned = torch.zeros(BASE_VOCAB_SIZE, dtype=torch.bool)
            banned[[STOI[e] for e in ELEMENTS if e not in set(k["allowed_elements"])]] = True
        out: list[Generation] = []
        size = max(1, min(n, batch_size or DEFAULT_BATCH_SIZE))
        for start in range(0, n, size):
            rows = min(size, n - start)
            canvas = torch.full((rows, length), MASK_ID, dtype=torch.long, device=self._device)  # (B, L)
            canvas[:, : len(prompt_ids)] = torch.tensor(prompt_ids, device=self._device)
            keep = torch.zeros_like(canvas, dtype=torch.bool)
            keep[:, : len(prompt_ids)] = True
            filled = denoise(self.network, canvas, steps=k["steps"], temperature=k["temperature"], top_k=k["top_k"],
                             cfg_scale=k["cfg_scale"], remasking=k["remasking"], block_length=k["block_length"],
                             seeds=row_seeds(seed, first_index + start, rows), prompt=keep, banned=banned)
            for row in filled.tolist():
                out.append(_trim(row, len(prompt_ids)))
            if progress is not None:
                progress(len(out), n)
        return out

    @torch.inference_mode()
    def sequence_log_likelihood(self, texts: Sequence[str]) -> list[SequenceScore]:
        """A Monte-Carlo estimate of the ELBO of each text: a lower bound on log p(text) in expectation, in nats.

        For `ELBO_DRAWS` antithetic times t (p = (1 - eps) t + eps) every token but the first is masked with
        probability p, and sum over masked tokens of log p(token) / p is averaged over the draws. The draws are
        seeded from the text, so repeated calls agree. Not comparable one-to-one with an AR log-likelihood (it is a
        bound); the first token conditions the rest, as for the GPT.

        Raises:
            ContextLengthError: a text longer than the context (the masked model has no sliding window).
        """
        self.network.eval()
        scores = []
        for text in texts:
            ids = encode(text)
            if len(ids) < 2:
                scores.append(SequenceScore(0.0, 0))
                continue
            self._check_length(len(ids))
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
            g = torch.Generator().manual_seed(seed)
            x = torch.tensor(ids, device=self._device).expand(ELBO_DRAWS, -1)  # (K, T)
            p = mask_probabilities(ELBO_DRAWS, g).to(self._device)  # (K,)
            masked = (torch.rand(ELBO_DRAWS, len(ids), generator=g).to(self._device) < p[:, None])  # (K, T)
            masked[:, 0] = False
            logp = self.masked_log_probs(torch.where(masked, torch.full_like(x, MASK_ID), x))  # (K, T, V)
            picked = logp.gather(-1, x[..., None])[..., 0]  # (K, T)
            bound = (torch.where(masked, picked, torch.zeros_like(picked)).sum(1) / p).mean()
            scores.append(SequenceScore(float(bound), len(ids) - 1))
        return scores

    def training_loss(self, batch: Any) -> torch.Tensor:
        """The LLaDA bound (nats per token) on ``batch = (x, y)``; only ``x`` is used, the ``data_`` line is
        never masked and the masks come from a fixed generator (seed 0)."""
        from engine.models.diffusion_net import masked_diffusion_loss

        x, _ = batch
        g = torch.Generator().manual_seed(0)
        return masked_diffusion_loss(self.network, x, keep=prompt_positions(x), generator=g,
                                     variant=self.network.variant)

    def describe(self) -> dict[str, Any]:
        cfg = self.network.config
        ck = self.checkpoint
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
            "base_vocab_size": BASE_VOCAB_SIZE,
            "mask_id": MASK_ID,
            "variant": self.network.variant,
            "length_stats": self.lengths.to_dict() if self.lengths else None,
            "loss": "LLaDA bound on the NLL (nats/token), not a perplexity",
            "step": ck.iter_num if ck is not None else None,
            "run": ck.meta.get("run") if ck is not None else None,
            "upstream": False,
            "knobs": self.default_knobs(),
        }


def _trim(row: list[int], n_prompt: int) -> Generation:
    """A denoised canvas cut after the first blank line past the prompt (the CIF end)."""
    for j in range(max(1, n_prompt), len(row)):
        if row[j] == NEWLINE_ID and row[j - 1] == NEWLINE_ID:
            ids = row[: j + 1]
            return Generation(ids=ids, text=decode(ids), n_new_tokens=len(ids) - n_prompt, finished=True,
                              truncated_reason=None)
    return Generation(ids=row, text=decode(row), n_new_tokens=len(row) - n_prompt, finished=False,
                      truncated_reason="canvas_length")


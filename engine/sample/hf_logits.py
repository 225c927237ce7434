"""Logits processors for Hugging Face ``generate``: the element constraint and per-sample seeded sampling.

`ElementConstraint` keeps a Gruver-format completion to the prompt's elements: on an element line only tokens
that continue one of the allowed symbols (or end it with a newline) are allowed, and a token that would start an
element line elsewhere (``"\\nK"``) is checked the same way. `SeededSampler` makes ``generate`` (run greedily)
draw sample ``i`` from its own generator seeded by ``(seed, i)`` with the Gumbel-max trick, so a sample does
not depend on the batch it was drawn in: same seed and index, same sample.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor

from engine.train.batches import derive_seed

_LETTERS = re.compile(r"[A-Za-z]")


def _element_line(index: int) -> bool:
    """Lines of a Gruver body: 0 lengths, 1 angles, then element (even) and coordinates (odd) lines."""
    return index >= 2 and index % 2 == 0


class ElementConstraint(LogitsProcessor):
    """Only ``allowed`` element symbols may be written on Gruver element lines.

    Args:
        tokenizer: The model's tokenizer (token strings are decoded once).
        prompt_length: Tokens of the (left-padded) prompt; the body starts after it.
        allowed: Element symbols the completion may use.
        eos_id: End-of-text token: allowed only at the start of an element line (after a whole atom).
    """

    def __init__(self, tokenizer: Any, prompt_length: int, allowed: Sequence[str], eos_id: int | None) -> None:
        self.tokenizer, self.prompt_length, self.eos_id = tokenizer, prompt_length, eos_id
        self.allowed = tuple(sorted(set(allowed)))
        vocab = len(tokenizer)
        self.strings = [tokenizer.decode([t]) for t in range(vocab)]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        # Candidates whose check is needed: tokens with letters (they can write a symbol) or with a newline.
        self.letter_ids = [t for t, s in enumerate(self.strings) if t not in special and _LETTERS.search(s)]
        self.newline_ids = [t for t, s in enumerate(self.strings)
                            if t not in special and "\n" in s and not _LETTERS.search(s)]
        self.letter_newline_ids = [t for t in self.letter_ids if "\n" in self.strings[t]]
        self.letter_only_ids = [t for t in self.letter_ids if "\n" not in self.strings[t]]

    def _ok(self, line_index: int, partial: str, piece: str) -> bool:
        """Whether writing ``piece`` after ``partial`` (the current line so far) keeps element lines allowed."""
        for ch in piece:
            if ch == "\n":
                if _element_line(line_index) and partial not in self.allowed:
                    return False
                line_index, partial = line_index + 1, ""
            else:
                partial += ch
                if _element_line(line_index) and not any(el.startswith(partial) for el in self.allowed):
                    return False
        return True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (B, L) prompt + generated so far; scores: (B, V)
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self.prompt_length:].tolist(), skip_special_tokens=True)
            lines = text.split("\n")
            index, partial = len(lines) - 1, lines[-1]
            banned = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)  # (V,)
            if _element_line(index):
                allowed = [t for t in self.letter_ids + (self.newline_ids if partial else [])
                           if self._ok(index, partial, self.strings[t])]
                banned[:] = True
                if allowed:
                    banned[torch.tensor(allowed, device=scores.device)] = False
                if self.eos_id is not None and not partial:
                    banned[self.eos_id] = False
            else:
                bad = [t for t in self.letter_newline_ids if not self._ok(index, partial, self.strings[t])]
                if index < 2:  # no letters on the cell lines
                    bad += self.letter_only_ids
                if bad:
                    banned[torch.tensor(bad, device=scores.device)] = True
            if bool(banned[: scores.shape[1]].all()):
                continue  # nothing left: let the model end the sample rather than fail the batch
            scores[row, banned] = -float("inf")
        return scores


class SeededSampler(LogitsProcessor):
    """Gumbel-max sampling with one generator per sample, for ``generate(do_sample=False)``.

    Placed after the temperature / top-k / top-p warpers: argmax(log_softmax(scores) + Gumbel noise) is a draw
    from the warped distribution, and the noise of sample ``first_index + i`` comes from ``(seed, index)`` alone.
    """

    def __init__(self, seed: int, first_index: int, n: int, device: torch.device) -> None:
        self.generators = [torch.Generator(device="cpu").manual_seed(derive_seed(seed, "hf-sample", first_index + i))
                           for i in range(n)]
        self.device = device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)  # (B, V); -inf stays -inf
        noise = torch.stack([-torch.log(-torch.log(torch.rand(scores.shape[1], generator=g).clamp_(1e-20, 1.0)))
                             for g in self.generators]).to(scores.device)  # (B, V)
        return logp + noise

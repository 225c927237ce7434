"""A deliberately trivial model family that replays known CIF texts: proof that the lab works through the seam.

Its "checkpoint" is a torch file ``{"crystallab": {"family": "replay"}, "texts": [...]}``. Sample ``i`` of a run
seeded ``s`` is ``texts[(s + i) % len(texts)]`` when ``stride`` is 1 (its only knob), so results are exact and
reproducible. It is registered when this module is imported (``CRYSTALLAB_FAMILY_MODULES=families.replay`` with
``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from engine.lab.errors import CheckpointError
from engine.models.family import FamilyModel, Generation, Knob, SequenceScore, register_family


def save_replay(path: Path, texts: list[str]) -> Path:
    """Write a replay-family checkpoint holding ``texts``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"crystallab": {"family": "replay", "run": "replay"}, "texts": list(texts)}, path)
    return path


@register_family
class Replay(FamilyModel):
    family = "replay"
    text_format = "crystallm-cif"
    knobs = (Knob("stride", 1, "int", 1, 100, "step between replayed texts"),)

    def __init__(self, texts: list[str], path: Path | None) -> None:
        self.texts = texts
        self.path = path

    @classmethod
    def load(cls, path: Path, device: Any) -> "Replay":
        raw = torch.load(path, weights_only=True)
        texts = raw.get("texts")
        if not texts:
            raise CheckpointError(f"{path} is a replay checkpoint without texts: save some with save_replay")
        return cls(list(texts), Path(path))

    def generate(self, prompt: Any, n: int, knobs: Mapping[str, Any], *, seed: int = 1337,
                 batch_size: int | None = None, progress: Callable[[int, int], None] | None = None,
                 first_index: int = 0) -> list[Generation]:
        stride = int(knobs.get("stride", 1))
        out = []
        for i in range(n):
            text = self.texts[(seed + (first_index + i) * stride) % len(self.texts)]
            out.append(Generation([], text, len(text.split()), True, None))
            if progress is not None:
                progress(i + 1, n)
        return out

    def sequence_log_likelihood(self, texts: Sequence[str]) -> list[SequenceScore]:
        p = 1.0 / len(self.texts)
        return [SequenceScore(math.log(p) if t in self.texts else -1e9, 1) for t in texts]

    def training_loss(self, batch: Any) -> torch.Tensor:
        return torch.zeros(())

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "text_format": self.text_format, "path": str(self.path), "run": "replay",
                "n_texts": len(self.texts), "n_params": 0, "knobs": self.default_knobs()}

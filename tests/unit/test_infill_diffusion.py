"""Infill through the real masked-diffusion family (not a stand-in): the diffusion scorer ranks every candidate
from one masked pass, and span infill fills exactly the masked numbers of a real checkpoint's canvas."""

from __future__ import annotations

import math

import pytest
import torch
from pymatgen.core import Lattice, Structure

from engine.models.checkpoint import save_checkpoint
from engine.models.diffusion import MaskedDiffusionModel, checkpoint_fields
from engine.models.diffusion_net import DiffusionGPT, LengthModel
from engine.models.family import load_family_model
from engine.models.gpt import GPT, GPTConfig
from engine.sample.infill import canonical_view, fill_span, rank_replacements

LENGTHS = LengthModel(intercept=20.0, per_element=5.0, per_atom=1.0, residual_q95=2.0, mean_tokens=40.0,
                      max_tokens=400, n_cifs=3)


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory) -> MaskedDiffusionModel:
    torch.manual_seed(0)
    net = DiffusionGPT.from_gpt(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=512)), "direct")
    path = save_checkpoint(tmp_path_factory.mktemp("diff") / "diff.pt", model=net, iter_num=1, best_val_loss=None,
                           config={}, meta={"run": "d", **checkpoint_fields("direct", LENGTHS)})
    model = load_family_model(path, "cpu")
    assert isinstance(model, MaskedDiffusionModel)
    return model


def _nacl() -> Structure:
    return Structure(Lattice.orthorhombic(3.9, 4.1, 4.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_diffusion_scorer_ranks_candidates_with_the_real_family(diffusion):
    result = rank_replacements(_nacl(), "Na", diffusion, scorer="auto")
    assert result.scorer == "diffusion"  # chosen by capability, not by family name
    scores = [c.score for c in result.candidates]
    assert len(scores) > 50 and all(math.isfinite(s) and s <= 0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert any(c.original for c in result.candidates)


def test_span_infill_fills_only_the_masked_cell_with_the_real_family(diffusion):
    view = canonical_view(_nacl(), "NaCl")
    filled = fill_span(diffusion, view, cell=True, knobs={"steps": 8, "temperature": 0.0}, seed=3)
    assert "[MASK]" in filled.masked_text
    before, after = view.split("_cell_length_a")[0], filled.text.split("_cell_length_a")[0]
    assert before.strip() == after.strip()  # the unmasked head is kept verbatim
    tail = "_atom_site_occupancy"
    assert filled.text.split(tail)[1] == view.split(tail)[1]  # and so is the site loop after the cell

"""Element and span infill: likelihood ranking with a memorising tiny GPT, the diffusion scorer through a stand-in
masked model (the contract of the masked-diffusion family), chemistry filters, outputs and one-line CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.cli import main
from engine.crystal.masking import mask_element
from engine.crystal.substitution import Screen
from engine.crystal.tokenizer import encode
from engine.crystal.vocab import ELEMENTS, STOI, VOCAB_SIZE
from engine.lab.errors import CheckpointError, ConfigError
from engine.models.checkpoint import save_checkpoint
from engine.models.family import load_family_model
from engine.models.gpt import GPT, GPTConfig
from engine.sample.infill import canonical_view, fill_span, rank_replacements, read_structure, write_infill

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def nacl() -> Structure:
    """A two-atom orthorhombic NaCl (Pmmm): 8 symmetry operations keep the 88 re-canonicalizations fast."""
    return Structure(Lattice.orthorhombic(3.9, 4.1, 4.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def memorised_ckpt(tmp_path_factory, nacl) -> Path:
    """A one-layer GPT that has memorised NaCl's canonical CIF (a few seconds of Adam on one sequence)."""
    torch.manual_seed(0)
    ids = torch.tensor(encode(canonical_view(nacl, "NaCl")))  # (T,)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=len(ids), dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        _, loss = model(ids[None, :-1], ids[None, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    path = tmp_path_factory.mktemp("infill") / "nacl.pt"
    return save_checkpoint(path, model=model, iter_num=100, best_val_loss=None, config={}, meta={"run": "nacl"})


@pytest.fixture(scope="module")
def ranked(memorised_ckpt, nacl):
    """The memorising GPT's ranking of replacements for Na, with the oxidation filter."""
    return rank_replacements(nacl, "Na", load_family_model(memorised_ckpt), filter="oxidation")


def test_likelihood_ranks_the_memorised_element_first(ranked):
    result = ranked
    assert result.scorer == "likelihood"
    assert result.kept[0].element == "Na" and result.rank_of("Na") == 1
    assert {c.element for c in result.candidates} == set(ELEMENTS) - {"Cl"}  # the other element is no candidate


def test_each_score_is_the_log_likelihood_of_the_rewritten_canonical_cif(memorised_ckpt, ranked):
    model = load_family_model(memorised_ckpt)
    result = ranked
    k = next(c for c in result.candidates if c.element == "K")
    view = k.view
    # property row, formulas and labels are the candidate's own, regenerated from the substituted structure
    assert view.startswith("data_K1Cl1\n") and "\nK 0.8200 2.2000 1.5200\n" in view
    assert "_chemical_formula_sum 'K1 Cl1'" in view and "\nK K0 1 " in view and "Na" not in view
    direct = model.sequence_log_likelihood([view])[0]
    assert k.score == pytest.approx(direct.logp) and k.n_tokens == direct.n_tokens
    scores = [c.score for c in result.kept]
    assert scores == sorted(scores, reverse=True)


def test_the_oxidation_filter_drops_charge_imbalanced_candidates(nacl):
    screen = Screen(nacl, "Na", "oxidation")
    assert screen.reason("K") is None and screen.reason("Li") is None
    assert "charge-neutral" in screen.reason("La")  # LaCl: no neutral assignment
    assert "charge-neutral" in screen.reason("He")


def test_the_radius_filter_compares_ionic_radii_at_the_hidden_oxidation_state(nacl):
    screen = Screen(nacl, "Na", "radius")
    assert screen.reason("K") is None  # K+ 1.52 A against Na+ 1.16 A
    assert "ionic radius" in screen.reason("Cs")  # Cs+ 1.81 A: 1.56x


class StandInMasked:
    """Implements the masked-diffusion family's contract (``mask_id``, ``masked_log_probs``, ``fill``) for one
    memorised canvas: every position prefers its memorised token; element positions rank K second."""

    family = "stand-in-masked"
    path = None
    mask_id = VOCAB_SIZE

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.canvases: list[list[int]] = []

    def masked_log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        self.canvases += ids.tolist()
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB_SIZE)  # (B, T, V_base)
        memory = torch.tensor(self.ids)  # (T,)
        logits[:, torch.arange(len(self.ids)), memory] = 5.0
        element = torch.tensor([tok in {STOI[e] for e in ELEMENTS} for tok in self.ids])  # (T,)
        logits[:, element, STOI["K"]] = 3.0
        return torch.log_softmax(logits, dim=-1)

    def fill(self, ids: list[int], knobs, seed: int) -> list[int]:
        return [self.ids[i] if tok == self.mask_id else tok for i, tok in enumerate(ids)]


def test_the_diffusion_scorer_sums_masked_log_probs_over_the_elements_positions(nacl):
    view = canonical_view(nacl, "NaCl")
    model = StandInMasked(encode(view))
    result = rank_replacements(nacl, "Na", model, scorer="auto")
    assert result.scorer == "diffusion"
    assert [c.element for c in result.kept[:2]] == ["Na", "K"]
    mask = mask_element(view, "Na")
    canvas = model.canvases[0]
    assert [p for p, t in enumerate(canvas) if t == model.mask_id] == mask.positions  # symbol + property numbers
    logp = model.masked_log_probs(torch.tensor([canvas]))[0]  # (T, V)
    expected = float(logp[mask.element_positions, STOI["K"]].sum())
    assert result.kept[1].score == pytest.approx(expected) and result.kept[1].n_tokens == len(mask.element_positions)


def test_span_infill_regenerates_a_site_and_the_cell(nacl):
    view = canonical_view(nacl, "NaCl")
    model = StandInMasked(encode(view))
    site = fill_span(model, view, site=1)
    assert site.error is None and site.text == view and "Cl Cl1 1 [MASK] [MASK] [MASK] 1.0" in site.masked_text
    assert read_structure(site.cif, "filled").matches(nacl)  # the memorised coordinates came back
    cell = fill_span(model, view, cell=True)
    assert "_cell_angle_gamma [MASK]" in cell.masked_text and cell.error is None


def test_span_infill_and_the_diffusion_scorer_refuse_a_model_that_cannot_mask(memorised_ckpt, nacl):
    model = load_family_model(memorised_ckpt)
    with pytest.raises(CheckpointError, match=r"--site 0: the checkpoint .*nacl.pt is a crystallm-gpt model"):
        fill_span(model, canonical_view(nacl, "NaCl"), site=0)
    with pytest.raises(ConfigError, match="--scorer diffusion"):
        rank_replacements(nacl, "Na", model, scorer="diffusion")


def test_outputs_rank_every_candidate_and_write_the_top_structures(ranked, nacl, tmp_path):
    result = ranked
    paths = write_infill(result, tmp_path, 3, {"cif": "NaCl.cif"})
    record = json.loads(paths["json"].read_text())
    assert record["rank_of_original"] == 1 and record["inputs"] == {"cif": "NaCl.cif"}
    assert record["masked_regions"] == {"data": 1, "props": 1, "formula": 2, "site": 1, "label": 1}
    rows = paths["csv"].read_text().splitlines()
    assert len(rows) == 1 + 88 and rows[1].startswith("1,Na,")
    assert any(",La," in r and "charge-neutral" in r for r in rows)
    cifs = sorted(p.name for p in (tmp_path / "cifs").iterdir())
    assert cifs[0] == "01_Na.cif" and len(cifs) == 3
    assert read_structure((tmp_path / "cifs" / cifs[1]).read_text(), "x").composition.reduced_formula != "NaCl"
    assert read_structure((tmp_path / "cifs" / "01_Na.cif").read_text(), "x").matches(nacl)
    k = read_structure((tmp_path / "cifs" / cifs[1]).read_text(), "x")
    assert len(k) == len(nacl) and k.lattice.abc == pytest.approx(nacl.lattice.abc)  # every site, same cell


@pytest.fixture(scope="module")
def nacl_file(tmp_path_factory, nacl) -> Path:
    path = tmp_path_factory.mktemp("cif") / "NaCl.cif"
    CifWriter(nacl).write_file(path)
    return path


def test_the_cli_ranks_and_writes(memorised_ckpt, nacl_file, tmp_path, capsys):
    code = main(["infill", str(nacl_file), "--mask", "Na", "--ckpt", str(memorised_ckpt), "--top", "2",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "Na hidden at 6 places" in out and "   1  Na " in out
    assert len(list((tmp_path / "cifs").glob("*.cif"))) == 2 and (tmp_path / "infill.csv").exists()


@pytest.mark.parametrize("args, says", [
    (["--mask", "K"], "no K (its elements: Cl, Na)"),
    (["--mask", "Xx"], "'Xx' is not an element symbol"),
    (["--site", "0"], "--site 0: the checkpoint"),
    (["--cell"], "cannot fill a masked span"),
])
def test_bad_input_is_one_line_naming_it_and_exit_2(memorised_ckpt, nacl_file, tmp_path, capsys, args, says):
    code = main(["infill", str(nacl_file), *args, "--ckpt", str(memorised_ckpt), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_malformed_cif_is_named(memorised_ckpt, tmp_path, capsys):
    bad = tmp_path / "broken.cif"
    bad.write_text("data_x\n_cell_length_a 5.0\nloop_\n_atom_site_label\nNa\n")
    code = main(["infill", str(bad), "--mask", "Na", "--ckpt", str(memorised_ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "broken.cif cannot be read" in err and len(err.strip().splitlines()) == 1

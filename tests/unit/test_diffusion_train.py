"""Training the masked-diffusion family through the trainer's seam, sampling it through the lab's commands, and a
tiny model that memorises a few crystals and regenerates them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from engine.cli import main
from engine.crystal.tokenizer import encode
from engine.crystal.vocab import STOI
from engine.data.datasets import build_dataset
from engine.data.tokens import iter_cifs, load_token_dataset
from engine.lab.errors import CheckpointError, ConfigError
from engine.lab.runs import RunFolder
from engine.models.checkpoint import load_checkpoint, save_checkpoint
from engine.models.diffusion import MaskedDiffusionModel, checkpoint_fields, prompt_positions
from engine.models.diffusion_net import MASK_ID, DiffusionGPT, LengthModel, masked_diffusion_loss
from engine.models.family import load_family_model, resolve_knobs
from engine.models.gpt import GPT, GPTConfig
from engine.train.config import load_config
from engine.train.diffusion import fit_lengths
from engine.train.trainer import train

TINY = ["n_layer=1", "n_head=2", "n_embd=32", "dropout=0.0", "batch_size=4", "eval_iters=2", "warmup_iters=2",
        "learning_rate=3e-3", "device=cpu", "dtype=float32", "objective=masked-diffusion"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    """Three small crystals (rock salt NaCl, CsCl, rock salt MgO) as a token dataset, all in the training split."""
    root = tmp_path_factory.mktemp("three")
    cifs = root / "cifs"
    cifs.mkdir()
    for name, (sg, a, els, sites) in {
        "nacl": ("Fm-3m", 5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "cscl": ("Pm-3m", 4.12, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "mgo": ("Fm-3m", 4.21, ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    }.items():
        Structure.from_spacegroup(sg, Lattice.cubic(a), els, sites).to(filename=str(cifs / f"{name}.cif"))
    build_dataset([str(cifs)], root / "data", val_fraction=0.0, dedup=False, workers=1)
    return root / "data"


def _ar_checkpoint(path: Path, block_size: int = 128) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size))
    return save_checkpoint(path, model=model, iter_num=100, best_val_loss=None, config={}, meta={})


def test_finetune_from_an_ar_checkpoint_trains_resumes_and_samples(three, tmp_path, capsys):
    src = _ar_checkpoint(tmp_path / "ar.pt")
    cfg = load_config(None, [f"dataset={three}", *TINY, "init_from=finetune", f"init_ckpt={src}",
                             "diffusion_variant=shift", "diffusion_anneal_steps=4", "max_iters=6", "eval_interval=3",
                             "log_interval=1"])
    run = train(cfg, run_dir=tmp_path / "run", progress=False)
    rows = RunFolder(run).metrics()
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert len(train_rows) == 6 and all(r["loss_kind"] == "nll_bound" for r in train_rows)
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert "nll_bound" in (run / "log.txt").read_text()
    ck = load_checkpoint(run / "ckpt" / "last.pt")
    assert ck.meta["family"] == "masked-diffusion" and ck.meta["mask_id"] == MASK_ID
    assert (ck.meta["base_vocab_size"], ck.meta["diffusion_variant"], ck.model_args["vocab_size"]) == (371, "shift", 372)
    assert ck.meta["length_stats"]["n_cifs"] == 3
    # resume continues the diffusion run from its own checkpoint
    resumed = train(load_config(None, ["init_from=resume", f"out_dir={run}", "max_iters=8"]), progress=False)
    assert load_checkpoint(resumed / "ckpt" / "last.pt").iter_num == 8
    # the lab's sample command works unchanged with the family's own knobs
    code = main(["sample", "--ckpt", str(run / "ckpt" / "last.pt"), "--prompt", "Na2Cl2", "--n", "2",
                 "--knob", "steps=4", "--knob", "length_margin=2", "--out", str(tmp_path / "s"), "--no-evaluate",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    (config_path,) = (tmp_path / "s").rglob("config.json")
    rec = json.loads(config_path.read_text())
    assert rec["sampling"]["steps"] == 4 and rec["sampling"]["canvas_length"] > 0
    assert rec["checkpoint"]["family"] == "masked-diffusion"
    assert len(list(config_path.parent.glob("raw/*.txt"))) == 2


def test_a_diffusion_checkpoint_where_a_gpt_run_needs_one_is_refused(three, tmp_path):
    src = tmp_path / "d.pt"
    torch.manual_seed(0)
    net = DiffusionGPT.from_gpt(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)), "direct")
    save_checkpoint(src, model=net, iter_num=1, best_val_loss=None, config={},
                    meta=checkpoint_fields("direct", None))
    cfg = load_config(None, [f"dataset={three}", *TINY[:-1], "init_from=finetune", f"init_ckpt={src}",
                             "max_iters=2"])
    with pytest.raises(CheckpointError, match="masked-diffusion checkpoint, not a CrystaLLM GPT"):
        train(cfg, run_dir=tmp_path / "r", progress=False)
    wrong = load_config(None, [f"dataset={three}", *TINY, "init_from=finetune", f"init_ckpt={src}",
                               "diffusion_variant=shift", "max_iters=2"])
    with pytest.raises(ConfigError, match="direct-variant diffusion model"):
        train(wrong, run_dir=tmp_path / "r2", progress=False)


@pytest.mark.parametrize("item, fragment", [
    ("diffusion_variant=sideways", "diffusion_variant must be direct or shift"),
    ("diffusion_anneal_steps=-1", "diffusion_anneal_steps must be >= 0"),
    ("diffusion_prompt_dropout=1.5", "diffusion_prompt_dropout must be a fraction"),
])
def test_bad_diffusion_config_values_are_one_line_errors(item, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_length_statistics_fit_tokens_against_composition(three):
    ds = load_token_dataset(three)
    from engine.data.tokens import cif_lengths

    lengths = fit_lengths(np.asarray(ds.train), ds.train_starts, cif_lengths(ds.train, ds.train_starts))
    assert lengths.n_cifs == 3 and lengths.max_tokens == int(cif_lengths(ds.train, ds.train_starts).max())
    assert abs(lengths.predict({"Na": 4, "Cl": 4}) - lengths.mean_tokens) < 40
    lm = LengthModel(10.0, 2.0, 1.0, 3.0, 30.0, 40, 5)
    assert lm.canvas_length({"Na": 4, "Cl": 4}, 5, 1000) == 10 + 4 + 8 + 3 + 5
    assert lm.canvas_length({"Na": 4, "Cl": 4}, 5, 20) == 20  # capped at the context


@pytest.mark.slow
def test_a_tiny_model_memorises_crystals_and_regenerates_one(three):
    texts = list(iter_cifs(load_token_dataset(three)))
    seqs = [encode(t) for t in texts]
    T = max(map(len, seqs))
    nl = STOI["\n"]
    x = torch.tensor([s + [nl] * (T - len(s)) for s in seqs])  # (3, T): pad with blank lines past the end
    torch.manual_seed(0)
    net = DiffusionGPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=T, dropout=0.0,
                                 vocab_size=MASK_ID + 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    keep = torch.cat([prompt_positions(x), torch.zeros_like(x, dtype=torch.bool)])  # second copy: prompt dropped
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = masked_diffusion_loss(net, x.repeat(2, 1), keep=keep, generator=g, variant="direct")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    lengths = LengthModel(float(T), 0.0, 0.0, 0.0, float(T), T, 3)
    model = MaskedDiffusionModel(net.eval(), None, None, torch.device("cpu"))
    model.lengths = lengths
    from engine.crystal.prompts import cell_prompt

    target = texts[0]
    prompt = cell_prompt(target.split("\n", 1)[0][len("data_"):])
    knobs = resolve_knobs(MaskedDiffusionModel, {"temperature": 0, "steps": 64, "length_margin": 0})
    (gen,) = model.generate(prompt, 1, knobs, seed=0)
    assert gen.finished and gen.text == target
    # a masked element is recovered: every occurrence of the first element hidden, the model puts it back
    ids = encode(target)
    el = STOI[prompt.elements[0]]
    holes = [MASK_ID if t == el else t for t in ids]
    logp = model.masked_log_probs(torch.tensor([holes]))[0]  # (T, 371)
    assert all(int(logp[i].argmax()) == el for i, t in enumerate(holes) if t == MASK_ID)


def test_load_family_model_reads_a_trained_run(three, tmp_path):
    cfg = load_config(None, [f"dataset={three}", *TINY, "max_iters=2", "eval_interval=2", "preset=tiny",
                             "block_size=128"])
    run = train(cfg, run_dir=tmp_path / "scratch", progress=False)
    model = load_family_model(run / "ckpt" / "last.pt", "cpu")
    assert isinstance(model, MaskedDiffusionModel) and model.lengths is not None
    assert model.describe()["variant"] == "direct"


class _Recorder(torch.nn.Module):
    """Records the noisy inputs it is given; uniform logits."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, idx, attn_mask=None):
        self.seen.append(idx.clone())
        return torch.zeros(*idx.shape, MASK_ID + 1, requires_grad=True), None


def test_the_objective_never_masks_the_prompt_and_repeats_its_draws():
    from engine.train.diffusion import MaskedDiffusionObjective

    text = "data_Na4Cl4\nloop_\n_atom_type_symbol\nNa\nCl\n_cell_length_a 5.6\n\n"
    x = torch.tensor([encode(text)] * 8)
    obj = MaskedDiffusionObjective(load_config(None, ["objective=masked-diffusion", "diffusion_prompt_dropout=0",
                                                      "diffusion_random_length=0"]))
    rec = _Recorder()
    a = obj.loss(rec, x, x, step=3, train=True)
    b = MaskedDiffusionObjective(obj.config).loss(rec, x, x, step=3, train=True)  # a resumed run, same step
    assert float(a.detach()) == float(b.detach()) and torch.equal(rec.seen[0], rec.seen[1])
    keep = prompt_positions(x)
    assert not bool((rec.seen[0][keep] == MASK_ID).any()) and bool((rec.seen[0][~keep] == MASK_ID).any())
    obj.loss(rec, x, x, step=3, train=True)  # the next micro-batch of that step draws other masks
    assert not torch.equal(rec.seen[2], rec.seen[0])

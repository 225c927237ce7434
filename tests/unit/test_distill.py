"""Logit distillation: the KD loss by hand, T and alpha, a student closing on its teacher, the top-k cache, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pymatgen.core import Lattice, Structure

from engine.cli import main
from engine.data.datasets import build_dataset
from engine.lab.errors import ConfigError
from engine.models.checkpoint import load_model, save_checkpoint
from engine.models.gpt import GPT, GPTConfig
from engine.train.batches import WindowSampler
from engine.train.config import load_config
from engine.train.distill import DistillObjective, kd_loss, kd_loss_topk, total_loss
from engine.train.trainer import train

TINY = ["dropout=0.0", "batch_size=4", "eval_iters=2", "warmup_iters=2", "learning_rate=3e-3", "device=cpu",
        "dtype=float32", "block_size=64", "kd_topk=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _rock_salt(root: Path, a0: float, da: float, species: list[str]) -> Path:
    """Eight rock-salt CIFs (a = a0, a0 + da, ...) as a token dataset (7 train, 1 validation)."""
    (root / "cifs").mkdir()
    for k in range(8):
        s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a0 + da * k), species, [[0, 0, 0], [0.5, 0.5, 0.5]])
        s.to(filename=str(root / "cifs" / f"{k}.cif"))
    build_dataset([str(root / "cifs")], root / "data", val_fraction=0.15, dedup=False, workers=1)
    return root / "data"


@pytest.fixture(scope="module")
def nacl(tmp_path_factory) -> Path:
    """The students' data: NaCl, a = 5.50 ... 5.71 Å."""
    return _rock_salt(tmp_path_factory.mktemp("nacl"), 5.50, 0.03, ["Na", "Cl"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A 2-layer 64-wide GPT that memorised KBr CIFs: on NaCl windows it predicts what the data never shows, so
    a student that follows the teacher and one that follows the data end up measurably apart."""
    kbr = _rock_salt(tmp_path_factory.mktemp("kbr"), 6.20, 0.05, ["K", "Br"])
    run = train(load_config(None, [f"dataset={kbr}", *TINY, "n_layer=2", "n_head=2", "n_embd=64",
                                   "max_iters=60", "eval_interval=60", "name=teacher"]),
                run_dir=tmp_path_factory.mktemp("teacher_runs") / "teacher", progress=False)
    return run / "ckpt" / "last.pt"


def _student(nacl, teacher, *more):
    return load_config(None, [f"dataset={nacl}", *TINY, "n_layer=1", "n_head=2", "n_embd=32", "max_iters=20",
                              "eval_interval=20", "objective=distill", f"teacher_ckpt={teacher}", *more])


# --- the loss ---


def test_kd_loss_is_zero_for_identical_models_and_matches_a_hand_computation():
    z = torch.randn(2, 3, 5)
    assert kd_loss(z, z.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z.clone(), kind="reverse").item() == pytest.approx(0.0, abs=1e-6)
    # One position, two tokens: teacher logits (0, ln 3) -> p = (1/4, 3/4) at T = 1; student (0, 0) -> q = (1/2, 1/2).
    t, s = torch.tensor([[[0.0, math.log(3.0)]]]), torch.zeros(1, 1, 2)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(forward, rel=1e-5)
    assert kd_loss(s, t, temperature=1.0, kind="reverse").item() == pytest.approx(reverse, rel=1e-5)
    # T = 2: teacher logits halved -> p = softmax(0, ln 3 / 2) = (1/(1+sqrt3), sqrt3/(1+sqrt3)); times T^2 = 4.
    p1 = 1 / (1 + math.sqrt(3.0))
    by_hand = 4 * (p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5))
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(by_hand, rel=1e-5)


def test_alpha_weights_ce_against_kd_and_topk_equals_full_when_k_is_the_vocabulary():
    ce, kd = torch.tensor(2.0), torch.tensor(6.0)
    assert total_loss(ce, kd, 1.0).item() == 2.0 and total_loss(ce, kd, 0.0).item() == 6.0
    assert total_loss(ce, kd, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 6)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    top = torch.topk(t, 7, dim=-1)
    for kind in ("forward", "reverse"):
        full = kd_loss(s, t, temperature=1.5, kind=kind)
        assert kd_loss_topk(s, top.values, top.indices, temperature=1.5, kind=kind).item() == pytest.approx(
            full.item(), rel=1e-5)
    # Fewer tokens: the teacher is renormalised over its top k, so a student equal to it still scores ~0 there.
    top3 = torch.topk(t, 3, dim=-1)
    assert kd_loss_topk(t, top3.values, top3.indices, kind="reverse").item() == pytest.approx(0.0, abs=1e-6)


def test_masked_positions_do_not_count():
    s, t = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    mask = torch.tensor([[True, True, False, False]])
    assert kd_loss(s, t, mask=mask).item() == pytest.approx(kd_loss(s[:, :2], t[:, :2]).item(), rel=1e-5)


# --- training ---


def _kl_to_teacher(student_ckpt: Path, teacher_ckpt: Path, nacl: Path) -> float:
    from engine.data.tokens import load_token_dataset

    ds = load_token_dataset(nacl)
    s_model, _ = load_model(student_ckpt)
    t_model, _ = load_model(teacher_ckpt)
    x, _ = WindowSampler(ds.train, 64, 8, 7, ds.train_starts).batch("kl")
    with torch.no_grad():
        return kd_loss(s_model(x)[0], t_model(x)[0], temperature=1.0).item()


def test_distilled_student_gets_closer_to_its_teacher_than_the_baseline(nacl, teacher):
    steps = ["max_iters=40", "eval_interval=40", "learning_rate=1e-2"]
    kd_run = train(_student(nacl, teacher, "kd_alpha=0.0", "name=kd", *steps), progress=False)
    base = load_config(None, [f"dataset={nacl}", *TINY, "n_layer=1", "n_head=2", "n_embd=32", "name=base", *steps])
    base_run = train(base, progress=False)
    torch.manual_seed(base.seed)
    start = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))  # both students' step-0 weights
    save_checkpoint(nacl.parent / "start.pt", model=start, iter_num=0, best_val_loss=None, config={}, meta={})
    kl_start = _kl_to_teacher(nacl.parent / "start.pt", teacher, nacl)
    kl_kd = _kl_to_teacher(kd_run / "ckpt" / "last.pt", teacher, nacl)
    kl_base = _kl_to_teacher(base_run / "ckpt" / "last.pt", teacher, nacl)
    # Measured: start 4.14, distilled 1.29, baseline 1.98 (T 2, alpha 0; T 1 reaches 0.19).
    assert kl_kd < 0.5 * kl_start and kl_kd < 0.8 * kl_base, (kl_start, kl_kd, kl_base)
    meta = torch.load(kd_run / "ckpt" / "last.pt", weights_only=True)["crystallab"]
    assert meta["distill"]["teacher"] == str(teacher) and meta["distill"]["kd_alpha"] == 0.0


def test_topk_cache_is_reused_on_a_second_epoch(nacl, teacher, tmp_path):
    config = _student(nacl, teacher, "kd_topk=8", f"kd_cache_dir={tmp_path / 'cache'}")
    obj = DistillObjective(config)
    model = obj.build(config, None, lambda *a: None)
    from engine.data.tokens import load_token_dataset

    ds = load_token_dataset(nacl)
    sampler = WindowSampler(ds.train, 64, 4, 1, ds.train_starts)
    x, y = sampler.batch("epoch")
    first = obj.loss(model, x, y, step=0, train=True)
    calls = obj.teacher_calls
    assert calls == 1 and obj.cache.misses == 4 and list((tmp_path / "cache").rglob("*.npz"))
    second = obj.loss(model, x, y, step=1, train=True)  # the same windows again: read from disk
    assert obj.teacher_calls == calls and obj.cache.hits == 4
    assert second.item() == pytest.approx(first.item(), rel=1e-6)
    # A new objective (a resumed run, a second student) finds the same files.
    again = DistillObjective(config)
    again.build(config, None, lambda *a: None)
    again.loss(model, x, y, step=0, train=True)
    assert again.teacher_calls == 0 and again.cache.hits == 4


def test_eval_loss_is_the_plain_cross_entropy(nacl, teacher):
    config = _student(nacl, teacher)
    obj = DistillObjective(config)
    model = obj.build(config, None, lambda *a: None)
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert obj.loss(model, x, y, step=0, train=False).item() == pytest.approx(model(x, y)[1].item())
    assert obj.teacher_calls == 0


# --- bad input: one line each ---


def test_bad_alpha_kind_and_missing_teacher_are_one_line_errors(nacl, teacher, tmp_path):
    for bad, words in (("kd_alpha=1.5", "kd_alpha must be in [0, 1]"), ("kd_alpha=-0.1", "kd_alpha"),
                       ("kd_kind=sideways", "kd_kind must be one of forward, reverse"),
                       ("kd_temperature=0", "kd_temperature must be positive")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")) as err:
            _student(nacl, teacher, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs teacher_ckpt"):
        load_config(None, [f"dataset={nacl}", "objective=distill"])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="teacher_ckpt cannot be loaded") as err:
        _student(nacl, junk)
    assert "\n" not in str(err.value)


def test_teacher_with_another_vocabulary_is_refused(nacl, tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=400))
    path = tmp_path / "foreign.pt"
    save_checkpoint(path, model=model, optimizer=None, iter_num=0, best_val_loss=None, config={}, meta={})
    with pytest.raises(ConfigError, match="vocabularies differ") as err:
        _student(nacl, path)
    assert "\n" not in str(err.value) and "400-token" in str(err.value)


def test_teacher_of_a_family_without_logits_is_not_supported(nacl, teacher, tmp_path, monkeypatch):
    from engine.models import family as fam

    class NoLogits(fam.FamilyModel):  # a stand-in family: only what the registry needs
        family, text_format, knobs = "test-no-logits", "crystallm-cif", ()
        load = generate = sequence_log_likelihood = training_loss = describe = None

    monkeypatch.setitem(fam._REGISTRY, "test-no-logits", NoLogits)
    monkeypatch.setattr(fam, "peek_family", lambda path: "test-no-logits")
    with pytest.raises(ConfigError, match="not supported for that family"):
        _student(nacl, teacher)


def test_cli_exits_2_on_a_bad_distillation_config(nacl, teacher, tmp_path, capsys):
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"dataset: {nacl}\nobjective: distill\nteacher_ckpt: {teacher}\nkd_alpha: 2\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "kd_alpha must be in [0, 1]" in err and len(err.strip().splitlines()) == 1

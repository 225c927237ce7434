"""Sampler: seeding, greedy/cache equivalence, per-row stopping, top-k/top-p, constraints, sample sets and the CLI.

Models are tiny random GPTs on CPU. Where a behaviour needs a particular token to be likely (newlines to end CIFs,
a forbidden element to tempt the constraint), a subclass adds a fixed bias to that token's logit; everything else
(KV cache, batching, sampling) is the real code path.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pymatgen.core import Structure

import engine.sample.sample_sets as sample_sets
import engine.sample.sampler as sampler
from engine.cli import main as cli_main
from engine.crystal.prompts import build_prompts
from engine.crystal.tokenizer import encode
from engine.crystal.vocab import DATA_ID, ELEMENTS, NEWLINE_ID, SPACE_GROUPS, STOI
from engine.lab.errors import ConfigError, InputError, PromptError
from engine.lab.fsutil import sha256_file
from engine.lab.settings import get_settings
from engine.models.checkpoint import save_checkpoint
from engine.models.gpt import GPT, GPTConfig
from engine.sample.sample_sets import sample_to_dir
from engine.sample.sampler import generate

PROMPT = encode("data_Na2Cl2\n")
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two cores shared by many processes: one intra-op thread avoids oversubscription stalls (5x faster here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BiasedGPT(GPT):
    """A GPT whose logits get a constant bias per token (to make newlines or an element likely)."""

    def __init__(self, config: GPTConfig, bias: dict[int, float]) -> None:
        super().__init__(config)
        self.token_bias = torch.zeros(config.vocab_size)
        for tok, b in bias.items():
            self.token_bias[tok] = b

    def forward(self, idx, targets=None, kv_cache=None):
        logits, loss = super().forward(idx, targets, kv_cache)
        return logits + self.token_bias.to(logits.dtype), loss


def _model(seed: int = 0, bias: dict[int, float] | None = None) -> GPT:
    torch.manual_seed(seed)
    return BiasedGPT(CFG, bias or {})


def _ids(gens) -> list[list[int]]:
    return [g.ids for g in gens]


def test_same_seed_same_samples_and_different_seed_different_samples():
    model = _model()
    kw = dict(n=4, max_new_tokens=20, temperature=1.0, top_k=0, batch_size=2)
    first = generate(model, PROMPT, seed=7, **kw)
    assert _ids(first) == _ids(generate(model, PROMPT, seed=7, **kw))
    assert _ids(first) != _ids(generate(model, PROMPT, seed=8, **kw))
    assert len({tuple(ids) for ids in _ids(first)}) == 4  # rows draw independent streams
    assert all(g.ids[: len(PROMPT)] == PROMPT and g.n_new_tokens == 20 for g in first)


def test_each_row_stops_at_its_own_cif_end_and_matches_a_solo_run():
    model = _model(1, {NEWLINE_ID: 5.0})
    gens = generate(model, PROMPT, n=8, max_new_tokens=12, temperature=1.0, top_k=0, seed=3, batch_size=8)
    finished = [g for g in gens if g.finished]
    assert len({g.n_new_tokens for g in finished}) >= 3  # rows really finished at different steps
    assert len(finished) < len(gens)  # and some ran out of budget
    for g in finished:
        new = g.ids[len(PROMPT) - 1 :]
        assert g.ids[-2:] == [NEWLINE_ID, NEWLINE_ID] and g.text.endswith("\n\n")
        assert all(not (a == b == NEWLINE_ID) for a, b in zip(new[:-2], new[1:-1]))  # the first CIF end
        assert g.truncated_reason is None
    assert all(g.truncated_reason == "max_new_tokens" and g.n_new_tokens == 12 for g in gens if not g.finished)
    # Rows leaving the batch (cache compaction) must not disturb the rows that stay: same as one at a time.
    solo = generate(model, PROMPT, n=8, max_new_tokens=12, temperature=1.0, top_k=0, seed=3, batch_size=1)
    assert _ids(solo) == _ids(gens)


def test_progress_reports_samples_as_they_finish():
    model = _model(1, {NEWLINE_ID: 5.0})
    calls = []
    generate(model, PROMPT, n=8, max_new_tokens=12, temperature=1.0, top_k=0, seed=3, batch_size=4,
             progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (8, 8) and {t for _, t in calls} == {8}
    assert any(0 < d < 4 for d in done)  # reported within the first batch, not only at its end


def test_stop_at_cif_end_false_always_runs_the_full_budget():
    model = _model(1, {NEWLINE_ID: 4.0})
    gens = generate(model, PROMPT, n=3, max_new_tokens=30, seed=3, stop_at_cif_end=False)
    assert [g.n_new_tokens for g in gens] == [30, 30, 30]


def test_greedy_is_identical_with_and_without_the_kv_cache_also_past_the_context():
    model = _model(2)
    # 6 prompt + 80 new tokens run well past block_size 48: the sliding window takes over.
    cached = generate(model, PROMPT, n=2, max_new_tokens=80, temperature=0, stop_at_cif_end=False)
    plain = generate(model, PROMPT, n=1, max_new_tokens=80, temperature=0, stop_at_cif_end=False, use_cache=False)
    assert cached[0].ids == cached[1].ids == plain[0].ids
    assert len(cached[0].ids) == len(PROMPT) + 80


def test_top_k_1_and_tiny_top_p_reduce_to_greedy():
    model = _model(3)
    kw = dict(n=2, max_new_tokens=25, stop_at_cif_end=False, seed=5)
    greedy = _ids(generate(model, PROMPT, temperature=0, **kw))
    assert _ids(generate(model, PROMPT, temperature=1.5, top_k=1, **kw)) == greedy
    assert _ids(generate(model, PROMPT, temperature=1.5, top_k=0, top_p=1e-6, **kw)) == greedy
    assert _ids(generate(model, PROMPT, temperature=1.5, top_k=0, **kw)) != greedy


def _element_violations(ids: list[int], allowed: set[str]) -> int:
    """Element tokens outside ``allowed`` on lines where the CIF grammar puts elements."""
    element_ids = {STOI[el] for el in ELEMENTS}
    tags = {DATA_ID, STOI["_chemical_formula_sum"], STOI["_chemical_formula_structural"]}
    bad, line = 0, []
    for tok in ids + [NEWLINE_ID]:
        if tok != NEWLINE_ID:
            line.append(tok)
            continue
        if line and (line[0] in tags or line[0] in element_ids):
            bad += sum(1 for t in line if t in element_ids and ELEMENTS[t] not in allowed)
        line = []
    return bad


def test_allowed_elements_are_the_only_elements_written_where_elements_go():
    fe = STOI["Fe"]
    model = _model(4, {fe: 5.0, NEWLINE_ID: 2.0})  # Fe is tempting everywhere; newlines start many lines
    prompt = [DATA_ID]
    kw = dict(n=6, max_new_tokens=60, temperature=1.0, top_k=0, seed=11, stop_at_cif_end=False)
    free = generate(model, prompt, **kw)
    assert sum(_element_violations(g.ids, {"Na", "Cl"}) for g in free) > 0  # the check can fail
    constrained = generate(model, prompt, allowed_elements=["Na", "Cl"], **kw)
    assert all(_element_violations(g.ids, {"Na", "Cl"}) == 0 for g in constrained)
    assert any(fe in g.ids for g in constrained)  # elsewhere (e.g. mid-line after a keyword) Fe stays possible


def test_space_group_constraint_allows_only_space_group_tokens_after_the_tag():
    model = _model(5)
    prompt = encode("data_Na1Cl1\n_symmetry_space_group_name_H-M ")
    sg_ids = {STOI[f"{s}_sg"] for s in SPACE_GROUPS}
    gens = generate(model, prompt, n=16, max_new_tokens=2, temperature=1.0, top_k=0, constrain_spacegroup=True)
    assert all(g.ids[len(prompt)] in sg_ids for g in gens)
    free = generate(model, prompt, n=16, max_new_tokens=2, temperature=1.0, top_k=0)
    assert any(g.ids[len(prompt)] not in sg_ids for g in free)


def test_generation_runs_in_eval_mode_and_restores_training_mode():
    torch.manual_seed(6)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, dropout=0.5)).train()
    runs = [_ids(generate(model, PROMPT, n=1, max_new_tokens=15, temperature=0)) for _ in range(2)]
    assert runs[0] == runs[1]  # attention/residual dropout would make greedy runs differ
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(n=0), ConfigError),
        (dict(n=1, temperature=-1.0), ConfigError),
        (dict(n=1, temperature=float("nan")), ConfigError),
        (dict(n=1, temperature=float("inf")), ConfigError),
        (dict(n=1, top_p=0.0), ConfigError),
        (dict(n=1, top_p=float("nan")), ConfigError),
        (dict(n=1, batch_size=0), ConfigError),
        (dict(n=1, max_new_tokens=0), ConfigError),
        (dict(n=1, allowed_elements=["Xx"]), PromptError),
    ],
)
def test_bad_sampling_parameters_are_refused(kwargs, error):
    with pytest.raises(error):
        generate(_model(), PROMPT, **kwargs)


@pytest.fixture(scope="module")
def memorized(_one_thread, tmp_path_factory, golden_canonical):
    """A checkpoint of a 1-layer GPT trained (about 3 s) to reproduce the shortest golden CIF, and that record."""
    record = min((r for r in golden_canonical if "error" not in r), key=lambda r: len(r["ids"]))
    ids = torch.tensor(record["ids"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=len(ids) + 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(ids[None, :-1], ids[None, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint(path, model=model, iter_num=200, best_val_loss=None, config={}, meta={"run": "memorize"})
    return path, record


def test_sample_to_dir_writes_a_complete_sample_set_with_provenance(memorized, tmp_path):
    ckpt, record = memorized
    formula = record["model_view"].split("\n", 1)[0].removeprefix("data_")
    (prompt,) = build_prompts(formula)
    out = sample_to_dir(ckpt, prompt, tmp_path / "set", n=3, temperature=0, max_new_tokens=400, seed=4,
                        device="cpu", evaluate=False)
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint"]["sha256"] == sha256_file(ckpt)
    assert (config["checkpoint"]["step"], config["checkpoint"]["run"]) == (200, "memorize")
    assert config["prompt"] == prompt.to_dict()
    assert config["sampling"]["seed"] == 4 and config["sampling"]["allowed_elements"] == prompt.elements
    assert config["tokens_per_s"] > 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all(r["finished"] and r["postprocess_ok"] and r["postprocess_error"] is None for r in records)
    assert (out / "raw" / "0000.txt").read_text() == record["decoded"]  # the memorized CIF, token for token
    structure = Structure.from_str((out / "processed" / "0002.cif").read_text(), fmt="cif")
    assert structure.composition.reduced_formula == Structure.from_str(record["symmetrized_cif"], fmt="cif"
                                                                       ).composition.reduced_formula
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no partial folder left behind


@pytest.mark.slow  # a real evaluation: worker process, CrystalNN bonds (about 10 s on a busy 2-core machine)
def test_sample_to_dir_evaluates_the_finished_set(memorized, tmp_path):
    ckpt, record = memorized
    formula = record["model_view"].split("\n", 1)[0].removeprefix("data_")
    out = sample_to_dir(ckpt, build_prompts(formula)[0], tmp_path / "set", n=1, temperature=0,
                        max_new_tokens=400, device="cpu")
    summary = json.loads((out / "eval_summary.json").read_text())
    assert (out / "eval.csv").exists() and summary["n"]["value"] == 1
    # The memorized text is the upstream-decoded golden CIF, so it gets the upstream verdict.
    assert summary["validity"]["value"] == float(record["validity"]["is_valid"])


def test_sample_to_dir_refuses_a_folder_that_holds_something_else(memorized, tmp_path):
    ckpt, _ = memorized
    (prompt,) = build_prompts("C2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(InputError, match="holds no sample set"):
        sample_to_dir(ckpt, prompt, tmp_path / "busy", n=1, max_new_tokens=5, device="cpu", evaluate=False)
    # /sys refuses new files even to root, as a read-only folder does: refused before the model is loaded
    with pytest.raises(InputError, match="cannot be written"):
        sample_to_dir(ckpt, prompt, "/sys/crystallab-test/set", n=1, max_new_tokens=5, device="cpu", evaluate=False)


def _kill_at_sample(monkeypatch, k: int) -> None:
    """Make the k-th post-processed sample of this process raise KeyboardInterrupt, as a kill would stop it."""
    calls = {"n": 0}
    real = sample_sets.postprocess

    def killed(text, finished=None):
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt
        return real(text, finished)

    monkeypatch.setattr(sample_sets, "postprocess", killed)


def test_a_killed_sample_run_keeps_finished_batches_and_the_same_command_finishes_it(memorized, tmp_path,
                                                                                     monkeypatch):
    ckpt, _ = memorized
    (prompt,) = build_prompts("C2")
    args = dict(n=5, temperature=1.0, top_k=0, max_new_tokens=12, seed=9, batch_size=2, device="cpu", evaluate=False)
    whole = sample_to_dir(ckpt, prompt, tmp_path / "whole", **args)
    _kill_at_sample(monkeypatch, 4)  # during the second batch: the first (samples 0, 1) is complete on disk
    with pytest.raises(KeyboardInterrupt):
        sample_to_dir(ckpt, prompt, tmp_path / "set", **args)
    partial = tmp_path / ".set.partial"
    assert sorted(p.name for p in (partial / "raw").iterdir())[:2] == ["0000.txt", "0001.txt"]
    assert [json.loads(line)["index"] for line in (partial / "progress.jsonl").read_text().splitlines()] == [0, 1]
    assert not (tmp_path / "set").exists()
    torn = partial / "raw" / ".0002.txt.999.tmp"  # a kill during a sample's write
    torn.write_text("half")
    with pytest.raises(InputError, match=r"unfinished sample set made with different settings \(sampling.seed\)"):
        sample_to_dir(ckpt, prompt, tmp_path / "set", **{**args, "seed": 10})
    monkeypatch.undo()
    made = []
    monkeypatch.setattr(sampler, "generate", lambda *a, **kw: made.append(kw["first_index"]) or generate(*a, **kw))
    out = sample_to_dir(ckpt, prompt, tmp_path / "set", **args)
    assert made == [2, 4], "only the missing batches are drawn"
    assert not partial.exists() and not (out / "raw" / torn.name).exists()
    for name in ("0000", "0001", "0002", "0003", "0004"):  # the same samples as the uninterrupted run
        assert (out / "raw" / f"{name}.txt").read_text() == (whole / "raw" / f"{name}.txt").read_text(), name
    assert (out / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["sampling"]["n"] == 5 and config["tokens_per_s"] > 0
    made.clear()
    assert sample_to_dir(ckpt, prompt, tmp_path / "set", **args) == out and made == [], "a complete set is kept"
    with pytest.raises(InputError, match=r"holds a sample set made with different settings \(sampling.n\)"):
        sample_to_dir(ckpt, prompt, tmp_path / "set", **{**args, "n": 6})


def test_an_unevaluated_set_is_evaluated_by_the_same_command(memorized, tmp_path, monkeypatch):
    import engine.evaluate.evaluation

    ckpt, _ = memorized
    (prompt,) = build_prompts("C2")
    args = dict(n=1, max_new_tokens=5, device="cpu")
    out = sample_to_dir(ckpt, prompt, tmp_path / "set", evaluate=False, **args)  # as if killed while evaluating
    evaluated = []
    monkeypatch.setattr(engine.evaluate.evaluation, "evaluate_sample_set", lambda folder: evaluated.append(folder))
    assert sample_to_dir(ckpt, prompt, tmp_path / "set", **args) == out
    assert evaluated == [out]


def test_a_sample_set_being_written_is_owned_by_one_process(memorized, tmp_path):
    import subprocess
    import sys

    from engine.lab.settings import REPO_ROOT

    ckpt, _ = memorized
    (prompt,) = build_prompts("C2")
    code = ("import sys, time; from engine.lab.jobs import hold_folder; hold_folder(sys.argv[1], 'sample set'); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".set.partial")], stdout=subprocess.PIPE,
                              text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"is in use by process {holder.pid} on "):
            sample_to_dir(ckpt, prompt, tmp_path / "set", n=1, max_new_tokens=5, device="cpu", evaluate=False)
    finally:
        holder.kill()
        holder.wait()
    assert sample_to_dir(ckpt, prompt, tmp_path / "set", n=1, max_new_tokens=5, device="cpu", evaluate=False)


def test_cli_samples_one_set_per_z_and_prints_a_summary(memorized, tmp_path, capsys):
    ckpt, _ = memorized
    rc = cli_main(["sample", "--ckpt", str(ckpt), "--prompt", "C", "--n", "2", "--max-new-tokens", "8",
                   "--seed", "1", "--out", str(tmp_path / "cli"), "--device", "cpu", "--no-evaluate"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["z1", "z2", "z3", "z4", "z6", "z8"]
    config = json.loads((tmp_path / "cli" / "z2" / "config.json").read_text())
    assert config["prompt"]["text"] == "data_C2\n" and config["sampling"]["n"] == 2
    assert "n 2" in capsys.readouterr().out
    rc = cli_main(["sample", "--ckpt", str(ckpt), "--prompt", "Xx2", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "Xx is not one of the 89 elements" in capsys.readouterr().err


def test_cli_finds_a_relative_checkpoint_under_the_runs_root(memorized, tmp_path, monkeypatch):
    ckpt, _ = memorized
    runs = get_settings().runs_dir
    (runs / "train" / "r1" / "ckpt").mkdir(parents=True)
    shutil.copy(ckpt, runs / "train" / "r1" / "ckpt" / "best.pt")
    monkeypatch.chdir(tmp_path)  # nothing named train/ here
    rc = cli_main(["sample", "--ckpt", "train/r1/ckpt/best.pt", "--prompt", "C2", "--n", "1",
                   "--max-new-tokens", "4", "--out", "rel", "--device", "cpu", "--no-evaluate"])
    assert rc == 0
    config = json.loads((runs / "samples" / "rel" / "config.json").read_text())
    assert config["checkpoint"]["path"] == str(runs / "train" / "r1" / "ckpt" / "best.pt")


def test_a_text_cut_at_max_new_tokens_is_a_truncated_failure_and_never_a_processed_cif(memorized, tmp_path, capsys):
    """Cut one token before its end, the memorized CIF looks complete, yet it was cut: no CIF, reason truncated."""
    ckpt, record = memorized
    formula = record["model_view"].split("\n", 1)[0].removeprefix("data_")
    (prompt,) = build_prompts(formula)
    budget = len(record["ids"]) - len(encode(prompt.text)) - 1  # stops before the final newline
    rc = cli_main(["sample", "--ckpt", str(ckpt), "--prompt", formula, "--n", "2", "--temperature", "0",
                   "--max-new-tokens", str(budget), "--out", str(tmp_path / "cut"), "--device", "cpu",
                   "--no-evaluate"])
    assert rc == 0
    out = tmp_path / "cut"
    assert (out / "raw" / "0000.txt").read_text() == record["decoded"][:-1]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(not r["finished"] and not r["postprocess_ok"] for r in records)
    assert {r["postprocess_reason"] for r in records} == {"truncated"}
    assert "max_new_tokens" in records[0]["postprocess_error"]
    assert list((out / "processed").iterdir()) == []
    line = capsys.readouterr().out
    assert "post-processed 0" in line and "2 cut at --max-new-tokens: raise it" in line and "parse ok" not in line


@pytest.mark.parametrize(("flag", "value"), [("--temperature", "nan"), ("--temperature", "inf"),
                                             ("--batch-size", "0")])
def test_cli_refuses_non_finite_temperature_and_zero_batch_size(memorized, tmp_path, capsys, flag, value):
    ckpt, _ = memorized
    rc = cli_main(["sample", "--ckpt", str(ckpt), "--prompt", "C2", "--n", "1", "--out", str(tmp_path / "x"),
                   "--device", "cpu", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "x").exists()

"""Scored decoding (engine.sample.mcts): the search prefers what the scorer rewards, stays grammatical, rewards only
valid complete CIFs, scores each crystal once, and refuses bad input in one line.

The model is a 2-layer GPT trained here (a few seconds) on two rock-salt NaCl cells that share the prompt
``data_Na4Cl4``: a = 5.64 A three times, a = 6.20 A once, so plain sampling writes the larger cell about a quarter
of the time. The scorer that prefers the larger cell (lower score = larger volume per atom) must lead the search to
it more often than plain sampling with the same number of completed CIFs.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from pymatgen.core import Lattice, Structure

from engine.cli import main as cli_main
from engine.crystal.canonical import structure_to_model_view
from engine.crystal.prompts import build_prompts
from engine.crystal.tokenizer import encode
from engine.crystal.vocab import ELEMENTS, STOI, TOKENS
from engine.evaluate.hull import Hull
from engine.evaluate.scorers import EHullScorer, RandomScorer, as_scorer, load_scorer
from engine.lab.errors import ConfigError, InputError
from engine.models.checkpoint import save_checkpoint
from engine.models.crystallm import CrystaLLMGPT
from engine.models.family import load_family_model, resolve_knobs
from engine.models.gpt import GPT, GPTConfig
from engine.sample.mcts import CrystalJudge, mcts_search, read_curve, require_tree_search, run_mcts
from engine.sample.mcts_tree import MCTSConfig, iter_nodes
from engine.sample.sampler import grammar_mask

SMALL, LARGE = 5.64, 6.20


def _cell(a: float) -> str:
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return structure_to_model_view(s)


def prefers_large(structure) -> float:
    """Lower is better: minus the volume per atom (the a = 6.20 cell scores lower)."""
    return -structure.volume / len(structure)


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory):
    """(checkpoint path, prompt) of the GPT that memorised 3 x NaCl(a = 5.64) + 1 x NaCl(a = 6.20)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        texts = [_cell(SMALL)] * 3 + [_cell(LARGE)]
        ids = torch.tensor([encode(t) for t in texts])  # (4, T): both cells have the same token count
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=ids.shape[1]))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(150):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.03, loss.item()  # memorised (the 5.64 / 6.20 choice alone costs ~0.002)
        path = tmp_path_factory.mktemp("mcts") / "ckpt.pt"
        save_checkpoint(path, model=model, iter_num=150, best_val_loss=None, config={}, meta={"run": "two-cells"})
    finally:
        torch.set_num_threads(before)
    return path, build_prompts("Na4Cl4")[0]


@pytest.fixture
def model(two_cells):
    torch.set_num_threads(1)
    return load_family_model(two_cells[0], "cpu")


def _knobs(**over):
    return resolve_knobs(CrystaLLMGPT, {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "max_new_tokens": 300, **over})


def _is_large(text: str) -> bool:
    return f"_cell_length_a {LARGE:.4f}" in text


def test_search_finds_the_preferred_crystal_more_often_than_plain_sampling(model, two_cells):
    prompt, budget = two_cells[1], 16
    plain = model.generate(prompt, budget, _knobs(), seed=3)
    plain_hits = sum(_is_large(g.text) for g in plain)
    texts = []
    # PUCT with c = 1: rewards lie in (0, 1), and CrystaLLM's c = 5 spends 16 simulations mostly on the prior.
    result = mcts_search(model, prompt, prefers_large, MCTSConfig(simulations=budget, seed=3, c=1.0), _knobs(),
                         on_record=lambda r: texts.append(r["text"]))
    assert len(texts) == budget  # the same number of completed texts as plain sampling
    mcts_hits = sum(_is_large(t) for t in texts)
    assert sum(r["status"] == "rewarded" for r in result.records) >= budget - 2  # memorised: nearly all valid
    assert mcts_hits > plain_hits and mcts_hits >= budget // 2, (mcts_hits, plain_hits)
    assert result.best(1)[0][1]["score"] == pytest.approx(-(LARGE**3) / 8, rel=1e-3)


def test_random_scorer_search_is_deterministic_for_a_seed(model, two_cells):
    def run(seed):
        result = mcts_search(model, two_cells[1], RandomScorer(seed), MCTSConfig(simulations=6, seed=seed,
                             rollouts=2), _knobs())
        return [(r["simulation"], r["rollout"], r["key"], r["score"], r["reward"]) for r in result.records]

    first = run(7)  # a simulation ending on a complete CIF in the tree judges that one text, not 2 rollouts
    assert 6 <= len(first) <= 12 and first == run(7)
    assert first != run(8)


def test_only_grammatical_children_are_expanded(two_cells):
    torch.manual_seed(1)
    untrained = CrystaLLMGPT(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=512)).eval(), None, None,
                             torch.device("cpu"))
    prompt, knobs = two_cells[1], _knobs()
    hm = encode(prompt.text) + [STOI["_symmetry_space_group_name_H-M"], STOI[" "]]
    from engine.sample.mcts_tree import Node, expand

    node = Node(None, None)
    kids = expand(node, untrained.next_token_logits(hm, prompt, knobs), MCTSConfig(), 1.0)
    assert len(kids) == 10 and all(TOKENS[k.token].endswith("_sg") for k in kids)
    line_start = encode(prompt.text)  # a new line begins: rows of atom loops start with an element
    kids = expand(Node(None, None), untrained.next_token_logits(line_start, prompt, knobs), MCTSConfig(), 1.0)
    elements = {TOKENS[k.token] for k in kids} & set(ELEMENTS)
    assert elements <= {"Na", "Cl"}
    # In a whole search every child is a token the sampler's constraints allow after its parent's prefix.
    result = mcts_search(untrained, prompt, RandomScorer(0), MCTSConfig(simulations=4, tree_width=6),
                         _knobs(max_new_tokens=20))
    root_ids = encode(prompt.text)
    checked = 0
    for parent in iter_nodes(result.root):
        if not parent.children:
            continue
        prefix = parent.prefix(root_ids)
        allowed = grammar_mask(prefix, torch.zeros(1, len(TOKENS)), prompt.elements, True)[0] > float("-inf")
        assert all(bool(allowed[ch.token]) for ch in parent.children)
        checked += 1
    assert checked >= 2


def test_incomplete_or_invalid_cifs_never_get_a_reward(model, two_cells):
    calls = []

    def scorer(structure):
        calls.append(1)
        return 0.0

    judge = CrystalJudge(as_scorer(scorer), two_cells[1], MCTSConfig())  # reference: the first valid score
    good = _cell(SMALL)
    assert judge.judge(good[:-40], False)["reward"] is None  # cut at the token budget
    assert judge.judge(good[:-40], None)["status"] == "incomplete"
    broken = good.replace("Na Na0 4 ", "Na Na0 2 ")  # multiplicity no longer matches the formula
    verdict = judge.judge(broken, True)
    assert verdict["status"] == "invalid" and verdict["reward"] is None and not calls
    assert judge.judge(good, True)["reward"] == pytest.approx(0.5) and len(calls) == 1
    # A search whose texts are all cut short backs up nothing.
    result = mcts_search(model, two_cells[1], scorer, MCTSConfig(simulations=3), _knobs(max_new_tokens=30))
    assert all(r["reward"] is None and r["status"] == "incomplete" for r in result.records)
    assert result.root.visits == 3 and result.root.value_sum == 0.0


def test_the_score_cache_calls_the_scorer_once_per_crystal(model, two_cells):
    calls = []

    def counting(structure):
        calls.append(structure.composition.reduced_formula)
        return prefers_large(structure)

    result = mcts_search(model, two_cells[1], counting, MCTSConfig(simulations=10), _knobs())
    rewarded = [r for r in result.records if r["status"] == "rewarded"]
    assert len(rewarded) > len({r["key"] for r in rewarded}) and len(calls) == len(result.judge.scores) <= 3
    # A different text of the same crystal (other site labels) is recognised by its structure, not its text.
    judge = CrystalJudge(as_scorer(counting), two_cells[1], MCTSConfig())
    calls.clear()
    a = judge.judge(_cell(SMALL), True)
    b = judge.judge(_cell(SMALL).replace("Na Na0", "Na Na7"), True)
    assert a["key"] == b["key"] and b["cached"] and len(calls) == 1 and judge.cache_hits == 1


def test_a_scorer_that_raises_is_recorded_and_the_search_carries_on(model, two_cells):
    def picky(structure):
        if structure.volume / len(structure) > 25:
            raise RuntimeError("cannot score big cells")
        return 0.0

    result = mcts_search(model, two_cells[1], picky, MCTSConfig(simulations=12, c=50.0), _knobs())
    assert len(result.records) == 12
    failed = [r for r in result.records if r["status"] == "score_failed"]
    assert failed and all(r["reward"] is None and "cannot score big cells" in r["score_error"] for r in failed)
    assert any(r["status"] == "rewarded" for r in result.records)


def test_bad_input_is_refused_in_one_line(tmp_path, two_cells, capsys):
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        load_scorer("no_such_module_xyz:score")
    with pytest.raises(ConfigError, match="simulations"):
        MCTSConfig(simulations=0).check()
    with pytest.raises(ConfigError, match="next-token logits"):
        require_tree_search(object())
    hull = Hull("na-only", "potential", "chgnet", pd.DataFrame(
        [{"id": "1", "formula": "Na", "energy_per_atom": -1.3, "kind": "element", "source": "test"}]))
    with pytest.raises(InputError, match="does not cover Cl"):
        EHullScorer(hull).check_prompt(["Na", "Cl"])
    hull.save(tmp_path / "na-only")
    ckpt = str(two_cells[0])
    for argv, needle in [
        (["--scorer", "random", "--simulations", "0"], "simulations = 0"),
        (["--scorer", "random", "--simulations", "-3"], "simulations = -3"),
        (["--scorer", "no_such_module_xyz:f"], "no_such_module_xyz"),
        (["--scorer", "ehull", "--hull", str(tmp_path / "na-only")], "does not cover Cl"),
    ]:
        assert cli_main(["mcts", "--ckpt", ckpt, "--prompt", "Na4Cl4", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_cli_writes_log_curve_and_an_evaluated_best_set(two_cells, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["mcts", "--ckpt", str(two_cells[0]), "--prompt", "Na4Cl4", "--scorer", "random",
                     "--simulations", "5", "--temperature", "1.0", "--max-new-tokens", "300", "--device", "cpu",
                     "--out", str(out), "--n-best", "2"])
    assert code == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "mcts_log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and all("text" in r and "score" in r and "simulation" in r for r in log)
    curve = read_curve(out)
    assert [r["simulation"] for r in curve] == [1, 2, 3, 4, 5]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scorer_calls"] == summary["n_distinct_valid"] and summary["simulations_per_s"] > 0
    best = out / "best"
    assert (best / "eval.csv").is_file() and (best / "config.json").is_file()
    assert len((best / "samples.jsonl").read_text().splitlines()) == len(summary["best"]) >= 1
    assert json.loads((best / "config.json").read_text())["sampling"]["method"] == "mcts"


def test_run_mcts_refuses_a_used_folder(model, two_cells, tmp_path):
    (tmp_path / "x.txt").write_text("something")
    with pytest.raises(InputError, match="not empty"):
        run_mcts(model, two_cells[1], RandomScorer(0), tmp_path, MCTSConfig(simulations=1), _knobs())

"""Scored decoding: CrystaLLM's Monte Carlo tree search over the token tree, with an in-process scorer.

Each simulation walks the tree (`engine.sample.mcts_tree`) from the prompt with the selector, expands the leaf it
reaches (grammatical children only), steps into one new child and decodes ``rollouts`` completions from there in
one batch (the family's ``continue_ids``: one prefill, KV cache). Every completed text is judged (`CrystalJudge`):
post-processed, checked (CrystaLLM validity with the bond-length cutoff of the config), identified by its
canonical structure (reduced formula + pymatgen ``StructureMatcher``) and, once per distinct crystal, scored. Only a
valid crystal with a score earns a reward (`engine.sample.mcts_tree.reward_of`); an incomplete, unparsable or
invalid text, or one the scorer fails on, backs up 0. The simulation's value is the mean over its rollouts.

Any family whose model has the token-level capability (``prompt_ids``, ``decode_ids``, ``next_token_logits``,
``continue_ids``; the CrystaLLM GPT family has it) can be searched; others are refused in one line.

Output folder (``crystallab mcts --out DIR``):

```
DIR/mcts.json         the request: prompt, search settings, sampling knobs, scorer, checkpoint (written first)
DIR/mcts_log.jsonl    one line per completed text, as found (append-only): simulation, rollout, status, reason,
                      key, formula, score, reward, cached, score_error, text
DIR/best_so_far.csv   one row per simulation (append-only): simulation, elapsed_s, n_texts, n_valid, n_distinct,
                      n_scorer_calls, best_score
DIR/summary.json      counts, simulations per second, scorer calls and cache hits, the best crystals
DIR/best/             an ordinary sample set (raw/, processed/, samples.jsonl, config.json, eval.csv) of the
                      ``n_best`` distinct valid crystals with the lowest scores
```
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine import __version__
from engine.evaluate.scorers import ScoreFailure, Scorer, as_scorer
from engine.lab.errors import ConfigError, InputError
from engine.lab.fsutil import append_jsonl, atomic_write_json, atomic_write_text
from engine.sample.mcts_tree import SELECTORS, MCTSConfig, Node, backup, expand, reward_of, select_child

TOKEN_METHODS = ("prompt_ids", "decode_ids", "next_token_logits", "continue_ids")
"""What a family model needs for tree search (module docstring)."""
LOG_FILE, CURVE_FILE, REQUEST_FILE, SUMMARY_FILE, BEST_DIR = (
    "mcts_log.jsonl", "best_so_far.csv", "mcts.json", "summary.json", "best")
SAME_CRYSTAL = {"ltol": 0.01, "stol": 0.05, "angle_tol": 1.0, "scale": False}
"""StructureMatcher tolerances under which two CIFs are one crystal for the score cache: lattice lengths within
1 %, angles within 1 degree, sites within 0.05 (of the average free length per atom), no volume scaling (pymatgen's
defaults would merge the same structure type at different cell sizes, whose energies differ)."""
CURVE_FIELDS = ("simulation", "elapsed_s", "n_texts", "n_valid", "n_distinct", "n_scorer_calls", "best_score")


def supports_tree_search(model: Any) -> bool:
    """Whether ``model`` exposes next-token logits and batched continuations (the token-level capability)."""
    return all(callable(getattr(model, name, None)) for name in TOKEN_METHODS)


def require_tree_search(model: Any) -> None:
    """Raises ConfigError when ``model`` cannot be searched token by token."""
    if not supports_tree_search(model):
        raise ConfigError(f"the {getattr(model, 'family', type(model).__name__)} family exposes no next-token "
                          "logits, so MCTS cannot search it: use an autoregressive checkpoint, or `crystallab sample`")


# ----------------------------------------------------------------------------------------------------------------
# Judging completed texts


class CrystalJudge:
    """Completed text -> post-processed CIF -> validity -> canonical crystal -> score (cached) -> reward.

    The scorer is called at most once per distinct crystal: processed CIF texts seen before reuse their verdict,
    and a new CIF whose structure matches a known one of the same reduced formula (``StructureMatcher``) reuses
    that crystal's score (``cached`` True).
    """

    def __init__(self, scorer: Scorer, prompt: Any, config: MCTSConfig) -> None:
        from pymatgen.analysis.structure_matcher import StructureMatcher

        self.scorer, self.prompt, self.config = scorer, prompt, config
        self.reference: float | None = scorer.reference
        self.scores: dict[str, dict] = {}  # key -> {"score", "error", "cif", "text"}
        self._by_formula: dict[str, list[tuple[Any, str]]] = {}  # reduced formula -> [(structure, key)]
        self._by_cif: dict[str, dict] = {}  # sha256 of processed CIF -> the verdict (status, reason, key, ...)
        self._matcher = StructureMatcher(**SAME_CRYSTAL)
        self.scorer_calls = 0
        self.cache_hits = 0

    def judge(self, text: str, finished: bool | None) -> dict:
        """``{status, reason, key, formula, score, reward, cached, score_error}`` of one generated text; ``status``
        is ``rewarded``, ``score_failed``, ``invalid`` or ``incomplete`` (did not post-process)."""
        from engine.crystal.postprocess import postprocess

        out = {"status": "incomplete", "reason": None, "key": None, "formula": None, "score": None,
               "reward": None, "cached": False, "score_error": None}
        result = postprocess(text, finished)
        if result.cif is None:
            return {**out, "reason": result.reason}
        digest = hashlib.sha256(result.cif.encode()).hexdigest()
        verdict = self._by_cif.get(digest)
        if verdict is None:
            verdict = self._by_cif[digest] = self._check(result.cif, text)
        else:
            verdict = {**verdict, "cached": verdict["status"] in ("rewarded", "score_failed")}
        if verdict["status"] == "rewarded":
            verdict = {**verdict, "reward": reward_of(verdict["score"], self.reference, self.config.reward_k)}
        return {**out, **verdict}

    def _check(self, cif: str, text: str) -> dict:
        from engine.evaluate.checks import check_cif, parse_structure

        row = check_cif(cif, self.prompt.to_dict() if self.prompt is not None else None)
        score = row.get("bond_length_score")
        valid = bool(row.get("formula_consistent") and row.get("multiplicity_consistent")
                     and row.get("space_group_consistent") and score is not None
                     and score >= self.config.bond_length_cutoff)
        formula = row.get("reduced_formula")
        if not valid:
            why = row.get("failure_reason") or _first_failed_check(row, self.config.bond_length_cutoff)
            return {"status": "invalid", "reason": why, "formula": formula}
        structure, _, _ = parse_structure(cif)
        key, known = self._key(structure, formula)
        if known:
            self.cache_hits += 1
        else:
            self.scorer_calls += 1
            try:
                value, error = self.scorer(structure), None
            except ScoreFailure as exc:
                value, error = None, str(exc)
            self.scores[key] = {"score": value, "error": error, "cif": cif, "text": text}
            if value is not None and self.reference is None:
                self.reference = value  # the first valid crystal's score earns reward 0.5 from now on
        entry = self.scores[key]
        status = "rewarded" if entry["score"] is not None else "score_failed"
        return {"status": status, "reason": None if entry["error"] is None else "score_failed", "key": key,
                "formula": formula, "score": entry["score"], "score_error": entry["error"], "cached": known}

    def _key(self, structure: Any, formula: str) -> tuple[str, bool]:
        """(canonical key, whether the crystal was seen before): ``FORMULA#i``, the i-th distinct structure."""
        seen = self._by_formula.setdefault(formula, [])
        for other, key in seen:
            if self._matcher.fit(structure, other):
                return key, True
        key = f"{formula}#{len(seen)}"
        seen.append((structure, key))
        return key, False


def _first_failed_check(row: dict, cutoff: float) -> str:
    for name in ("formula_consistent", "multiplicity_consistent", "space_group_consistent"):
        if not row.get(name):
            return f"{name.replace('_consistent', '')}_inconsistent"
    return f"bond_length_score<{cutoff:g}"


# ----------------------------------------------------------------------------------------------------------------
# The search


@dataclass
class SearchResult:
    """What one search found."""

    records: list[dict] = field(default_factory=list)
    """One per completed text, in the order found (the lines of ``mcts_log.jsonl``, without the text)."""
    root: Node | None = None
    judge: CrystalJudge | None = None
    elapsed_s: float = 0.0
    n_new_tokens: int = 0

    def best(self, n: int) -> list[tuple[str, dict]]:
        """The ``n`` distinct scored crystals with the lowest scores: ``[(key, {"score", "cif", "text"})]``."""
        scored = [(k, v) for k, v in self.judge.scores.items() if v["score"] is not None]
        return sorted(scored, key=lambda kv: (kv[1]["score"], kv[0]))[:n]


def _ends_cif(text: str) -> bool:
    return text.endswith("\n\n")


def mcts_search(
    model: Any,
    prompt: Any,
    scorer: Scorer | Callable[[Any], float],
    config: MCTSConfig,
    knobs: dict,
    *,
    on_record: Callable[[dict], None] | None = None,
    on_simulation: Callable[[int, SearchResult], None] | None = None,
) -> SearchResult:
    """Run ``config.simulations`` simulations for ``prompt`` (module docstring).

    Args:
        model: A family model with the token-level capability (`supports_tree_search`).
        knobs: The family's sampling knobs, resolved (temperature, top_k, top_p, max_new_tokens, constrain): the
            rollouts use them, and ``max_new_tokens`` bounds each completed text below the prompt.
        on_record: Called with each completed text's record (its ``text`` included), as it is judged.
        on_simulation: Called with ``(simulation index, result so far)`` after each simulation.

    Raises:
        ConfigError: a bad setting, or a model without next-token logits.
    """
    config.check()
    require_tree_search(model)
    scorer = as_scorer(scorer)
    judge = CrystalJudge(scorer, prompt, config)
    root_ids = list(model.prompt_ids(prompt))
    result = SearchResult(root=Node(None, None), judge=judge)
    temperature, budget = float(knobs.get("temperature", 1.0)), int(knobs.get("max_new_tokens", 3000))
    t0 = time.perf_counter()
    for sim in range(config.simulations):
        node = result.root
        while node.expanded and node.children:  # selection
            node = select_child(node, config)
        ids = node.prefix(root_ids)
        # Expansion. A node left with one child (the top child reached the cutoff) is expanded through at once,
        # so one simulation reaches the next real choice instead of growing the tree one forced token at a time.
        while not node.expanded and not node.terminal and node.depth < config.max_depth \
                and len(ids) - len(root_ids) < budget:
            if _ends_cif(model.decode_ids(ids)):
                node.terminal = node.expanded = True
                break
            logits = model.next_token_logits(ids, prompt, knobs)  # (V,)
            if not expand(node, logits, config, temperature, knobs.get("top_k"), knobs.get("top_p", 1.0)):
                break
            node = select_child(node, config)
            ids.append(node.token)
            if len(node.parent.children) > 1:
                break
        text = model.decode_ids(ids)
        if node.terminal or _ends_cif(text):
            node.terminal = True
            texts = [(text, True if _ends_cif(text) else None, 0)]
        elif len(ids) - len(root_ids) >= budget:
            texts = [(text, False, 0)]
        else:  # rollouts, decoded together
            left = budget - (len(ids) - len(root_ids))
            gens = model.continue_ids(ids, config.rollouts, prompt, knobs, seed=config.seed,
                                      first_index=sim * config.rollouts, max_new_tokens=left)
            texts = [(g.text, g.finished, g.n_new_tokens) for g in gens]
        values = []
        for r, (full, finished, new) in enumerate(texts):
            result.n_new_tokens += new
            verdict = judge.judge(full, finished)
            record = {"simulation": sim, "rollout": r, "depth": node.depth, "finished": finished, **verdict,
                      "elapsed_s": round(time.perf_counter() - t0, 3)}
            result.records.append(record)
            if on_record is not None:
                on_record({**record, "text": full})
            values.append(verdict["reward"] or 0.0)
        backup(node, sum(values) / len(values))  # backpropagation
        result.elapsed_s = time.perf_counter() - t0
        if on_simulation is not None:
            on_simulation(sim, result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Output folder


def _curve_row(sim: int, result: SearchResult) -> dict:
    scores = [v["score"] for v in result.judge.scores.values() if v["score"] is not None]
    return {"simulation": sim + 1, "elapsed_s": round(result.elapsed_s, 3), "n_texts": len(result.records),
            "n_valid": sum(r["status"] in ("rewarded", "score_failed") for r in result.records),
            "n_distinct": len(result.judge.scores), "n_scorer_calls": result.judge.scorer_calls,
            "best_score": min(scores) if scores else ""}


def run_mcts(
    model: Any,
    prompt: Any,
    scorer: Scorer,
    out_dir: str | Path,
    config: MCTSConfig,
    knobs: dict,
    *,
    evaluate: bool = True,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Search, writing the output folder (module docstring) as it goes; returns ``summary.json``'s contents.

    Raises:
        InputError: ``out_dir`` is not empty, or is in use by another process.
        ConfigError: as `mcts_search`.
    """
    from engine.lab.jobs import hold_folder
    from engine.models.family import provenance

    config.check()
    require_tree_search(model)
    out = Path(out_dir)
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise InputError(f"MCTS output folder {out} is not empty; choose a new --out")
    with hold_folder(out, "MCTS run"):
        request = {"prompt": prompt.to_dict(), "mcts": config.as_dict(),
                   "sampling": model.sampling_record(prompt, knobs),
                   "scorer": scorer.describe(), "checkpoint": provenance(model), "device": str(model.device),
                   "version": __version__,
                   "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(out / REQUEST_FILE, json.loads(json.dumps(request, default=str)))
        atomic_write_text(out / CURVE_FILE, ",".join(CURVE_FIELDS) + "\n")

        def on_simulation(sim: int, result: SearchResult) -> None:
            row = _curve_row(sim, result)
            with open(out / CURVE_FILE, "a", encoding="utf-8") as fh:
                fh.write(",".join(str(row[k]) for k in CURVE_FIELDS) + "\n")
            if progress is not None:
                progress(sim + 1, config.simulations, row)

        result = mcts_search(model, prompt, scorer, config, knobs, on_record=lambda r: append_jsonl(out / LOG_FILE, r),
                             on_simulation=on_simulation)
        best = result.best(config.n_best)
        summary = _summary(result, config, best)
        if best:
            _write_best_set(out / BEST_DIR, best, request, result, evaluate)
        atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _summary(result: SearchResult, config: MCTSConfig, best: list[tuple[str, dict]]) -> dict:
    recs = result.records
    return {
        "simulations": config.simulations, "elapsed_s": round(result.elapsed_s, 3),
        "simulations_per_s": round(config.simulations / result.elapsed_s, 4) if result.elapsed_s > 0 else None,
        "n_texts": len(recs), "n_incomplete": sum(r["status"] == "incomplete" for r in recs),
        "n_invalid": sum(r["status"] == "invalid" for r in recs),
        "n_valid": sum(r["status"] in ("rewarded", "score_failed") for r in recs),
        "n_score_failed": sum(r["status"] == "score_failed" for r in recs),
        "n_distinct_valid": len(result.judge.scores), "scorer_calls": result.judge.scorer_calls,
        "cache_hits": result.judge.cache_hits, "reward_reference": result.judge.reference,
        "n_new_tokens": result.n_new_tokens,
        "best": [{"key": k, "score": v["score"]} for k, v in best],
    }


def _write_best_set(folder: Path, best: list[tuple[str, dict]], request: dict, result: SearchResult,
                    evaluate: bool) -> None:
    """The best crystals as a sample set (same layout as `engine.sample.sample_sets`), then evaluated."""
    from engine.crystal.postprocess import postprocess

    (folder / "raw").mkdir(parents=True, exist_ok=True)
    (folder / "processed").mkdir(exist_ok=True)
    found = {}
    for r in result.records:
        found.setdefault(r["key"], r)
    lines = []
    for i, (key, entry) in enumerate(best):
        name = f"{i:04d}"
        atomic_write_text(folder / "raw" / f"{name}.txt", entry["text"])
        atomic_write_text(folder / "processed" / f"{name}.cif", entry["cif"])
        rec = found.get(key, {})
        lines.append(json.dumps({
            "index": i, "name": name, "n_new_tokens": None, "finished": True, "truncated_reason": None,
            "postprocess_ok": True, "postprocess_reason": None, "postprocess_error": None,
            "spacegroup": postprocess(entry["text"], True).spacegroup, "mcts_key": key, "score": entry["score"],
            "simulation": rec.get("simulation"), "reward": rec.get("reward"),
        }, sort_keys=True) + "\n")
    atomic_write_text(folder / "samples.jsonl", "".join(lines))
    elapsed = result.elapsed_s
    config = {
        "prompt": request["prompt"], "checkpoint": request["checkpoint"],
        "sampling": {"n": len(best), **request["sampling"], "method": "mcts", "seed": request["mcts"]["seed"],
                     "mcts": request["mcts"], "scorer": request["scorer"]},
        "device": request["device"], "elapsed_s": round(elapsed, 3),
        "n_new_tokens": result.n_new_tokens,
        "tokens_per_s": round(result.n_new_tokens / elapsed, 1) if elapsed > 0 else None,
        "samples_per_s": round(len(best) / elapsed, 3) if elapsed > 0 else None,
        "created_at": request["created_at"], "version": __version__,
    }
    atomic_write_json(folder / "config.json", json.loads(json.dumps(config, default=str)))
    if evaluate:
        from engine.evaluate.evaluation import evaluate_sample_set

        evaluate_sample_set(folder, workers=1)


def read_curve(out_dir: str | Path) -> list[dict]:
    """The best-so-far rows written so far (the page draws them live); empty before the first simulation."""
    path = Path(out_dir) / CURVE_FILE
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        parts = line.split(",")
        if len(parts) != len(CURVE_FIELDS):
            continue  # a row being written
        row = dict(zip(CURVE_FIELDS, parts))
        rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _run_cli(args: argparse.Namespace) -> int:
    from engine.crystal.prompts import build_prompts
    from engine.evaluate.scorers import load_scorer
    from engine.lab.settings import get_settings
    from engine.models.checkpoint import cli_checkpoint_path
    from engine.models.crystallm import CrystaLLMGPT
    from engine.models.family import knobs_from_args, load_family_model
    from engine.sample.sampler import resolve_device

    config = MCTSConfig(
        simulations=args.simulations, tree_width=args.tree_width, max_depth=args.max_depth, selector=args.selector,
        c=args.c, rollouts=args.rollouts, top_child_cutoff=args.top_child_cutoff, reward_k=args.reward_k,
        bond_length_cutoff=args.bond_length_cutoff, seed=args.seed, n_best=args.n_best).check()
    prompts = build_prompts(args.prompt, z=args.z, spacegroup=args.sg)
    if len(prompts) != 1:
        raise ConfigError(f"--prompt {args.prompt} stands for {len(prompts)} cells (Z = 1, 2, 3, 4, 6, 8): give --z "
                          "or a cell composition (Na4Cl4); MCTS searches one prompt")
    prompt = prompts[0]
    scorer = load_scorer(args.scorer, hull=args.hull, potential=args.potential, seed=args.seed, device=args.device)
    scorer.check_prompt(prompt.elements)
    out = Path(args.out).expanduser()
    out = out if out.is_absolute() else get_settings().samples_dir / out
    model = load_family_model(cli_checkpoint_path(args.ckpt), resolve_device(args.device))
    require_tree_search(model)
    knobs = knobs_from_args(args, CrystaLLMGPT.knobs, type(model))

    def progress(done: int, total: int, row: dict) -> None:
        best = row["best_score"]
        print(f"[{done}/{total}] texts {row['n_texts']}, valid {row['n_valid']}, distinct {row['n_distinct']}, "
              f"best {best if best == '' else f'{best:.4g}'}", file=sys.stderr, flush=True)

    summary = run_mcts(model, prompt, scorer, out, config, knobs, evaluate=args.evaluate, progress=progress)
    best = summary["best"][0]["score"] if summary["best"] else None
    print(f"{prompt.label}: {summary['simulations']} simulations in {summary['elapsed_s']:.1f} s "
          f"({summary['simulations_per_s']} /s), {summary['n_texts']} texts, {summary['n_valid']} valid, "
          f"{summary['n_distinct_valid']} distinct, {summary['scorer_calls']} scorer calls, best "
          f"{scorer.name} {best if best is None else f'{best:.4g}'} {scorer.unit}  ->  {out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab mcts``."""
    from engine.models.family import add_knob_arguments
    from engine.sample.sample_sets import _gpt_knobs

    d = MCTSConfig()
    p = subparsers.add_parser(
        "mcts", help="scored decoding: Monte Carlo tree search rewarded by a scorer (E_hull, energy, your own)",
        description="CrystaLLM-style Monte Carlo tree search over the token tree of an autoregressive checkpoint, "
        "rewarding completed valid CIFs by a scorer (lower score = better). Writes mcts.json, mcts_log.jsonl, "
        "best_so_far.csv, summary.json and the best crystals as a sample set in OUT/best.")
    p.add_argument("--ckpt", required=True, help="checkpoint file of an autoregressive family")
    p.add_argument("--prompt", default=None, help="cell composition (Na4Cl4) or formula unit with --z")
    p.add_argument("--z", type=int, default=None, help="formula units per cell (with a formula unit)")
    p.add_argument("--sg", default=None, help="space group: symbol or number")
    p.add_argument("--scorer", required=True, help="ehull (needs --hull), energy, random, or module.path:function "
                   "(a callable taking a pymatgen Structure, returning a float; lower = better)")
    p.add_argument("--hull", default=None, help="hull name or folder for --scorer ehull (crystallab hull build)")
    p.add_argument("--potential", default=None, help="ML potential of ehull/energy (default: the hull's, or chgnet)")
    p.add_argument("--simulations", type=int, default=d.simulations, help=f"simulations (default {d.simulations})")
    p.add_argument("--tree-width", type=int, default=d.tree_width, help=f"children per node (default {d.tree_width})")
    p.add_argument("--max-depth", type=int, default=d.max_depth, help=f"deepest expanded node, tokens below the "
                   f"prompt (default {d.max_depth})")
    p.add_argument("--selector", choices=SELECTORS, default=d.selector, help=f"default {d.selector}")
    p.add_argument("--c", type=float, default=d.c, help=f"PUCT/UCT exploration constant (default {d.c:g})")
    p.add_argument("--rollouts", type=int, default=d.rollouts, help=f"rollouts per simulation, decoded as one batch "
                   f"(default {d.rollouts})")
    p.add_argument("--top-child-cutoff", type=float, default=d.top_child_cutoff, help="a child this likely is the "
                   f"only one (default {d.top_child_cutoff:g})")
    p.add_argument("--reward-k", type=float, default=d.reward_k, help=f"reward constant k (default {d.reward_k:g})")
    p.add_argument("--bond-length-cutoff", type=float, default=d.bond_length_cutoff, help="smallest bond-length "
                   f"acceptability score of a rewarded CIF (default {d.bond_length_cutoff:g})")
    p.add_argument("--n-best", type=int, default=d.n_best, help=f"crystals in OUT/best (default {d.n_best})")
    add_knob_arguments(p, _gpt_knobs())
    p.add_argument("--seed", type=int, default=d.seed, help="seed of rollouts and the random scorer "
                   f"(default {d.seed})")
    p.add_argument("--out", required=True, help="output folder (relative: under <runs>/samples)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="do not evaluate OUT/best")
    p.set_defaults(func=_run_cli)


"""Set-level metrics of an evaluation table: rates, uniqueness, novelty, and their macro-average over prompts.

Every metric is reported with the definition it was computed by (`METRIC_DEFINITIONS`): numbers are only
comparable across papers when the definitions match (see shared/reference/evaluation.md).

Uniqueness and novelty use pymatgen `StructureMatcher()` defaults (ltol 0.2, stol 0.3, angle_tol 5 degrees).
Structures are bucketed by *reduced formula* (CrystaLLM's script buckets by cell composition, which counts a
structure and its doubled cell as two compositions); ``group_structures`` runs inside each bucket. Novelty compares
each distinct valid structure with the training structures of the same reduced formula (`TrainingIndex`, which
decodes and parses a formula's training CIFs only when that formula is first looked up).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from engine.crystal.postprocess import postprocess
from engine.evaluate.checks import parse_structure, prompt_targets

METRIC_DEFINITIONS: dict[str, str] = {
    "n": "number of samples evaluated",
    "parse_rate": "samples whose post-processed CIF parsed into a complete pymatgen Structure / n "
    "(CrystaLLM's own sample reports call this 'validity')",
    "validity": "CrystaLLM-valid samples (formula and multiplicity consistent, bond-length score 1.0, space group "
    "consistent at symprec 0.1) / n",
    "uniqueness_all": "distinct structures among parsed, analysed samples / n (StructureMatcher() defaults, "
    "grouped within reduced-formula buckets)",
    "uniqueness_valid": "distinct structures among CrystaLLM-valid samples / n (same matcher and buckets)",
    "novelty": "distinct valid structures absent from the training set / distinct valid structures (novel: "
    "reduced formula unseen in training, or no StructureMatcher() match among training structures of it)",
    "unique_novel_valid_rate": "distinct valid structures absent from the training set / n",
    "cdvae_struct_validity": "samples with all distinct-site distances >= 0.5 A and volume >= 0.1 A^3 / n (CDVAE)",
    "smact_validity": "samples whose composition passes smact_validity(oxidation_states_set='smact14') / n (CDVAE)",
    "cdvae_validity": "samples both CDVAE-structurally and SMACT-compositionally valid / n",
    "formula_hit_rate": "samples whose cell composition equals the prompt's / n (None without a prompt composition)",
    "spacegroup_hit_rate": "samples whose detected space group (symprec 0.1) equals the prompt's / n "
    "(None without a prompt space group)",
    "distinct_formulas": "number of distinct reduced formulas among parsed samples",
    "distinct_spacegroups": "number of distinct detected space groups (symprec 0.1) among parsed samples",
    "formula_counts": "parsed samples per reduced formula",
    "failure_counts": "samples per failure_reason (truncated: cut at the token limit; malformed: the CIF ended with "
    "a broken atom-site loop; postprocess_failed, parse categories, too_many_sites, absurd_volume, timeout, ...)",
    "mean_valid_length": "mean generated length in tokens over CrystaLLM-valid samples",
}


def _rate(mask: pd.Series, n: int) -> float | None:
    return float(mask.sum()) / n if n else None


def _true(df: pd.DataFrame, column: str) -> pd.Series:
    return df[column].map(lambda v: v is True or v == True)  # noqa: E712 (numpy / pandas booleans)


def _group(structures: list[Structure], matcher: StructureMatcher) -> list[list[int]]:
    """Indices of ``structures`` grouped into matching sets, bucketed by reduced formula."""
    buckets: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(structures):
        buckets[s.composition.reduced_formula].append(i)
    groups = []
    for formula in sorted(buckets):
        idx = buckets[formula]
        if len(idx) == 1:
            groups.append(idx)
            continue
        by_id = {id(structures[i]): i for i in idx}
        for group in matcher.group_structures([structures[i] for i in idx]):
            groups.append(sorted(by_id[id(s)] for s in group))
    return groups


class TrainingIndex:
    """Training structures bucketed by reduced formula; a bucket is decoded and parsed on first lookup.

    Build with `from_dataset` (a token dataset folder) or `from_cifs` (CIF texts or Structures).
    """

    def __init__(self, buckets: dict[str, list[Any]], load: Callable[[Any], Structure | None]) -> None:
        self._buckets = buckets
        self._load = load
        self._parsed: dict[str, list[Structure]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._buckets.values())

    def __contains__(self, reduced_formula: str) -> bool:
        return reduced_formula in self._buckets

    @property
    def formulas(self) -> set[str]:
        return set(self._buckets)

    def structures(self, reduced_formula: str) -> list[Structure]:
        """The parsed training structures of ``reduced_formula`` (unparseable entries are left out)."""
        if reduced_formula not in self._parsed:
            loaded = (self._load(src) for src in self._buckets.get(reduced_formula, ()))
            self._parsed[reduced_formula] = [s for s in loaded if s is not None]
        return self._parsed[reduced_formula]

    def is_novel(self, structure: Structure, matcher: StructureMatcher | None = None) -> bool:
        """True when no training structure of the same reduced formula matches ``structure``."""
        matcher = matcher or StructureMatcher()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return not any(matcher.fit(structure, t) for t in self.structures(structure.composition.reduced_formula))

    @classmethod
    def from_cifs(cls, cifs: Iterable[str | Structure]) -> TrainingIndex:
        """Index CIF texts (full, or CrystaLLM's semi-symmetrized model view) or Structures."""
        buckets: dict[str, list[Any]] = defaultdict(list)
        for item in cifs:
            if isinstance(item, Structure):
                buckets[item.composition.reduced_formula].append(item)
                continue
            header = re.search(r"^[ \t]*data_(\S+)", item, re.MULTILINE)
            try:
                formula = Composition(header.group(1)).reduced_formula if header else None
            except ValueError:  # a data_ name that is not a formula
                formula = None
            if formula is None:
                parsed = _load_cif(item)
                if parsed is None:
                    continue
                buckets[parsed.composition.reduced_formula].append(parsed)
            else:
                buckets[formula].append(item)
        return cls(dict(buckets), lambda x: x if isinstance(x, Structure) else _load_cif(x))

    @classmethod
    def from_dataset(cls, dataset_dir: str | os.PathLike, split: str = "train") -> TrainingIndex:
        """Index a token dataset's split by the formula on each CIF's ``data_`` line (CIFs decoded on demand)."""
        from engine.crystal.tokenizer import decode
        from engine.crystal.vocab import ITOS, NEWLINE_ID
        from engine.data.tokens import cif_lengths, load_token_dataset

        data = load_token_dataset(Path(dataset_dir))
        ids, starts = (data.train, data.train_starts) if split == "train" else (data.val, data.val_starts)
        lengths = cif_lengths(ids, starts)
        newlines = np.flatnonzero(np.asarray(ids) == NEWLINE_ID)
        header_end = newlines[np.minimum(np.searchsorted(newlines, starts), len(newlines) - 1)]
        by_header: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for a, n, e in zip(starts.tolist(), lengths.tolist(), header_end.tolist()):
            header = "".join(ITOS[int(t)] for t in ids[a + 1 : min(e, a + n)])
            by_header[header].append((a, n))
        buckets: dict[str, list[Any]] = defaultdict(list)
        for header, spans in by_header.items():
            try:
                buckets[Composition(header).reduced_formula] += spans
            except ValueError:  # a header that is not a formula cannot match any sample's formula
                continue

        def load(span: tuple[int, int]) -> Structure | None:
            a, n = span
            return _load_cif(decode(np.asarray(ids[a : a + n]).tolist()))

        return cls(dict(buckets), load)


def _load_cif(text: str) -> Structure | None:
    """Parse a CIF, post-processing it first when it is CrystaLLM's semi-symmetrized form."""
    result = postprocess(text)
    structure, _, _ = parse_structure(result.cif if result.cif is not None else text)
    return structure


def set_metrics(
    df: pd.DataFrame, *, train_index: TrainingIndex | None = None, prompt: Any = None
) -> dict[str, dict[str, Any]]:
    """Set-level metrics of an evaluation table, each as ``{"value": ..., "definition": ...}``.

    Args:
        df: output of `engine.evaluate.evaluation.evaluate_texts` (needs ``processed_cif`` for uniqueness and novelty).
        train_index: training structures for novelty; without it the novelty entries are None.
        prompt: the sample set's prompt (dict or `engine.crystal.prompts.Prompt`): a hit rate is k/n when the prompt has
            a composition / space group, even when no sample parsed, and None when it has none. Without it,
            a hit rate is None only when the table has no hit verdict at all.
    """
    n = len(df)
    parsed = _true(df, "parse_ok") if n else pd.Series(dtype=bool)
    valid = _true(df, "is_valid") if n else pd.Series(dtype=bool)
    analysed = parsed & df["failure_reason"].isna() if n else parsed
    values: dict[str, Any] = {"n": n, "parse_rate": _rate(parsed, n), "validity": _rate(valid, n)}

    matcher = StructureMatcher()
    rows = [i for i in range(n) if analysed.iloc[i] and isinstance(df["processed_cif"].iloc[i], str)]
    structures = {i: parse_structure(df["processed_cif"].iloc[i])[0] for i in rows}
    structures = {i: s for i, s in structures.items() if s is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_groups = _group(list(structures.values()), matcher)
        valid_structures = [s for i, s in structures.items() if valid.iloc[i]]
        valid_groups = _group(valid_structures, matcher)
    values["uniqueness_all"] = len(all_groups) / n if n else None
    values["uniqueness_valid"] = len(valid_groups) / n if n else None
    if train_index is not None:
        novel = sum(train_index.is_novel(valid_structures[g[0]], matcher) for g in valid_groups)
        values["novelty"] = novel / len(valid_groups) if valid_groups else None
        values["unique_novel_valid_rate"] = novel / n if n else None
    else:
        values["novelty"] = values["unique_novel_valid_rate"] = None

    struct_ok, smact_ok = _true(df, "cdvae_struct_valid"), _true(df, "smact_valid")
    values["cdvae_struct_validity"] = _rate(struct_ok, n)
    values["smact_validity"] = _rate(smact_ok, n)
    values["cdvae_validity"] = _rate(struct_ok & smact_ok, n)
    if prompt is not None and not isinstance(prompt, dict):
        prompt = prompt.to_dict()  # an engine.crystal.prompts.Prompt
    targets = prompt_targets(prompt)
    for column, name, target in zip(("formula_hit", "spacegroup_hit"), ("formula_hit_rate", "spacegroup_hit_rate"),
                                    targets):
        asked = target is not None if prompt is not None else bool(df[column].notna().any())
        values[name] = _rate(_true(df, column), n) if asked else None
    formulas = df.loc[parsed, "reduced_formula"].dropna()
    values["formula_counts"] = dict(sorted(Counter(formulas).items(), key=lambda kv: (-kv[1], kv[0])))
    values["distinct_formulas"] = int(formulas.nunique())
    values["distinct_spacegroups"] = int(df.loc[parsed, "spacegroup"].dropna().nunique())
    values["failure_counts"] = dict(sorted(Counter(df["failure_reason"].dropna()).items()))
    lengths = pd.to_numeric(df.loc[valid, "generated_length"], errors="coerce").dropna()
    values["mean_valid_length"] = float(lengths.mean()) if len(lengths) else None
    return {k: {"value": values[k], "definition": METRIC_DEFINITIONS[k]} for k in METRIC_DEFINITIONS}


def macro_average(metric_dicts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Average `set_metrics` outputs over prompts: numbers are averaged (Nones skipped), count dicts summed."""
    out: dict[str, dict[str, Any]] = {}
    k = len(metric_dicts)
    for name, definition in METRIC_DEFINITIONS.items():
        vals = [m[name]["value"] for m in metric_dicts if name in m and m[name]["value"] is not None]
        if vals and all(isinstance(v, dict) for v in vals):
            total: Counter = Counter()
            for v in vals:
                total.update(v)
            value: Any = dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))
            label = f"summed over {k} sample sets: {definition}"
        else:
            value = float(np.mean(vals)) if vals else None
            label = f"macro-average over {k} sample sets (None values skipped): {definition}"
        out[name] = {"value": value, "definition": label}
    return out

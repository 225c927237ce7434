"""Tables in the seed experiments' shapes, from evaluated sample sets: CSV for machines, markdown for papers.

`set_row` turns one evaluated sample set (``config.json`` + ``eval_summary.json``) into a flat row: provenance
(checkpoint label, path, step, sha256), prompt, sampling settings, counts out of ``n`` and set metrics. From
such rows (`compare_sample_sets` for any folders, `sweep_rows` for a sweep's cells):

- `per_checkpoint_table`: checkpoint, prompt, [settings that vary], n, parsed, valid, formula hits, unique (valid),
  space groups: the shape of the NaCl-10 and three-checkpoint tables;
- `per_prompt_table`: one row per prompt, one column per checkpoint (and varying setting): the prompt sweep;
- `macro_table`: per checkpoint and sampling setting, the unweighted mean over prompts (and seeds) of the parsed,
  valid, unique and unique (valid) rates, distinct formulas and distinct space groups: the temperature ablation.

`summary_markdown` renders them with counts as ``10/10 (100%)`` and the evaluator's definition of every column
under the tables. `write_sweep_report` writes a sweep's ``summary.csv`` (one numeric row per cell),
``summary_macro.csv``, ``summary.md`` and ``samples.csv`` (every sample of every cell).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from engine.errors import InputError
from engine.fsutil import atomic_write_text, read_json

SETTINGS = {"temperature": "T", "top_k": "top-k", "top_p": "top-p", "n": "n", "seed": "seed"}
"""Sampling settings of a row -> their column label, in table order."""

# Count columns: table label -> (row column for the count, row column for the rate, eval_summary.json metric).
# The evaluator's rates are counts / n, so count = rate x n is exact.
COUNTS = {
    "parsed": ("n_parsed", "parsed_rate", "parse_rate"),
    "valid": ("n_valid", "valid_rate", "validity"),
    "formula hits": ("n_formula_hits", "formula_hit_rate", "formula_hit_rate"),
    "space-group hits": ("n_spacegroup_hits", "spacegroup_hit_rate", "spacegroup_hit_rate"),
    "unique": ("n_unique", "unique_rate", "uniqueness_all"),
    "unique (valid)": ("n_unique_valid", "unique_valid_rate", "uniqueness_valid"),
}
# Other numbers: table label -> row column (= eval_summary.json metric).
NUMBERS = {"distinct formulas": "distinct_formulas", "space groups": "distinct_spacegroups", "novelty": "novelty"}
# Macro-average table: label -> row column averaged.
MACRO = {"parsed": "parsed_rate", "valid": "valid_rate", "unique": "unique_rate",
         "unique (valid)": "unique_valid_rate", "distinct formulas": "distinct_formulas",
         "space groups": "distinct_spacegroups"}


def definitions() -> dict[str, str]:
    """Table label -> the evaluator's definition of that metric (`engine.metrics.METRIC_DEFINITIONS`)."""
    from engine.metrics import METRIC_DEFINITIONS

    out = {label: METRIC_DEFINITIONS[metric] for label, (_, _, metric) in COUNTS.items()}
    out.update({label: METRIC_DEFINITIONS[metric] for label, metric in NUMBERS.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rows


def _metric(summary: dict, key: str) -> Any:
    entry = summary.get(key)
    return entry.get("value") if isinstance(entry, dict) else entry


def set_row(set_dir: str | os.PathLike, checkpoint: str | None = None, cell: str | None = None) -> dict[str, Any]:
    """One row for an evaluated sample set.

    Args:
        set_dir: Sample-set folder with ``config.json`` and ``eval_summary.json``.
        checkpoint: Label of its checkpoint (default: the checkpoint's run name, else its file name).
        cell: Row name (default: the folder name).

    Raises:
        InputError: the folder is not a sample set, or it has not been evaluated.
    """
    set_dir = Path(set_dir)
    config = read_json(set_dir / "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{set_dir} is not a sample set (no config.json): sample into it with `crystallab sample`")
    summary = read_json(set_dir / "eval_summary.json")
    if not isinstance(summary, dict):
        raise InputError(f"sample set {set_dir} has not been evaluated: run `crystallab evaluate {set_dir}`")
    prompt, sampling, ckpt = config.get("prompt") or {}, config.get("sampling") or {}, config.get("checkpoint") or {}
    n = int(_metric(summary, "n") or 0)
    path = ckpt.get("path")
    row: dict[str, Any] = {
        "cell": cell or set_dir.name,
        "checkpoint": checkpoint or ckpt.get("run") or (Path(path).stem if path else "?"),
        "prompt": prompt.get("label") or "unconditional",
        "formula": prompt.get("formula"),
        "z": prompt.get("z"),
        "spacegroup": prompt.get("spacegroup"),
        **{k: sampling.get(k) for k in ("temperature", "top_k", "top_p", "seed", "max_new_tokens")},
        "n": n,
    }
    for count_col, rate_col, metric in COUNTS.values():
        rate = _metric(summary, metric)
        row[count_col] = None if rate is None else int(round(float(rate) * n))
        row[rate_col] = None if rate is None else float(rate)
    row.update({col: _metric(summary, col) for col in NUMBERS.values()})
    row.update(checkpoint_path=path, checkpoint_step=ckpt.get("step"), checkpoint_sha256=ckpt.get("sha256"),
               set_dir=str(set_dir))
    return row


def compare_sample_sets(dirs: Iterable[str | os.PathLike],
                        labels: Iterable[str | None] | None = None) -> pd.DataFrame:
    """One row per evaluated sample set (the dashboard's Compare page); ``labels`` name their checkpoints.

    Raises:
        InputError: a folder is not an evaluated sample set (the message names it), or labels do not pair up.
    """
    dirs = list(dirs)
    labels = list(labels) if labels is not None else [None] * len(dirs)
    if len(labels) != len(dirs):
        raise InputError(f"{len(labels)} labels for {len(dirs)} sample sets: give one label per set")
    return pd.DataFrame([set_row(d, checkpoint=lab) for d, lab in zip(dirs, labels)])


def sweep_rows(sweep_dir: str | os.PathLike, cells: Iterable[str]) -> pd.DataFrame:
    """Rows of a sweep's evaluated cells (the checkpoint label is the cell name's part before ``__``)."""
    cells_dir = Path(sweep_dir) / "cells"
    return pd.DataFrame([set_row(cells_dir / c, checkpoint=c.split("__", 1)[0], cell=c) for c in cells])


# ----------------------------------------------------------------------------------------------------------------
# Display tables (strings, ready for markdown)


MISSING = "n/a"
"""Shown where a metric does not apply (a bare "-" would render as a list bullet in markdown tables)."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def fmt_count(count: Any, n: Any) -> str:
    """``7/10 (70%)``; ``n/a`` when the metric does not apply."""
    if _missing(count) or not n:
        return MISSING
    return f"{int(count)}/{int(n)} ({100 * count / n:.0f}%)"


def fmt_value(value: Any, digits: int | None = None) -> str:
    """Settings and plain numbers: ``0.8``, ``10``, ``3.7`` (``digits`` decimals when given); ``n/a`` if missing."""
    if _missing(value):
        return MISSING
    if digits is not None:
        return f"{float(value):.{digits}f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def fmt_rate(rate: Any) -> str:
    return MISSING if _missing(rate) else f"{100 * rate:.1f}%"


def varying_settings(df: pd.DataFrame) -> list[str]:
    """Sampling settings (besides n) with more than one value across ``df``: they become columns."""
    return [c for c in SETTINGS if c != "n" and c in df and df[c].nunique(dropna=False) > 1]


def _applies(df: pd.DataFrame, column: str) -> bool:
    return column in df and df[column].notna().any()


def per_checkpoint_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per sample set, grouped by checkpoint (first-seen order), otherwise in the order given.

    Columns: checkpoint, prompt, the varying settings, n, parsed, valid, formula hits, space-group hits (when a
    prompt names a space group), unique (valid), space groups, novelty (when computed).
    """
    varying = varying_settings(df)
    order = {c: i for i, c in enumerate(dict.fromkeys(df["checkpoint"]))}
    df = df.assign(_order=df["checkpoint"].map(order)).sort_values("_order", kind="stable")
    out = pd.DataFrame({"checkpoint": df["checkpoint"], "prompt": df["prompt"]})
    for c in varying:
        out[SETTINGS[c]] = df[c].map(fmt_value)
    out["n"] = df["n"].map(fmt_value)
    labels = ["parsed", "valid", "formula hits"]
    if _applies(df, "n_spacegroup_hits"):
        labels.append("space-group hits")
    for label in [*labels, "unique (valid)"]:
        out[label] = [fmt_count(c, n) for c, n in zip(df[COUNTS[label][0]], df["n"])]
    out["space groups"] = df["distinct_spacegroups"].map(fmt_value)
    if _applies(df, "novelty"):
        out["novelty"] = df["novelty"].map(fmt_rate)
    return out.reset_index(drop=True)


def per_prompt_table(df: pd.DataFrame, metric: str = "valid") -> pd.DataFrame:
    """One row per prompt (first-seen order), one column per checkpoint and varying setting: ``metric`` counts.

    Args:
        metric: A count label of `COUNTS` (parsed, valid, formula hits, space-group hits, unique, unique (valid)).
    """
    if metric not in COUNTS:
        raise ValueError(f"metric must be one of {', '.join(COUNTS)}, got {metric!r}")
    column = df["checkpoint"].astype(str)
    for c in varying_settings(df):
        column = column + " " + SETTINGS[c] + "=" + df[c].map(fmt_value)
    values = [fmt_count(c, n) for c, n in zip(df[COUNTS[metric][0]], df["n"])]
    out = pd.DataFrame({"prompt": list(dict.fromkeys(df["prompt"]))})
    for col in dict.fromkeys(column):
        cells = dict(zip(df["prompt"][column == col], pd.Series(values, index=df.index)[column == col]))
        out[col] = [cells.get(p, MISSING) for p in out["prompt"]]
    return out


def macro_table(df: pd.DataFrame) -> pd.DataFrame:
    """Numbers: per checkpoint and setting (seeds pooled), the unweighted mean of `MACRO` over its sample sets.

    Columns: checkpoint, temperature, top_k, top_p, n, prompts (distinct), sets, then the `MACRO` row columns.
    """
    keys = ["checkpoint", "temperature", "top_k", "top_p", "n"]
    agg = {col: "mean" for col in MACRO.values()}
    grouped = df.groupby(keys, sort=False, dropna=False)
    out = grouped.agg(agg)
    out.insert(0, "sets", grouped["cell"].count())
    out.insert(0, "prompts", grouped["prompt"].nunique())
    return out.reset_index()


def macro_display(df: pd.DataFrame) -> pd.DataFrame:
    """`macro_table` for reading: rates in percent, distinct counts with one decimal."""
    macro = macro_table(df)
    out = pd.DataFrame({"checkpoint": macro["checkpoint"]})
    for c in varying_settings(df):
        if c != "seed":
            out[SETTINGS[c]] = macro[c].map(fmt_value)
    if df["n"].nunique() > 1:
        out["n"] = macro["n"].map(fmt_value)
    out["prompts"] = macro["prompts"].map(fmt_value)
    for label, col in MACRO.items():
        out[label] = macro[col].map(fmt_rate) if col.endswith("_rate") else macro[col].map(
            lambda v: fmt_value(v, 1))
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown: checkpoint and prompt columns left-aligned, the others right-aligned."""
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join(":---" if c in ("checkpoint", "prompt") else "---:" for c in df.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def summary_markdown(df: pd.DataFrame, *, title: str = "Sampling report", description: str = "",
                     checkpoints: dict[str, str] | None = None) -> str:
    """The report a user pastes into a paper: settings, checkpoints, the tables that apply, definitions.

    Settings with one value in every row are stated once above the tables. The per-prompt and macro-average
    tables appear when there is more than one prompt.

    Args:
        df: Rows from `set_row` (`compare_sample_sets`, `sweep_rows`).
        title: First heading.
        description: A paragraph under it.
        checkpoints: Label -> path as the user wrote it (default: the recorded absolute path).
    """
    if df.empty:
        return f"# {title}\n\nNo evaluated sample sets yet.\n"
    lines = [f"# {title}", ""]
    if description.strip():
        lines += [description.strip(), ""]
    varying = varying_settings(df)
    fixed = [f"{SETTINGS[c]} = {fmt_value(df[c].iloc[0])}" for c in SETTINGS if c not in varying and c != "n"]
    if df["max_new_tokens"].nunique() == 1:
        fixed.append(f"at most {fmt_value(df['max_new_tokens'].iloc[0])} new tokens")
    lines += ["Sampling: " + ", ".join(fixed) + ".", "", "Checkpoints:"]
    for label, first in df.groupby("checkpoint", sort=False).first().iterrows():
        where = (checkpoints or {}).get(label) or first["checkpoint_path"]
        sha = str(first["checkpoint_sha256"] or "?")[:12]
        lines.append(f"- `{label}`: {where} (step {fmt_value(first['checkpoint_step'])}, sha256 {sha})")
    table = per_checkpoint_table(df)
    lines += ["", "## Per checkpoint", "", markdown_table(table), ""]
    shown = set(table.columns)
    if df["prompt"].nunique() > 1:
        lines += ["## Per prompt: valid", "", markdown_table(per_prompt_table(df, "valid")), ""]
        macro = macro_display(df)
        lines += ["## Macro-average over prompts", "", markdown_table(macro), ""]
        shown |= set(macro.columns)
    lines += ["Definitions (counts are out of n samples; macro-averages are unweighted means over sample sets):",
              ""]
    lines += [f"- **{label}**: {text}" for label, text in definitions().items() if label in shown]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", f"Generated by crystallab, {stamp}."]
    return "\n".join(lines) + "\n"


def write_sweep_report(sweep_dir: str | os.PathLike, cells: list[str], *, checkpoints: dict[str, str],
                       title: str, description: str = "", with_samples: bool = True) -> pd.DataFrame:
    """Write ``summary.csv``, ``summary_macro.csv``, ``summary.md`` (and ``samples.csv``) for evaluated cells.

    Returns:
        The rows (what ``summary.csv`` holds).
    """
    sweep_dir = Path(sweep_dir)
    df = sweep_rows(sweep_dir, cells)
    atomic_write_text(sweep_dir / "summary.csv", df.to_csv(index=False))
    macro = macro_table(df) if not df.empty else pd.DataFrame()
    atomic_write_text(sweep_dir / "summary_macro.csv", macro.to_csv(index=False))
    atomic_write_text(sweep_dir / "summary.md",
                      summary_markdown(df, title=title, description=description, checkpoints=checkpoints))
    if with_samples:
        frames = [
            pd.read_csv(Path(row.set_dir) / "eval.csv").assign(
                cell=row.cell, checkpoint=row.checkpoint, prompt=row.prompt, temperature=row.temperature,
                top_k=row.top_k, top_p=row.top_p, seed=row.seed)
            for row in df.itertuples(index=False)
        ]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        atomic_write_text(sweep_dir / "samples.csv", table.to_csv(index=False))
    return df

"""Tables in the seed experiments' shapes, from evaluated sample sets: CSV for machines, markdown for papers.

`set_row` turns one evaluated sample set (``config.json`` + ``eval_summary.json``) into a flat row: provenance
(checkpoint label, path, step, sha256), prompt, sampling settings, counts out of ``n`` and set metrics. From
such rows (`compare_sample_sets` for any folders, `sweep_rows` for a sweep's cells):

- `per_checkpoint_table`: checkpoint, prompt, [settings that vary], n, parsed, valid, formula hits, unique (valid),
  space groups: the shape of the NaCl-10 and three-checkpoint tables;
- `per_prompt_table`: one row per prompt, one column per checkpoint (and varying setting): the prompt sweep;
- `macro_table`: per checkpoint and sampling setting, the unweighted mean over prompts (and seeds) of the parsed,
  valid, unique and unique (valid) rates, distinct formulas and distinct space groups: the temperature ablation.

`summary_markdown` renders them for a paper: how the samples were drawn (constrained decoding or not), software
version, git commit, device and dates, each checkpoint's step, sha256 and training data, counts as
``3/4 (75%) [30%, 95%]`` (k of n with the 95 % Wilson score interval of the rate) and a legend defining every column.
`write_sweep_report` writes a sweep's ``summary.csv`` (one numeric row per cell, rates with ``*_ci_low`` /
``*_ci_high``), ``summary_macro.csv``, ``summary.md`` and ``samples.csv`` (every sample of every cell).
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from engine.evaluate import tables
from engine.evaluate.tables import EXTRA_METRICS
from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_text, read_json

SETTINGS = {"temperature": "T", "top_k": "top-k", "top_p": "top-p", "n": "n", "seed": "seed",
            "constrain": "constrained"}
"""Sampling settings of a row -> their column label, in table order."""

MISSING = "n/a"
"""Shown where a metric does not apply (a bare "-" would render as a list bullet in markdown tables)."""

Z95 = 1.959963984540054
"""Standard-normal quantile of a two-sided 95 % interval."""

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
# Macro-average table: label -> row column averaged (the labels say "mean": every value is an average).
MACRO = {"mean parsed": "parsed_rate", "mean valid": "valid_rate", "mean unique": "unique_rate",
         "mean unique (valid)": "unique_valid_rate", "mean distinct formulas": "distinct_formulas",
         "mean space groups": "distinct_spacegroups"}

# Distribution and stability columns of the per-checkpoint table (issue 13): label -> row column.
STABILITY_COLUMNS = {"COV-R": "cov_recall", "COV-P": "cov_precision", "metastable": "metastable_rate",
                     "S.U.N.": "sun_rate"}

# Columns that are not evaluator metrics: label -> what it means in a table.
COLUMN_LEGEND = {
    "checkpoint": "label of the model checkpoint (listed above with its file, step, sha256 and training data)",
    "prompt": "the prompt's cell composition as written on the CIF's data_ line (with the space group when the "
              "prompt names one); 'unconditional' is the bare data_ prompt",
    "T": "softmax temperature of sampling (0 = greedy)",
    "top-k": "only the k most likely next tokens are sampled from (0 = off)",
    "top-p": "nucleus sampling: the smallest set of tokens holding this probability mass (1 = off)",
    "seed": "random seed of the sample set (same seed, same samples)",
    "constrained": "constrained decoding: element tokens limited to the prompt's elements and the space-group "
                   "token to space-group symbols",
    "n": "number of samples drawn for the row",
    "prompts": "number of distinct prompts averaged over",
}


def _plain_words(definition: str) -> str:
    """An evaluator definition as the tables print it (n/a where the evaluator stores None)."""
    return re.sub(r"\bNone\b", MISSING, definition)


def definitions() -> dict[str, str]:
    """Table label -> the evaluator's definition of that metric (`engine.evaluate.metrics.METRIC_DEFINITIONS`)."""
    from engine.evaluate.metrics import METRIC_DEFINITIONS

    out = {label: _plain_words(METRIC_DEFINITIONS[metric]) for label, (_, _, metric) in COUNTS.items()}
    out.update({label: _plain_words(METRIC_DEFINITIONS[metric]) for label, metric in NUMBERS.items()})
    from engine.evaluate.distribution import DISTRIBUTION_DEFINITIONS
    from engine.evaluate.sun import METASTABLE_EV, STABLE_EV, SUN_DEFINITIONS

    extra = {**DISTRIBUTION_DEFINITIONS,
             **{k: v.format(stable=STABLE_EV, metastable=METASTABLE_EV) for k, v in SUN_DEFINITIONS.items()}}
    out.update({label: extra[column] for label, column in STABILITY_COLUMNS.items()})
    return out


def wilson_interval(count: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a rate ``count / n`` (95 % by default), as fractions in [0, 1].

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n, which matters for the
    small n of a sweep cell (0/4 gives [0, 0.49]).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 or k = n the exact bound is 0 or 1; rounding could leave 1e-17 there.
    low = 0.0 if count <= 0 else max(0.0, centre - half)
    high = 1.0 if count >= n else min(1.0, centre + half)
    return low, high


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
        "family": ckpt.get("family") or "crystallm-gpt",
        **{k: sampling.get(k) for k in ("temperature", "top_k", "top_p", "seed", "max_new_tokens", "constrain")},
        "n": n,
        # Knobs of other model families (e.g. a diffusion model's steps), as one readable column.
        "other_knobs": "; ".join(f"{k}={v}" for k, v in sorted(sampling.items()) if k not in _GPT_SAMPLING) or None,
    }
    for count_col, rate_col, metric in COUNTS.values():
        rate = _metric(summary, metric)
        row[count_col] = None if rate is None else int(round(float(rate) * n))
        row[rate_col] = None if rate is None else float(rate)
        low, high = wilson_interval(row[count_col], n) if rate is not None and n else (None, None)
        row[f"{rate_col}_ci_low"], row[f"{rate_col}_ci_high"] = low, high
    row.update({col: _metric(summary, col) for col in NUMBERS.values()})
    row.update({col: _metric(summary, col) for col in EXTRA_METRICS})  # distribution and stability (issue 13)
    row.update(checkpoint_path=path, checkpoint_step=ckpt.get("step"), checkpoint_sha256=ckpt.get("sha256"),
               **checkpoint_provenance(path, ckpt.get("sha256")), device=config.get("device"),
               crystallab_version=config.get("version"), sampled_at=config.get("created_at"), set_dir=str(set_dir))
    return row


_GPT_SAMPLING = frozenset(("n", "temperature", "top_k", "top_p", "seed", "max_new_tokens", "constrain", "batch_size",
                           "allowed_elements", "constrain_spacegroup", "use_cache"))
"""Sampling keys of the GPT family's sample sets that have their own columns (or are derived from them)."""


def set_row_from_metrics(metrics: dict[str, Any], label: str) -> dict[str, Any]:
    """A row for `engine.evaluate.tables` from a metrics dict alone (``crystallab evaluate`` on loose files)."""
    return {"label": label, **{col: _metric(metrics, col) for col in EXTRA_METRICS}}


def checkpoint_provenance(path: str | None, sha256: str | None) -> dict[str, Any]:
    """What a checkpoint records about its training data: ``checkpoint_dataset`` (the training config's
    ``dataset``, a name under ``runs/data/`` or a folder) and ``checkpoint_data_fingerprint`` (crystallab's hash of
    the token files; None for upstream checkpoints).

    Both are None when the file is gone or is no longer the one sampled (its sha256 changed): the report must not
    credit a sample set to training data that another checkpoint was trained on.
    """
    none = {"checkpoint_dataset": None, "checkpoint_data_fingerprint": None}
    if not path or not sha256:
        return none
    return dict(_provenance(str(path), str(sha256))) or none


@functools.lru_cache(maxsize=64)
def _provenance(path: str, sha256: str) -> tuple[tuple[str, Any], ...]:
    from engine.lab.errors import CheckpointError
    from engine.models.checkpoint import checkpoint_sha256, load_checkpoint

    try:
        if not Path(path).is_file() or checkpoint_sha256(path) != sha256:
            return ()
        # Memory-mapped and unchecked: only the small config and provenance dicts are read, not the weights.
        ckpt = load_checkpoint(path, check=False, mmap=True)
    except (CheckpointError, OSError):
        return ()
    dataset = ckpt.config.get("dataset")
    return (("checkpoint_dataset", str(dataset) if dataset not in (None, "") else None),
            ("checkpoint_data_fingerprint", ckpt.meta.get("data_fingerprint")))


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


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def fmt_count(count: Any, n: Any, interval: bool = True) -> str:
    """``3/4 (75%) [30%, 95%]``: k of n, the rate, and (``interval``) its 95 % Wilson score interval;
    ``n/a`` when the metric does not apply."""
    if _missing(count) or _missing(n) or not n:
        return MISSING
    text = f"{int(count)}/{int(n)} ({100 * count / n:.0f}%)"
    if interval:
        low, high = wilson_interval(float(count), float(n))
        text += f" [{100 * low:.0f}%, {100 * high:.0f}%]"
    return text


def fmt_value(value: Any, digits: int | None = None) -> str:
    """Settings and plain numbers: ``0.8``, ``10``, ``3.7`` (``digits`` decimals when given), ``on``/``off`` for
    switches; ``n/a`` if missing."""
    if _missing(value):
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    if digits is not None:
        return f"{float(value):.{digits}f}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def fmt_count_value(value: Any) -> str:
    """A whole count (``3``, never ``3.0``), even when a CSV round trip made it a float; ``n/a`` if missing."""
    return MISSING if _missing(value) else str(int(round(float(value))))


def fmt_mean(value: Any) -> str:
    """A mean of counts: ``2`` when it is whole, else one decimal (``1.5``); ``n/a`` if missing."""
    if _missing(value):
        return MISSING
    value = float(value)
    return str(int(round(value))) if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def fmt_rate(rate: Any) -> str:
    return MISSING if _missing(rate) else f"{100 * rate:.1f}%"


def varying_settings(df: pd.DataFrame) -> list[str]:
    """Sampling settings (besides n) with more than one value across ``df``: they become columns."""
    return [c for c in SETTINGS if c != "n" and c in df and df[c].nunique(dropna=False) > 1]


def _applies(df: pd.DataFrame, column: str) -> bool:
    return column in df and df[column].notna().any()


def per_checkpoint_table(df: pd.DataFrame, with_set: bool = False) -> pd.DataFrame:
    """One row per sample set, grouped by checkpoint (first-seen order), otherwise in the order given.

    Columns: checkpoint, [set (``with_set``: the set's name, so two sets with equal settings stay apart)], prompt,
    the varying settings, n, parsed, valid, formula hits, space-group hits (when a
    prompt names a space group), unique (valid) (each ``k/n (p%) [95 % interval]``), space groups, novelty (when
    computed).
    """
    varying = varying_settings(df)
    order = {c: i for i, c in enumerate(dict.fromkeys(df["checkpoint"]))}
    df = df.assign(_order=df["checkpoint"].map(order)).sort_values("_order", kind="stable")
    out = pd.DataFrame({"checkpoint": df["checkpoint"], "prompt": df["prompt"]})
    if with_set:
        out.insert(1, "set", df["cell"])
    for c in varying:
        out[SETTINGS[c]] = df[c].map(fmt_value)
    out["n"] = df["n"].map(fmt_count_value)
    labels = ["parsed", "valid", "formula hits"]
    if _applies(df, "n_spacegroup_hits"):
        labels.append("space-group hits")
    for label in [*labels, "unique (valid)"]:
        out[label] = [fmt_count(c, n) for c, n in zip(df[COUNTS[label][0]], df["n"])]
    out["space groups"] = df["distinct_spacegroups"].map(fmt_count_value)
    if _applies(df, "novelty"):
        out["novelty"] = df["novelty"].map(fmt_rate)
    for label, column in STABILITY_COLUMNS.items():  # when a reference set / stability pass was evaluated
        if _applies(df, column):
            out[label] = df[column].map(fmt_rate if column.endswith("_rate") else lambda v: fmt_value(v, 3))
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

    Columns: checkpoint, temperature, top_k, top_p, n, constrain (when recorded), prompts (distinct), sets, then
    the `MACRO` row columns (rates as fractions, distinct counts as mean counts per set).
    """
    keys = ["checkpoint", "temperature", "top_k", "top_p", "n", *(["constrain"] if "constrain" in df else [])]
    agg = {col: "mean" for col in MACRO.values()}
    grouped = df.groupby(keys, sort=False, dropna=False)
    out = grouped.agg(agg)
    out.insert(0, "sets", grouped["cell"].count())
    out.insert(0, "prompts", grouped["prompt"].nunique())
    return out.reset_index()


def macro_display(df: pd.DataFrame) -> pd.DataFrame:
    """`macro_table` for reading: mean rates in percent, mean counts whole when whole (``2``, ``1.5``)."""
    macro = macro_table(df)
    out = pd.DataFrame({"checkpoint": macro["checkpoint"]})
    for c in varying_settings(df):
        if c != "seed":
            out[SETTINGS[c]] = macro[c].map(fmt_value)
    if df["n"].nunique() > 1:
        out["n"] = macro["n"].map(fmt_count_value)
    out["prompts"] = macro["prompts"].map(fmt_count_value)
    for label, col in MACRO.items():
        out[label] = macro[col].map(fmt_rate if col.endswith("_rate") else fmt_mean)
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown: checkpoint and prompt columns left-aligned, the others right-aligned."""
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join(":---" if c in ("checkpoint", "prompt") else "---:" for c in df.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _distinct(df: pd.DataFrame, column: str) -> list[Any]:
    """The recorded values of ``column`` in first-seen order (none when the column is absent)."""
    if column not in df:
        return []
    return [v for v in dict.fromkeys(df[column]) if not _missing(v)]


def _sampling_line(df: pd.DataFrame) -> str:
    varying = varying_settings(df)
    fixed = []
    for c in SETTINGS:
        if c in varying or c == "n":
            continue
        value = df[c].iloc[0] if c in df else None
        if c == "constrain":
            # It changes validity a lot, so a reader must always learn whether it was on.
            fixed.append("constrained decoding " + ("not recorded" if _missing(value) else fmt_value(value)))
        else:
            fixed.append(f"{SETTINGS[c]} = {fmt_value(value)}")
    if "max_new_tokens" in df and df["max_new_tokens"].nunique() == 1:
        fixed.append(f"at most {fmt_value(df['max_new_tokens'].iloc[0])} new tokens per sample")
    return "Sampling: " + ", ".join(fixed) + "."


def _provenance_lines(df: pd.DataFrame, environment: dict[str, Any] | None) -> list[str]:
    """Software version, git commit, device and dates: what a reader needs to reproduce the numbers."""
    from engine import __version__
    from engine.lab.runs import git_sha

    def short(sha: str) -> str:
        return sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")

    env = environment or {}
    versions = _distinct(df, "crystallab_version") or [env.get("crystallab") or __version__]
    if env.get("git_sha"):
        commit = f"git {short(str(env['git_sha']))}"
    else:  # no environment recorded with the samples: name the checkout writing this report, and say so
        sha = git_sha()
        commit = f"git {short(sha)} (the checkout writing this report)" if sha else "git commit unknown"
    devices = _distinct(df, "device") or ([env["device"]] if env.get("device") else [])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    days = sorted({str(v)[:10] for v in _distinct(df, "sampled_at")})
    drawn = (days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}") if days else "not recorded"
    return [f"Software: crystallab {', '.join(map(str, versions))}, {commit}. "
            f"Device: {', '.join(map(str, devices)) or 'not recorded'}.",
            "", f"Dates: samples drawn {drawn}; report written {stamp}."]


def _checkpoint_lines(df: pd.DataFrame, checkpoints: dict[str, str] | None) -> list[str]:
    lines = ["Checkpoints:"]
    for label, group in df.groupby("checkpoint", sort=False):
        first = group.iloc[0]
        where = (checkpoints or {}).get(label) or first.get("checkpoint_path")
        sha = str(first.get("checkpoint_sha256") or "?")[:12]
        dataset, fingerprint = first.get("checkpoint_dataset"), first.get("checkpoint_data_fingerprint")
        if _missing(dataset) and _missing(fingerprint):
            data = "training data not recorded in the checkpoint"
        else:
            data = "trained on " + (MISSING if _missing(dataset) else f"`{dataset}`")
            if not _missing(fingerprint):
                data += f" (data fingerprint {str(fingerprint)[:12]})"
        lines.append(f"- `{label}`: {where} (step {fmt_count_value(first.get('checkpoint_step'))}, "
                     f"sha256 {sha}; {data})")
    return lines


def _legend(shown: list[str], with_files: bool) -> list[str]:
    """Bullets defining every column in ``shown`` (table labels), then the notations, then (sweeps) the files."""
    metric_defs = definitions()
    means = [c for c in shown if c.startswith("mean ") and c in MACRO]
    needed = set(shown) | {c[len("mean "):] for c in means}
    lines = ["## Legend", ""]
    lines += [f"- **{label}**: {text}" for label, text in COLUMN_LEGEND.items() if label in needed]
    lines += [f"- **{label}**: {text}" for label, text in metric_defs.items() if label in needed]
    if means:
        lines.append(f"- **{', '.join(means)}**: the column of the same name without \"mean\" (a rate, or a count "
                     "for distinct formulas and space groups), averaged without weights over the sample sets of one "
                     "checkpoint and setting (one set per prompt and seed); a mean count can be fractional")
    lines += [
        "- **k/n (p%) [low, high]**: k of the n samples, the rate p = k/n, and the 95 % Wilson score interval of "
        "the rate",
        f"- **{MISSING}**: the metric does not apply (no prompt composition for formula hits, no prompt space group "
        "for space-group hits)",
    ]
    if with_files:
        lines += [
            "",
            "Files beside this report: `summary.csv` (one row per cell: counts `n_*`, rates `*_rate` with their "
            "95 % Wilson interval `*_rate_ci_low` / `*_rate_ci_high`, all as fractions), `summary_macro.csv` (the "
            "means over prompts, rates as fractions), `samples.csv` (one row per sample: `volume` in cubic "
            "angstrom (A^3), `density` in g/cm^3, `generated_length` in tokens, `bond_length_score` in [0, 1]).",
        ]
    return lines


def summary_markdown(df: pd.DataFrame, *, title: str = "Sampling report", description: str = "",
                     checkpoints: dict[str, str] | None = None, environment: dict[str, Any] | None = None,
                     with_files: bool = False) -> str:
    """The report a user pastes into a paper: settings, provenance, checkpoints, the tables that apply, a legend.

    Settings with one value in every row are stated once above the tables; whether decoding was constrained is
    always stated. The per-prompt and macro-average tables appear when there is more than one prompt.

    Args:
        df: Rows from `set_row` (`compare_sample_sets`, `sweep_rows`, or a sweep's ``summary.csv``).
        title: First heading.
        description: A paragraph under it.
        checkpoints: Label -> path as the user wrote it (default: the recorded absolute path).
        environment: The ``env.json`` of the run that drew the samples (git commit, device); None: the git commit
            of the checkout writing the report.
        with_files: Describe the sweep folder's CSV files (columns and units) under the legend.
    """
    if df.empty:
        return f"# {title}\n\nNo evaluated sample sets yet.\n"
    lines = [f"# {title}", ""]
    if description.strip():
        lines += [description.strip(), ""]
    lines += [_sampling_line(df), "", *_provenance_lines(df, environment), "", *_checkpoint_lines(df, checkpoints)]
    table = per_checkpoint_table(df)
    lines += ["", "## Per checkpoint", "", markdown_table(table), ""]
    shown = list(table.columns)
    if df["prompt"].nunique() > 1:
        lines += ["## Per prompt: valid", "", "Valid samples of each prompt (rows) per checkpoint and setting "
                  "(columns).", "", markdown_table(per_prompt_table(df, "valid")), ""]
        macro = macro_display(df)
        lines += ["## Macro-average over prompts", "",
                  "Every value is a mean: the unweighted average over the prompts (and seeds) of one checkpoint "
                  "and setting.", "", markdown_table(macro), ""]
        shown += list(macro.columns)
    shown += ["T", "top-k", "top-p", "seed", "constrained"]  # named in the sampling line when not columns
    if any(tables.has_extras(df)):
        lines += [tables.published_tables_markdown(df)]
    lines += _legend(shown, with_files)
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
    environment = read_json(sweep_dir / "env.json")
    atomic_write_text(sweep_dir / "summary.md",
                      summary_markdown(df, title=title, description=description, checkpoints=checkpoints,
                                       environment=environment if isinstance(environment, dict) else None,
                                       with_files=True))
    if with_samples:
        frames = [
            pd.read_csv(Path(row.set_dir) / "eval.csv").assign(
                cell=row.cell, checkpoint=row.checkpoint, prompt=row.prompt, temperature=row.temperature,
                top_k=row.top_k, top_p=row.top_p, seed=row.seed, constrain=row.constrain)
            for row in df.itertuples(index=False)
        ]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        atomic_write_text(sweep_dir / "samples.csv", table.to_csv(index=False))
    return df

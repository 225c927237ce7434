"""Stability and distribution panels (issue 13) shared by the Sample, Compare and Structure pages.

Kept apart from the pages' own code so the pages only call these functions: E_hull badges and histograms from a
set's ``stability.csv``, the stability pass as a detached ``crystallab stability`` job, a convex-hull plot of one
chemical system with a sample placed on it, generated-vs-reference property histograms and Wasserstein / COV
figures, and the generated-vs-relaxed comparison. The engine does the work (`engine.evaluate.distribution`,
`engine.evaluate.sun`, `engine.evaluate.hull` from the stability half); nothing here computes a metric itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.evaluate import distribution
from engine.evaluate.sun import METASTABLE_EV, STABLE_EV
from engine.lab import jobs
from engine.lab.errors import InputError
from pages import common

POTENTIALS = ("chgnet", "sevennet-0", "sevennet-l3i5")


# --- stability.csv -------------------------------------------------------------------------------------------

@st.cache_data(show_spinner=False, max_entries=32)
def _read_stability(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_csv(path)


def stability_table(set_dir: Path) -> pd.DataFrame | None:
    """The set's ``stability.csv`` with a ``name`` column (the sample's file stem), or None before a stability pass."""
    path = Path(set_dir) / "stability.csv"
    if not path.is_file():
        return None
    df = _read_stability(str(path), path.stat().st_mtime).copy()
    df["name"] = [Path(str(f)).stem for f in df["file"]]
    if "relaxed_cif" in df.columns:  # `crystallab stability` writes relaxed/NNNN.cif and records its relative path
        df["relaxed_cif"] = [_relaxed_text(Path(set_dir), v) for v in df["relaxed_cif"]]
    return df


def _relaxed_text(set_dir: Path, value) -> str | None:
    """The relaxed CIF's text: read from its file (a path relative to the set, kept inside it) or given inline."""
    if not isinstance(value, str) or not value.strip():
        return None
    if value.lstrip().startswith("data_") or "\n" in value:
        return value
    path = (set_dir / value).resolve()
    if set_dir.resolve() not in path.parents or not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace")


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _true(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "1.0")


def ehull_badge(row: pd.Series | None) -> str:
    """A badge for one sample's stability row: stable / metastable / above hull / lower bound / failure."""
    if row is None:
        return ""
    e = _number(row.get("e_hull"))
    reason = row.get("failure_reason")
    if e is None:
        why = str(reason).replace("_", " ") if isinstance(reason, str) and reason else "no energy"
        return f":red-badge[E_hull: {why}]"
    text = f"E_hull {e:.3f} eV/atom"
    if not _true(row.get("hull_covered")):
        return f":gray-badge[{text} (lower bound: hull lacks this system)]"
    if e <= STABLE_EV:
        return f":green-badge[:material/check: {text}, stable]"
    if e <= METASTABLE_EV:
        return f":blue-badge[{text}, metastable]"
    return f":orange-badge[{text}]"


def ehull_histogram(tables: dict[str, pd.DataFrame], *, key: str) -> None:
    """Histogram of E_hull (eV/atom) per labelled table, with the stable and metastable thresholds marked."""
    fig = go.Figure()
    for label, df in tables.items():
        values = pd.to_numeric(df["e_hull"], errors="coerce").dropna()
        fig.add_trace(go.Histogram(x=values, name=label, opacity=0.7, nbinsx=40))
    for x, name in ((STABLE_EV, "stable"), (METASTABLE_EV, "metastable")):
        fig.add_vline(x=x, line_dash="dot", annotation_text=f"{name} ({x:g})")
    fig.update_layout(barmode="overlay", xaxis_title="E_hull (eV/atom)", yaxis_title="samples", height=320,
                      margin={"t": 30}, title="E_hull of the samples")
    st.plotly_chart(fig, key=key)


def stability_summary(df: pd.DataFrame, n: int, *, key: str) -> None:
    """Stable / metastable counts over all ``n`` samples, the hull and potential, and the E_hull histogram."""
    e = pd.to_numeric(df["e_hull"], errors="coerce")
    covered = df["hull_covered"].map(_true)
    c = st.columns(4)
    c[0].metric(f"Stable (E_hull <= {STABLE_EV:g})", f"{int(((e <= STABLE_EV) & covered).sum())}/{n}")
    c[1].metric(f"Metastable (<= {METASTABLE_EV:g})", f"{int(((e <= METASTABLE_EV) & covered).sum())}/{n}")
    c[2].metric("Lower bound only", int((e.notna() & ~covered).sum()),
                help="samples whose chemical system has no competing compound in the hull")
    c[3].metric("Failed", int(e.isna().sum()))
    names = ", ".join(f"{k} {', '.join(sorted({str(v) for v in df[k].dropna()}))}" for k in ("potential", "hull")
                      if k in df)
    st.caption(f"Measured with {names}. Stable and metastable count only samples whose chemical system the hull "
               "covers; rates are over all submitted samples.")
    ehull_histogram({"samples": df}, key=key)


# --- the stability pass as a detached job --------------------------------------------------------------------

def hulls() -> list[str]:
    """Names of the hulls under ``runs/hulls`` (built with ``crystallab hull build``)."""
    root = common.settings().runs_dir / "hulls"
    return sorted(p.name for p in root.iterdir() if (p / "hull.json").is_file()) if root.is_dir() else []


def stability_job(set_dir: Path, *, key: str) -> None:
    """Form that launches ``crystallab stability SET --potential P --hull NAME --out SET`` as a detached job, and
    its progress while it runs."""
    job = common.current_job("stability")
    if job is not None and jobs.job_state(job)["state"] == "running":
        common.live_job(job, key=f"{key}_job")
        done = jobs.progress(job)
        st.progress(done[0] / done[1] if done and done[1] else 0.0,
                    text=f"Relaxing: {done[0]}/{done[1]} structures" if done else "loading the potential...")
        return
    if job is not None:
        common.job_panel(job, key=f"{key}_job")
    names = hulls()
    if not names:
        st.info("No hull yet: build one with `crystallab hull build SOURCE --potential chgnet --out NAME` "
                "(e.g. from MP-20's train.csv), then run a stability pass here.", icon=":material/info:")
        return
    with st.form(f"{key}_form"):
        c1, c2, c3 = st.columns(3)
        potential = c1.selectbox("Potential", POTENTIALS, key=f"{key}_potential")
        hull = c2.selectbox("Hull", names, key=f"{key}_hull")
        relax = c3.checkbox("Relax (else single point)", value=True, key=f"{key}_relax")
        go_ = st.form_submit_button("Run stability pass", icon=":material/bolt:", key=f"{key}_run")
    if go_:
        with common.user_errors():
            argv = ["stability", str(set_dir), "--potential", potential, "--hull", hull, "--out", str(set_dir)]
            if not relax:
                argv.append("--no-relax")
            common.launch(argv, "stability", jobs.check_name(f"{set_dir.name}-{potential}-{hull}"), target=set_dir,
                          replace_finished=True)
            st.rerun()


# --- convex hull ---------------------------------------------------------------------------------------------

def hull_plot(row: pd.Series, composition, *, key: str) -> None:
    """The convex hull of the sample's chemical system (from its hull) with the sample placed at its E_hull."""
    hull_name = row.get("hull")
    e = _number(row.get("e_hull"))
    if not isinstance(hull_name, str) or e is None:
        st.caption("No E_hull for this sample: nothing to place on a hull.")
        return
    try:
        from engine.evaluate.hull import load_hull  # the stability half of issue 13
    except ImportError:
        st.info("Hull plots need engine.evaluate.hull (the stability half), which this installation lacks.")
        return
    from pymatgen.analysis.phase_diagram import PDEntry, PDPlotter, PhaseDiagram

    chemsys = "-".join(sorted(el.symbol for el in composition.elements))
    with common.user_errors(stop=False):
        pd_ = load_hull(hull_name).phase_diagram(chemsys)
        if len(composition.elements) > 4:
            raise InputError(f"{chemsys} has {len(composition.elements)} elements: a hull plot shows at most 4")
        # The sample at exactly the E_hull reported for it, on the hull's own energy footing.
        energy = (pd_.get_hull_energy_per_atom(composition) + e) * composition.num_atoms
        sample = PDEntry(composition, energy, name=f"sample ({composition.reduced_formula})")
        with_sample = PhaseDiagram([*pd_.all_entries, sample])
        fig = PDPlotter(with_sample, backend="plotly", show_unstable=max(0.2, e + 0.05)).get_plot(
            highlight_entries=[sample])
        fig.for_each_trace(lambda trace: trace.update(name="this sample") if trace.name == "Highlighted" else None)
        fig.update_layout(height=460, title=f"{chemsys} hull ({hull_name}); sample E_hull {e:.3f} eV/atom")
        st.plotly_chart(fig, key=key)


# --- relaxed structure ---------------------------------------------------------------------------------------

def relaxed_comparison(generated, row: pd.Series | None, *, key: str) -> None:
    """Generated and relaxed structure side by side with energy, E_hull, RMSD, volume change and steps."""
    from engine.crystal.analysis import load_structure

    if row is None:
        st.caption("No stability pass for this sample yet (the Sample page runs one).")
        return
    st.markdown(ehull_badge(row))
    c = st.columns(5)
    for col, label, field, unit in ((c[0], "Energy", "energy_per_atom", "eV/atom"),
                                    (c[1], "Formation energy", "formation_energy_per_atom", "eV/atom"),
                                    (c[2], "RMSD", "rmsd", "Å"), (c[3], "Volume change", "volume_change", "%"),
                                    (c[4], "Steps", "steps", "")):
        v = _number(row.get(field))
        v = None if v is None else (100 * v if unit == "%" else v)
        col.metric(label, "n/a" if v is None else (f"{v:.0f}" if field == "steps" else f"{v:.3f} {unit}".strip()))
    reason = row.get("failure_reason")
    if isinstance(reason, str) and reason:
        st.warning(f"Relaxation: {reason.replace('_', ' ')}", icon=":material/warning:")
    relaxed_cif = row.get("relaxed_cif")
    left, right = st.columns(2)
    with left:
        st.markdown("**Generated**")
        common.structure_view(generated, key=f"{key}_generated", height=320)
    with right:
        st.markdown("**Relaxed**")
        if isinstance(relaxed_cif, str) and relaxed_cif.strip():
            with common.user_errors(stop=False):
                common.structure_view(load_structure(relaxed_cif, label="relaxed"), key=f"{key}_relaxed",
                                      height=320)
        else:
            st.caption("No relaxed structure (single-point pass, or the relaxation failed).")


# --- generated against a reference set -----------------------------------------------------------------------

def reference_picker(*, key: str) -> str | None:
    """A reference set: a dataset under ``runs/data`` or a CSV / folder path the lab may read; None: none chosen."""
    options = ["(none)", *[common.rel(p) for p in common.datasets()], "a CSV or folder path..."]
    choice = st.selectbox("Reference set", options, key=f"{key}_choice",
                          help="Generated samples are compared with this set (e.g. MP-20's test.csv)")
    if choice == "(none)":
        return None
    if choice == "a CSV or folder path...":
        text = st.text_input("Path (CSV with a 'cif' column, or a folder of CIFs)", key=f"{key}_path")
        if not text.strip():
            return None
        with common.user_errors():
            return str(common.settings().resolve_user_path(text.strip()))
    return str(common.settings().runs_dir / choice) if not Path(choice).is_absolute() else choice


@st.cache_data(show_spinner="Reading the reference set...", max_entries=4)
def _reference(source: str, limit: int) -> tuple[str, pd.DataFrame, str]:
    ref = distribution.load_reference(source, limit=limit)
    return ref.label, distribution.reference_descriptors(ref), ref.sha256


PROPERTIES = {"density": "density (g/cm³)", "n_atoms": "atoms per cell", "n_elements": "number of elements"}


def reference_figures(samples: pd.DataFrame, rows: pd.DataFrame, source: str, *, key: str,
                      limit: int = 1000) -> None:
    """Property histograms (density, atoms per cell, number of elements) of generated samples against the
    reference, their Wasserstein distances, and the COV figures recorded in the sets' summaries.

    Args:
        samples: one row per generated sample with ``checkpoint`` and the evaluation columns.
        rows: one row per sample set (`engine.evaluate.report.set_row`).
    """
    with common.user_errors():
        label, ref, _ = _reference(source, limit)
    st.caption(f"Reference: {label}. Wasserstein distances (scipy) over parsed samples; CDVAE's table uses "
               "CDVAE-valid samples (`crystallab evaluate --reference` records those).")
    parsed = samples[samples.get("parse_ok", pd.Series(False, index=samples.index)).map(_true)]
    cols = st.columns(3)
    wd_rows = []
    for col, (field, title) in zip(cols, PROPERTIES.items()):
        fig = go.Figure()
        fig.add_trace(go.Histogram(x=ref[field], name="reference", histnorm="probability", opacity=0.6))
        for ckpt, part in parsed.groupby("checkpoint", sort=False):
            values = pd.to_numeric(part.get(field), errors="coerce").dropna()
            fig.add_trace(go.Histogram(x=values, name=str(ckpt), histnorm="probability", opacity=0.6))
            wd_rows.append({"checkpoint": ckpt, "property": title,
                            "Wasserstein": distribution.wasserstein(values, ref[field])})
        fig.update_layout(barmode="overlay", title=title, height=300, margin={"t": 40}, yaxis_title="fraction")
        col.plotly_chart(fig, key=f"{key}_{field}")
    if wd_rows:
        wd = pd.DataFrame(wd_rows).pivot(index="checkpoint", columns="property", values="Wasserstein")
        st.dataframe(wd.round(4), key=f"{key}_wdist")
    if "cov_recall" in rows and rows["cov_recall"].notna().any():
        done = rows[rows["cov_recall"].notna()]
        fig = go.Figure()
        for metric, name in (("cov_recall", "COV-R"), ("cov_precision", "COV-P")):
            fig.add_trace(go.Bar(x=done["cell"], y=done[metric], name=name))
        fig.update_layout(barmode="group", height=320, yaxis_range=[0, 1.05], yaxis_tickformat=".0%",
                          title="COV against the reference each set was evaluated with (eval_summary.json)")
        st.plotly_chart(fig, key=f"{key}_cov")
    else:
        st.caption("COV-R / COV-P need fingerprints (about 0.2-1 s per structure), computed as a background job "
                   "that re-evaluates a set against this reference (or give a sweep the `reference` key).")
    cov_job(rows, source, key=f"{key}_covjob")


def cov_job(rows: pd.DataFrame, source: str, *, key: str) -> None:
    """Launch ``crystallab evaluate SET --out SET/eval.csv --reference REF`` for one set as a detached job."""
    job = common.current_job("distribution")
    if job is not None:
        common.live_job(job, key=f"{key}_live")
        if jobs.job_state(job)["state"] == "running":
            return
    sets = [Path(p) for p in rows.get("set_dir", pd.Series(dtype=str)).dropna()]
    if not sets:
        return
    c1, c2 = st.columns([3, 1])
    chosen = c1.selectbox("Set to evaluate against the reference", sets, format_func=common.rel, key=f"{key}_set")
    if c2.button("Compute COV", key=f"{key}_run", icon=":material/scatter_plot:"):
        with common.user_errors():
            argv = ["evaluate", str(chosen), "--out", str(chosen / "eval.csv"), "--reference", source]
            common.launch(argv, "distribution", jobs.check_name(f"cov-{chosen.name}")[:80], target=chosen,
                          replace_finished=True)
            st.rerun()

"""Compare page: pick evaluated sample sets or run a sweep (checkpoints x prompts x temperatures x top-k x n),
then compare: tables per checkpoint and prompt, macro-averages per temperature, validity against diversity,
space-group and formula distributions, the runs' loss curves side by side; export CSV and markdown."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine.app import dashboard
from engine.crystal import analysis
from engine.evaluate import report, tables
from engine.evaluate.ipt import ipt_table
from engine.evaluate.sweep_config import config_from_dict, dump_sweep_config
from engine.lab import jobs
from engine.lab.errors import InputError
from engine.lab.fsutil import read_json
from engine.lab.runs import read_status
from engine.lab.yamlfiles import read_yaml_mapping
from engine.train import distill_report
from pages import common, stability_panels

st.title("Compare")
s = common.settings()


def _ckpt_label(p: Path) -> str:
    return f"{p.parent.parent.name}-{p.stem}"  # runs/train/<run>/ckpt/<best|last>.pt


def _training(ckpts: list[Path]) -> set[Path]:
    """Checkpoints of runs still training: their files are rewritten while the run goes on."""
    states = {run: read_status(run).get("state") for run in {p.parent.parent for p in ckpts}}
    return {p for p in ckpts if states[p.parent.parent] in ("running", "pending")}


def _parse_prompts(text: str) -> list:
    """One prompt per line: ``Na2Cl2`` (a cell composition), ``NaCl 4 Fm-3m`` (formula unit, Z, space group),
    or ``-`` for the unconditional prompt."""
    prompts: list = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts == ["-"]:
            prompts.append("")
        elif len(parts) == 1:
            prompts.append(parts[0])
        else:
            try:
                spec = {"formula": parts[0], "z": int(parts[1])}
            except ValueError:
                raise InputError(f"prompt line {line!r}: the second word must be Z (a whole number)") from None
            if len(parts) > 2:
                spec["spacegroup"] = " ".join(parts[2:])
            prompts.append(spec)
    if not prompts:
        raise InputError("give at least one prompt (one per line)")
    return prompts


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"{what} must be numbers separated by commas, got {text!r}") from None
    if not values:
        raise InputError(f"give at least one value for {what}")
    return values


# --- launch a sweep ------------------------------------------------------------------------------------------
with st.expander("Run a sweep", expanded=not common.sweeps()):
    ckpts = common.checkpoints()
    if not ckpts:
        st.info("No checkpoint yet: train one on the Train page first.")
    else:
        training = _training(ckpts)
        # The newest finished run's best checkpoint: one still training would change under the sweep.
        default = [p for p in ckpts if p not in training][:1]
        with st.form("sweep_form"):
            c1, c2 = st.columns([1, 2])
            name = c1.text_input("Sweep name", value="sweep", key="sweep_name")
            chosen = c2.multiselect("Checkpoints", ckpts, default=default, key="sweep_ckpts",
                                    format_func=lambda p: common.rel(p) + (" (still training)" if p in training
                                                                           else ""))
            c1, c2 = st.columns([1, 2])
            prompt_text = c1.text_area("Prompts (one per line)", "Na2Cl2\nMg1O1", height=110, key="sweep_prompts",
                                       help="A cell composition (Na2Cl2), or formula unit, Z and space group "
                                            "(NaCl 4 Fm-3m); '-' is unconditional")
            with c2:
                a, b, c = st.columns(3)
                temps = a.text_input("Temperatures", "0.8", key="sweep_temps")
                topks = b.text_input("Top-k", "10", key="sweep_topk")
                ns = c.text_input("Samples per cell", "4", key="sweep_n")
                a, b, c = st.columns(3)
                seed = a.number_input("Seed", 0, 2**31 - 1, 1, key="sweep_seed")
                max_tokens = b.number_input("Max new tokens", 16, 20_000, 3000, key="sweep_max_tokens")
                device = c.selectbox("Device", ["auto", "cpu", "cuda"], key="sweep_device")
            go_ = st.form_submit_button("Run sweep", icon=":material/grid_view:", key="sweep_run")
        if go_:
            with common.user_errors():
                name = jobs.check_name(name, "sweep name")
                if not chosen:
                    raise InputError("choose at least one checkpoint")
                out = s.sweeps_dir / name
                if out.exists():
                    raise InputError(f"sweep {name!r} already exists in {out}; choose another name")
                labels = {_ckpt_label(p): str(p) for p in chosen}
                config = config_from_dict({
                    "name": name, "checkpoints": labels, "prompts": _parse_prompts(prompt_text),
                    "temperatures": _numbers(temps, float, "temperatures"), "top_k": _numbers(topks, int, "top-k"),
                    "n": _numbers(ns, int, "samples per cell"), "seeds": [int(seed)],
                    "max_new_tokens": int(max_tokens), "device": device,
                }, source="sweep form")
                job_dir = common.jobs_root("sweep") / name
                job_dir.mkdir(parents=True, exist_ok=True)
                request = job_dir / "sweep_request.yaml"
                request.write_text(dump_sweep_config(config), encoding="utf-8")
                common.launch(["sweep", str(request), "--out", str(out)], "sweep", name, target=out)
                st.session_state["compare_sweep"] = str(out)

job = common.current_job("sweep")
if job is not None:
    common.live_job(job, key="sweep_job")
    state = jobs.job_state(job)
    if state["state"] == "running":
        status = (state.get("run_status") or {})
        done, total = status.get("cells_done") or 0, status.get("cells_total") or 0
        st.progress(done / total if total else 0.0, text=f"{done}/{total} cells")

# --- distillation chains (engine/train/chain.py writes distill_report.json) ----------------------------------
distill_reports = distill_report.find_reports(common.settings().runs_dir)
if distill_reports:
    with st.expander(f"Distillation reports ({len(distill_reports)})"):
        pick = st.selectbox("Report", distill_reports, format_func=common.rel, key="compare_distill_pick")
        st.table(distill_report.report_table(read_json(pick)).set_index("model"))
        st.caption("Validation loss on the real validation data; gap closed = (baseline - student) / (baseline - "
                   "teacher); rates under identical sampling; distill_report.md beside the json defines every column.")

# --- what to compare -----------------------------------------------------------------------------------------
mode = st.radio("Compare", ["A sweep", "Sample sets"], horizontal=True, key="compare_mode")
samples = None
if mode == "A sweep":
    sweeps = [p for p in common.sweeps() if (p / "summary.csv").exists()]
    if not sweeps:
        st.info("No finished sweep yet: run one above.")
        st.stop()
    want = [p for p in sweeps if str(p) == st.session_state.get("compare_sweep")]
    if want:
        common.follow("compare_pick_sweep", want[0])
    sweep = st.selectbox("Sweep", sweeps, format_func=lambda p: p.name, key="compare_pick_sweep")
    with common.user_errors():
        rows = pd.read_csv(sweep / "summary.csv")
        if rows.empty:
            raise InputError(f"sweep {sweep.name} has no finished cell yet")
    if (sweep / "samples.csv").exists():
        samples = pd.read_csv(sweep / "samples.csv")
    title = f"Sweep {sweep.name}"
    ckpt_paths = {}  # label -> path as the user wrote it; without it the report names the absolute paths
    with common.user_errors(stop=False):
        ckpt_paths = read_yaml_mapping(sweep / "sweep.yaml", "sweep config", "run the sweep again to rewrite it"
                                       ).get("checkpoints") or {}
    environment = read_json(sweep / "env.json")
else:
    sets = [p for p in dashboard.find_sample_sets(s.runs_dir, depth=5) if (p / "eval_summary.json").exists()]
    if not sets:
        st.info("No evaluated sample set yet: generate some on the Sample page.")
        st.stop()
    # The user's own sets (Sample page, runs/samples/) come first; sweep cells and others after them.
    own = [p for p in sets if p.is_relative_to(s.samples_dir)]
    sets = own + [p for p in sets if p not in own]
    chosen_sets = st.multiselect("Sample sets", sets, default=(own or sets)[:4], format_func=common.rel,
                                 key="compare_sets")
    if not chosen_sets:
        st.stop()
    with common.user_errors():
        rows = report.compare_sample_sets(chosen_sets)
    # Sets are told apart by their folder name (two sets may share checkpoint, prompt and every setting).
    rows["cell"] = [d.name if d.parent == s.samples_dir else common.rel(d) for d in chosen_sets]
    samples = pd.concat([dashboard.sample_table(d).assign(checkpoint=r.checkpoint, temperature=r.temperature,
                                                          prompt=r.prompt, cell=r.cell)
                         for d, r in zip(chosen_sets, rows.itertuples())], ignore_index=True)
    title = "Sample-set comparison"
    ckpt_paths, environment = {}, None

# --- tables --------------------------------------------------------------------------------------------------
st.subheader("Per checkpoint and prompt")
# A plain HTML table: a handful of rows, readable and copyable as text (st.dataframe draws on a canvas).
st.table(report.per_checkpoint_table(rows, with_set=True).set_index("checkpoint"))
st.caption("Counts read k/n (rate) [95 % Wilson interval]; the markdown report below defines every column.")
if rows["prompt"].nunique() > 1:
    st.subheader("Per prompt (valid)")
    st.dataframe(report.per_prompt_table(rows, "valid"), hide_index=True, key="compare_prompt_table")
macro = report.macro_table(rows)
st.subheader("Macro-average over prompts")
st.dataframe(report.macro_display(rows), hide_index=True, key="compare_macro")
md = report.summary_markdown(rows, title=title, checkpoints=ckpt_paths,
                             environment=environment if isinstance(environment, dict) else None)
e1, e2 = st.columns(2)
e1.download_button("Table (CSV)", rows.to_csv(index=False), "comparison.csv", mime="text/csv",
                   key="compare_csv", icon=":material/download:")
e2.download_button("Report (markdown)", md, "comparison.md", mime="text/markdown", key="compare_md",
                   icon=":material/download:")

# --- translation invariance (issue 16): summaries `crystallab ipt` wrote under <runs>/ipt/ ----------------------
ipt = ipt_table(s.runs_dir / "ipt")
if not ipt.empty:
    st.subheader("Translation invariance (IPT)")
    st.dataframe(ipt, hide_index=True, key="compare_ipt")
    st.caption("IPT = mean minus lowest perplexity over random fractional translations of held-out structures "
               "(0: the model ignores where the atoms sit); written by `crystallab ipt`.")

# --- stability and distribution (issue 13) ---------------------------------------------------------------------
with st.expander("In the shape of the published tables (CDVAE / Gruver, MatterGen)"):
    st.caption("Rows marked as published are the authors' figures under their own protocols, beside ours.")
    st.table(tables.cdvae_table(rows).set_index("system"))
    st.table(tables.mattergen_table(rows).set_index("system"))
stab_tables = {}
for r in rows.itertuples():
    table = stability_panels.stability_table(Path(r.set_dir)) if isinstance(r.set_dir, str) else None
    if table is not None:
        stab_tables[f"{r.checkpoint} / {r.prompt}"] = table
if stab_tables:
    stability_panels.ehull_histogram(stab_tables, key="compare_ehull_hist")
st.subheader("Against a reference set")
reference = stability_panels.reference_picker(key="compare_reference")
if reference is not None and samples is not None and not samples.empty:
    stability_panels.reference_figures(samples, rows, reference, key="compare_ref")

# --- plots ---------------------------------------------------------------------------------------------------
n_total, n_parsed = int(rows["n"].sum()), int(rows["n_parsed"].fillna(0).sum())
if n_parsed == 0:
    # All-zero data gives plotly nothing to scale to (axes of -100 %..100 %): say what happened instead.
    st.info(f"None of the {n_total} samples parsed into a structure, so there is nothing to plot. The failure "
            "reasons are on the Sample page: 'truncated' means raise max new tokens; malformed texts mean the model "
            "needs more training.", icon=":material/info:")
else:
    if int(rows["n_valid"].fillna(0).sum()) == 0:
        st.caption(f"{n_parsed} of {n_total} samples parsed, none is valid: the valid rates below are all 0.")
    left, right = st.columns(2)
    fig = px.line(macro.sort_values("temperature"), x="distinct_spacegroups", y="valid_rate", color="checkpoint",
                  text="temperature", markers=True, title="Validity against diversity (labels: temperature)")
    fig.update_traces(textposition="top center")
    fig.update_layout(xaxis_title="distinct space groups (mean over prompts)", yaxis_title="valid rate", height=360,
                      xaxis_rangemode="tozero", yaxis_range=[0, 1.05], yaxis_tickformat=".0%")
    left.plotly_chart(fig, key="compare_tradeoff")
    fig = px.bar(rows, x="prompt", y="valid_rate", color="checkpoint", barmode="group",
                 title="Valid rate per prompt", hover_data=["temperature", "top_k", "n"])
    fig.update_layout(height=360, yaxis_tickformat=".0%", yaxis_range=[0, 1.05])
    right.plotly_chart(fig, key="compare_valid_bars")

if n_parsed and samples is not None and not samples.empty and "spacegroup" in samples.columns:
    # One bar colour per compared set (T 0.5 and T 1.0 of one checkpoint are two sets, not one checkpoint).
    group = "cell" if "cell" in samples.columns else "checkpoint"
    left, right = st.columns(2)
    sg = samples.dropna(subset=["spacegroup"]).assign(spacegroup=lambda d: d["spacegroup"].map(
        analysis.spacegroup_label)).groupby([group, "spacegroup"]).size().rename("samples")
    left.plotly_chart(px.bar(sg.reset_index(), x="spacegroup", y="samples", color=group, barmode="group",
                             labels={"cell": "set"}, title="Detected space groups per compared set", height=360),
                      key="compare_sgs")
    if "reduced_formula" in samples.columns:
        fm = samples.dropna(subset=["reduced_formula"]).groupby([group, "reduced_formula"]).size()
        right.plotly_chart(px.bar(fm.rename("samples").reset_index().sort_values("samples", ascending=False)
                                  .head(60), x="reduced_formula", y="samples", color=group, barmode="group",
                                  labels={"cell": "set"}, title="Formulas per compared set (top 60)", height=360),
                           key="compare_formulas")

# Loss curves of the runs behind the compared checkpoints.
run_dirs = []
for p in rows.get("checkpoint_path", pd.Series(dtype=str)).dropna().unique():
    run = Path(p).parent.parent
    if (run / "metrics.jsonl").exists() and run not in run_dirs:
        run_dirs.append(run)
if run_dirs:
    st.subheader("Training curves of the compared runs")
    cols = st.columns(min(3, len(run_dirs)))
    for k, run in enumerate(run_dirs):
        df = dashboard.metrics_frame(run)
        fig = go.Figure()
        for split, dash in (("train", None), ("val", "dot")):
            part = df[df["split"] == split]
            fig.add_trace(go.Scatter(x=part["step"], y=part["loss"], name=split, mode="lines", line={"dash": dash}))
        fig.update_layout(title=run.name, xaxis_title="step", yaxis_title="loss", height=300, margin={"t": 40})
        cols[k % len(cols)].plotly_chart(fig, key=f"compare_loss_{k}")

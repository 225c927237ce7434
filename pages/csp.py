"""Structure-prediction page: run the CSP benchmark (a detached ``crystallab csp`` job) on known structures (an
upload, a dataset or sample set of the lab, or an allowed server path), then read its match rate and RMSE, the per-target table and plots, and put a target next to its best sample in 3D."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st
from pymatgen.core import Composition

from engine.crystal.analysis import load_structure, spacegroup_label
from engine.crystal.postprocess import postprocess
from engine.evaluate import csp
from engine.lab import jobs
from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_bytes, read_json, read_jsonl
from engine.models.family import knobs_text
from pages import common

st.title("Structure prediction")
st.caption("Can the model find known crystals from their composition? Each target is prompted with its cell "
           "composition (optionally its space group); a target counts as found when one of its k samples passes "
           "CDVAE validity and matches it (StructureMatcher stol 0.5, ltol 0.3, angle_tol 10).")
s = common.settings()


@st.cache_data(show_spinner=False, max_entries=16)
def _aggregate(run_dir: str, stamp: float):
    return csp.aggregate(run_dir)


def _stamp(run) -> float:
    """Changes whenever a target finishes (its file lands in targets/)."""
    folder = run / "targets"
    return folder.stat().st_mtime if folder.exists() else 0.0


TARGET_KINDS = ("Upload", "A dataset of this lab", "A sample set of this lab", "Path on the server")


def _dataset_sources() -> dict[str, str]:
    """Datasets of the lab built from one source that is still there (a CSV, folder or archive, or the
    built-in corpus): name -> that source, which the benchmark reads as its targets."""
    out = {}
    for ds in common.datasets():
        sources = (read_json(ds / "dataset.json", {}) or {}).get("sources") or []
        if len(sources) == 1 and (str(sources[0]).startswith("builtin") or Path(sources[0]).exists()):
            out[ds.name] = str(sources[0])
    return out


def _target_source(kind: str, choice, typed: str, run_name: str) -> str:
    """The ``--targets`` argument for the chosen kind of target source (an upload is saved under the runs root).

    Raises:
        InputError: nothing chosen; PathNotAllowed: a typed path outside the allowed folders.
    """
    if kind == "Path on the server":
        if not typed.strip():
            raise InputError("give the target structures: a CSV with a 'cif' column, or a folder / zip of CIFs")
        return str(s.resolve_user_path(typed.strip()))
    if choice is None:
        raise InputError(f"choose the target structures ({kind.lower()}) first")
    if kind == "Upload":
        path = s.runs_dir / "uploads" / "csp" / run_name / Path(choice.name).name
        atomic_write_bytes(path, choice.getvalue())
        return str(path)
    if kind == "A sample set of this lab":
        return str(Path(choice) / "processed")
    return str(choice)


# --- launch --------------------------------------------------------------------------------------------------
runs = common.csp_runs()
with st.expander("Run the benchmark", expanded=not runs):
    ckpt = common.pick_path("Checkpoint", common.checkpoints(), key="csp_ckpt", allow_custom=True, stop=False,
                            help="Checkpoints of runs under runs/train/, or any allowed path (CrystaLLM's ckpt.pt)",
                            empty="No checkpoint under runs/train/ yet: train one on the Train page, or give the "
                                  "path of a checkpoint file (e.g. CrystaLLM's ckpt.pt) below.")
    if ckpt is not None:
        target_kind = st.radio("Target structures from", list(TARGET_KINDS), horizontal=True, key="csp_target_kind",
                               help="A standard split (MP-20, perov-5 test.csv) can be uploaded as it is")
        target_choice = None
        if target_kind == "Upload":
            target_choice = st.file_uploader("CSV with a 'cif' column, or a zip / tar.gz of CIFs",
                                             type=["csv", "zip", "gz", "tgz", "tar", "cif"], key="csp_upload")
        elif target_kind == "A dataset of this lab":
            sources = _dataset_sources()
            if not sources:
                st.info("No dataset whose source files are still here: build one on the Data page, or upload.")
            else:
                target_choice = st.selectbox("Dataset", list(sources), key="csp_dataset",
                                             format_func=lambda d: f"{d} ({Path(sources[d]).name})")
                target_choice = sources.get(target_choice)
        elif target_kind == "A sample set of this lab":
            sets = [p for p in common.sample_sets() if any((p / "processed").glob("*.cif"))]
            if not sets:
                st.info("No sample set with post-processed CIFs yet: sample on the Sample page, or upload.")
            else:
                target_choice = st.selectbox("Sample set", sets, key="csp_sample_set", format_func=common.rel)
        with st.form("csp_form"):
            c1, c2 = st.columns([1, 2])
            name = c1.text_input("Run name", value="csp", key="csp_name")
            targets = ""
            if target_kind == "Path on the server":
                targets = c2.text_input(
                    "Target structures", key="csp_targets", placeholder="/data/mp20/test.csv",
                    help="A CSV with a 'cif' column (CDVAE / MP-20 test split), a folder, zip or tar of CIFs. "
                         "Absolute, or relative to the runs root; its folder must be allowed (`crystallab dashboard "
                         "--data-dir FOLDER` or CRYSTALLAB_DATA_DIRS).")
            c1, c2, c3, c4 = st.columns(4)
            k = c1.number_input("Samples per target (k)", 1, 1000, 20, key="csp_k")
            limit = c2.number_input("Targets (0 = all)", 0, 1_000_000, 100, key="csp_limit",
                                    help="A random subset of this many targets (seeded)")
            subset_seed = c3.number_input("Subset seed", 0, 2**31 - 1, 0, key="csp_subset_seed")
            seed = c4.number_input("Sampling seed", 0, 2**31 - 1, 1337, key="csp_seed")
            c1, c2, c3, c4 = st.columns(4)
            temperature = c1.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key="csp_temp",
                                    help="1.0 with top-k 10 is CrystaLLM's published setting")
            top_k = c2.slider("Top-k (0 = off)", 0, 100, 10, key="csp_topk")
            max_tokens = c3.number_input("Max new tokens", 16, 20_000, 1024, key="csp_max_tokens")
            device = c4.selectbox("Device", ["auto", "cpu", "cuda"], key="csp_device")
            with_sg = st.checkbox("Give each target's space group in the prompt", key="csp_with_sg")
            go_ = st.form_submit_button("Run benchmark", icon=":material/travel_explore:", key="csp_run")
        if go_:
            with common.user_errors():
                name = jobs.check_name(name, "run name")
                out = s.csp_dir / name
                if out.exists():
                    raise InputError(f"run {name!r} already exists in {out}; choose another name")
                target_path = _target_source(target_kind, target_choice, targets, name)
                argv = ["csp", "--ckpt", str(ckpt), "--targets", str(target_path), "--out", str(out), "--k", str(k),
                        "--subset-seed", str(subset_seed), "--seed", str(seed), "--temperature", str(temperature),
                        "--top-k", str(top_k), "--max-new-tokens", str(max_tokens), "--device", device]
                if limit:
                    argv += ["--limit", str(limit)]
                if with_sg:
                    argv.append("--spacegroup")
                common.launch(argv, "csp", name, target=out)
                st.session_state["csp_view"] = str(out)

job = common.current_job("csp")
starting = False
if job is not None:
    common.live_job(job, key="csp_job")
    state = jobs.job_state(job)
    if state["state"] == "running":
        status = state.get("run_status") or {}
        done, total = status.get("done") or 0, status.get("total") or 0
        starting = not total
        st.progress(done / total if total else 0.0,
                    text=f"{done}/{total} targets" if total else "Reading the targets and loading the model...")

# --- results -------------------------------------------------------------------------------------------------
runs = common.csp_runs()
if not runs:
    st.info("The benchmark is starting: its results appear here as targets finish." if starting
            else "No benchmark run yet: start one above.")
    st.stop()
want = [p for p in runs if str(p) == st.session_state.get("csp_view")]
if want:
    common.follow("csp_pick", want[0])
run = st.selectbox("Run", runs, format_func=lambda p: p.name, key="csp_pick")
with common.user_errors():
    summary, table = _aggregate(str(run), _stamp(run))
if table.empty:
    st.info(f"{run.name}: no target finished yet.")
    st.stop()

if not summary["complete"]:
    st.warning(f"Partial: {summary['n_targets']} of {summary['n_targets_planned']} targets finished; the figures "
               "cover those.", icon=":material/hourglass_top:")
c = st.columns(5)
c[0].metric("Targets", summary["n_targets"])
c[1].metric("Match rate", csp._pct(summary["match_rate"]),
            help=summary["definitions"]["match_rate"])
c[2].metric("RMSE", "n/a" if summary["rmse"] is None else f"{summary['rmse']:.4f}",
            help=summary["definitions"]["rmse"])
c[3].metric("Valid samples", csp._pct(summary["valid_sample_rate"]),
            help=summary["definitions"]["valid_sample_rate"])
c[4].metric("Match rate, structural filter", csp._pct(summary["match_rate_struct_only"]),
            help=summary["definitions"]["match_rate_struct_only"])
if summary.get("n_rejected"):
    rejected = list(read_jsonl(run / "rejects.jsonl"))
    st.caption(f"{summary['n_rejected']} target(s) could not be prompted (disordered, an element outside the "
               "vocabulary, unreadable) and are not counted in these figures.")
    if rejected:
        with st.expander(f"Rejected targets ({len(rejected)})"):
            st.dataframe(pd.DataFrame(rejected), hide_index=True, key="csp_rejects")
samp = summary["sampling"]
st.caption(f"k {samp['k']} | {knobs_text(samp)} | seed {samp['seed']} | "
           f"{'with' if samp['with_spacegroup'] else 'without'} space group | checkpoint "
           f"{summary['checkpoint'].get('path')} (step {summary['checkpoint'].get('step')}) | targets "
           f"{summary['targets_source']}")
d1, d2 = st.columns(2)
d1.download_button("Report (markdown)", csp.summary_markdown(summary), f"{run.name}.md", mime="text/markdown",
                   key="csp_md", icon=":material/download:")
d2.download_button("Per-target results (CSV)", table.to_csv(index=False), f"{run.name}-results.csv",
                   mime="text/csv", key="csp_csv", icon=":material/download:")

left, right = st.columns(2)
# Atoms in the target cell as prompted (its cell formula), the number the chart's bins name.
by = table.assign(atoms=[int(Composition(f).num_atoms) for f in table["cell_formula"]])
by["atoms_bin"] = pd.cut(by["atoms"], [0, 4, 8, 12, 16, 20, 10_000],
                         labels=["1-4", "5-8", "9-12", "13-16", "17-20", ">20"])
rate = by.groupby("atoms_bin", observed=True)["matched"].agg(["mean", "size"]).reset_index()
fig = px.bar(rate, x="atoms_bin", y="mean", text="size", title="Match rate by atoms in the target cell")
fig.update_traces(textposition="outside", cliponaxis=False)
fig.update_layout(yaxis_tickformat=".0%", yaxis_title="match rate", xaxis_title="atoms in the cell",
                  yaxis_range=[0, 1.1], height=340, margin={"t": 50})
left.plotly_chart(fig, key="csp_by_sites")
left.caption("Numbers above the bars: targets in the bin.")
matched = table[table["matched"].astype(bool)]
if not matched.empty:
    upper = max(0.01, 1.05 * float(matched["best_rms"].max()))
    fig = px.histogram(matched, x="best_rms", nbins=30, range_x=[0, upper],
                       title="Best RMS distance of matched targets")
    fig.update_layout(xaxis_title="RMS displacement / (V/N)^(1/3)", yaxis_title="targets", height=340)
    right.plotly_chart(fig, key="csp_rms_hist")

st.dataframe(table, hide_index=True, key="csp_table", column_config={
    "best_rms": st.column_config.NumberColumn("best_rms", format="%.4f"),
    "best_rms_struct_only": st.column_config.NumberColumn("best_rms_struct_only", format="%.4f")})

# --- one target ----------------------------------------------------------------------------------------------
st.subheader("Target and sample")
labels = {int(r.index): f"{r.name} ({r.cell_formula}, {spacegroup_label(r.spacegroup) or r.spacegroup})" + (" · matched" if r.matched else "")
          for r in table.itertuples()}
pick = st.selectbox("Target", list(labels), format_func=labels.get, key="csp_target")
record = csp.target_record(run, pick)
if record is None:
    st.stop()
parsed = [smp for smp in record["samples"] if smp["n_sites"] is not None]
if not parsed:
    st.warning("None of this target's samples could be read as a structure.")
options = [smp["index"] for smp in parsed]
default = options.index(record["best_sample"]) if record["best_sample"] in options else 0
left, right = st.columns(2)
with left:
    st.markdown(f"**Target** {record['name']}: {record['cell_formula']}, {record['spacegroup']}")
    with common.user_errors(stop=False):
        common.structure_view(load_structure(record["target_cif"], label=record["name"]), key="csp_target3d",
                              height=340)
with right:
    if parsed:
        chosen = st.selectbox("Sample", options, index=default, key="csp_sample", format_func=lambda i: (
            f"#{i}" + (f" · rms {record['samples'][i]['rms']:.4f}" if record["samples"][i]["rms"] is not None
                       else "") + (" · matched" if record["samples"][i]["matched"] else "")
            + ("" if record["samples"][i]["valid"] else " · not valid")))
        processed = postprocess(record["samples"][chosen]["text"]).cif
        with common.user_errors(stop=False):
            common.structure_view(load_structure(processed, label=f"sample {chosen}"), key="csp_sample3d",
                                  height=340)
        with st.expander("Sample CIF"):
            st.code(processed, language=None)

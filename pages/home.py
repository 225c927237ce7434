"""Home page: what the lab holds right now and where each step of the loop lives (the page served at ``/``)."""

from __future__ import annotations

import streamlit as st

from engine.lab import jobs
from pages import common

st.title("crystallab")
st.write("A lab for crystal-structure language models: build CrystaLLM-compatible training sets, train or "
         "fine-tune, sample crystals from composition / Z / space-group prompts, and evaluate and compare them. "
         "Every step here is also a `crystallab` command and an engine function, and every result is a run folder.")

counts = {
    "Datasets": len(common.datasets()),
    "Training runs": len(common.train_runs()),
    "Checkpoints": len(common.checkpoints()),
    "Sample sets": len(common.sample_sets()),
    "Sweeps": len(common.sweeps()),
    "CSP runs": len(common.csp_runs()),
}
cols = st.columns(len(counts))
for col, (label, n) in zip(cols, counts.items()):
    col.metric(label, n)
running = [d for d in common.all_jobs() if jobs.job_state(d)["state"] == "running"]
if running:
    st.info("Running now: " + ", ".join(f"{d.parent.name} {d.name}" for d in running), icon=":material/sync:")

st.subheader("The loop")
STEPS = [
    ("pages/data.py", "Data", "build a training set from your CIFs (folder, zip, CSV with a `cif` column), a "
                              "CrystaLLM token archive, or the built-in corpus"),
    ("pages/train.py", "Train", "train from scratch on CPU (`tiny_cpu`: a one-minute smoke test; `quick_cpu`: "
                                "4 minutes, samples that parse; `demo_cpu`: 14 minutes, mostly valid crystals) or "
                                "fine-tune a CrystaLLM checkpoint; live loss curves"),
    ("pages/sample.py", "Sample", "generate crystals from a prompt; gallery, validity, 3D view, downloads"),
    ("pages/compare.py", "Compare", "sweeps over checkpoints, prompts and temperatures; tables, plots, report"),
    ("pages/csp.py", "Structure prediction", "match rate and RMSE against known structures (CSP benchmark)"),
    ("pages/structure.py", "Structure", "inspect any CIF: symmetry, neighbours, powder XRD"),
]
for path, title, what in STEPS:
    c1, c2 = st.columns([1, 4])
    c1.page_link(path, label=title)
    c2.markdown(what)
if not counts["Datasets"]:
    st.caption("New here? Start on Data: build the built-in corpus (no downloads), then train `quick_cpu` and "
               "sample from it.")

"""Data page: build a token dataset (uploads, a server path, a CrystaLLM token archive or the built-in corpus),
then inspect it: rejects with reasons, tokens per CIF, element and space-group frequencies."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from engine import jobs
from engine.errors import InputError
from engine.fsutil import atomic_write_bytes, read_json, read_jsonl
from pages import common

st.title("Data")
s = common.settings()

# --- build ---------------------------------------------------------------------------------------------------
with st.expander("Build a dataset", expanded=not common.datasets()):
    kind = st.radio("Source", ["Built-in corpus", "Upload CIFs / zip / CSV", "Folder or file on the server",
                               "CrystaLLM token archive"], horizontal=True, key="data_kind")
    with st.form("data_build"):
        name = st.text_input("Dataset name", value="builtin" if kind == "Built-in corpus" else "",
                             key="data_name", help="Folder name under runs/data/")
        argv_extra: list[str] = []
        uploads, server_path = None, ""
        if kind == "Built-in corpus":
            c1, c2 = st.columns(2)
            n = c1.number_input("Structures", 20, 200_000, 5000, step=100, key="data_corpus_n")
            seed = c2.number_input("Corpus seed", 0, 10**6, 0, key="data_corpus_seed")
        elif kind == "Upload CIFs / zip / CSV":
            uploads = st.file_uploader("Files", type=["cif", "zip", "csv", "gz", "tgz", "tar"],
                                       accept_multiple_files=True, key="data_uploads")
        else:
            server_path = st.text_input(
                "Path on the server", key="data_path",
                help="A folder of CIFs, a .cif/.csv/.zip/.tar.gz, or tokens_v1_train_val.tar.gz; it must lie "
                     "under the runs root or a folder in CRYSTALLAB_DATA_DIRS.")
        if kind == "CrystaLLM token archive":
            c1, c2, c3 = st.columns(3)
            n_train = c1.number_input("Train CIFs (0 = all)", 0, 10**7, 0, key="data_ntrain")
            n_val = c2.number_input("Val CIFs (0 = all)", 0, 10**7, 0, key="data_nval")
            min_len = c3.number_input("Min tokens per CIF", 0, 10_000, 0, key="data_minlen")
            argv_extra += [a for flag, v in (("--n-train", n_train), ("--n-val", n_val), ("--min-len", min_len))
                           if v for a in (flag, str(int(v)))]
        else:
            val_fraction = st.slider("Validation share", 0.0, 0.5, 0.1, 0.01, key="data_val")
            argv_extra += ["--val-fraction", str(val_fraction)]
        submitted = st.form_submit_button("Build", icon=":material/play_arrow:", key="data_build_go")

    if submitted:
        with common.user_errors():
            name = jobs.check_name(name, "dataset name")
            out = s.datasets_dir / name
            if out.exists():
                raise InputError(f"dataset {name!r} already exists in {out}; choose another name")
            if kind == "Built-in corpus":
                argv = ["data", "corpus", "--out", str(out), "--n", str(int(n)), "--seed", str(int(seed))]
            elif kind == "Upload CIFs / zip / CSV":
                if not uploads:
                    raise InputError("no files uploaded: add CIF, zip, tar.gz or CSV files first")
                folder = s.runs_dir / "uploads" / name
                for f in uploads:
                    atomic_write_bytes(folder / Path(f.name).name, f.getvalue())
                argv = ["data", "build", *[str(folder / Path(f.name).name) for f in uploads], "--out", str(out)]
            else:
                if not server_path.strip():
                    raise InputError("give a path on the server")
                src = s.resolve_user_path(server_path.strip())
                sub = "import-tokens" if kind == "CrystaLLM token archive" else "build"
                argv = ["data", sub, str(src), "--out", str(out)]
            argv += argv_extra
            common.launch(argv, "data", name, target=out)

job = common.current_job("data")
if job is not None:
    common.live_job(job, key="data_job", stoppable=False)

# --- inspect -------------------------------------------------------------------------------------------------
found = common.datasets()
if not found:
    st.info("No dataset yet. Build one above (the built-in corpus needs no files).")
    st.stop()
ds = common.pick_path("Dataset", found, key="data_pick")
stats = read_json(ds / "stats.json", {}) or {}
prov = read_json(ds / "dataset.json", {}) or {}

c = st.columns(5)
c[0].metric("Train CIFs", f"{stats.get('train_cifs', 0):,}")
c[1].metric("Val CIFs", f"{stats.get('val_cifs', 0):,}")
c[2].metric("Train tokens", f"{stats.get('train_tokens', 0):,}")
c[3].metric("Rejected", f"{stats.get('rejected', 0):,}")
c[4].metric("Duplicates removed", f"{stats.get('duplicates_removed', 0):,}")
st.caption(f"Sources: {', '.join(prov.get('sources', [])) or 'unknown'} | fingerprint "
           f"{str(prov.get('fingerprint', ''))[:12]} | unknown tokens {stats.get('unk_tokens', 0)}")

left, right = st.columns(2)
per = stats.get("tokens_per_cif") or {}
if per:
    hist = per["histogram"]
    edges = hist["bin_edges"]
    df = pd.DataFrame({"tokens": [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])], "CIFs": hist["counts"]})
    fig = px.bar(df, x="tokens", y="CIFs", title=f"Tokens per CIF (median {per['median']:g}, max {per['max']})")
    fig.update_layout(bargap=0, height=320)
    left.plotly_chart(fig, key="data_hist")
els = stats.get("element_counts") or {}
if els:
    df = pd.DataFrame({"element": list(els), "CIFs": list(els.values())}).head(40)
    right.plotly_chart(px.bar(df, x="element", y="CIFs", title="Element frequency (top 40)", height=320),
                       key="data_elements")
sgs = stats.get("spacegroup_counts") or {}
if sgs:
    df = pd.DataFrame({"space group": list(sgs), "CIFs": list(sgs.values())}).head(40)
    st.plotly_chart(px.bar(df, x="space group", y="CIFs", title="Space-group frequency (top 40)", height=320),
                    key="data_sgs")

rejects = pd.DataFrame(list(read_jsonl(ds / "rejects.jsonl")), columns=["source", "name", "reason"])
st.subheader(f"Rejects ({len(rejects)})")
if rejects.empty:
    st.caption("Every input was usable.")
else:
    reasons = rejects["reason"].str.split(":").str[0].value_counts().rename_axis("reason").reset_index()
    st.dataframe(reasons, hide_index=True, key="data_reject_reasons")
    st.dataframe(rejects, hide_index=True, key="data_rejects")

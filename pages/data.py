"""Data page: build a token dataset (uploads, a server path, a CrystaLLM token archive or the built-in corpus),
watch the build's progress, then inspect it: rejects with reasons, tokens per CIF, element and space-group
frequencies."""

from __future__ import annotations

import datetime as dt
import re
import tempfile
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.data.datasets import build_dataset
from engine.lab import jobs
from engine.lab.errors import CrystallabError, InputError
from engine.lab.fsutil import atomic_write_bytes, read_json, read_jsonl
from pages import common

TOP_N = 40
"""Bars in the element and space-group frequency charts."""


def _most_frequent(counts: dict[str, int], n: int = TOP_N) -> pd.DataFrame:
    """The ``n`` largest counts, largest first (ties alphabetical): stats.json stores its keys sorted by name."""
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return pd.DataFrame(top, columns=["name", "CIFs"])


def _build_sources(state: dict) -> str:
    """What a data job reads, as shown beside its progress: file names, or the corpus it generates."""
    argv = state.get("argv") or []
    if argv[1:2] == ["corpus"] and "--n" in argv:
        return f"the built-in corpus ({argv[argv.index('--n') + 1]} structures)"
    files = argv[2:argv.index("--out")] if "--out" in argv else argv[2:]
    return ", ".join(Path(f).name for f in files)


def _default_name(kind: str) -> str:
    """A dataset name that is free: ``builtin`` for the corpus (dated once taken), ``upload-YYYYMMDD-HHMM`` for
    uploads, ``data-YYYYMMDD-HHMM`` otherwise."""
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M}"
    if kind == "Built-in corpus":
        return "builtin" if not (common.settings().datasets_dir / "builtin").exists() else f"builtin-{stamp}"
    return f"upload-{stamp}" if kind.startswith("Upload") else f"data-{stamp}"


# The build's own words for its settings, and the page's (its error names the CLI flag).
_PAGE_WORDS = ((re.compile(r"\(?--val-fraction 0\)?"), "(set Validation share to 0)"),
               (re.compile(r"--val-fraction|val_fraction"), "Validation share"))


def _page_words(text: str) -> str:
    for pattern, words in _PAGE_WORDS:
        text = pattern.sub(words, text)
    return text


@st.cache_data(show_spinner=False, max_entries=8)
def _rejects_of(files: tuple[str, ...], stamp: float) -> pd.DataFrame | None:
    """Which of a failed build's files were rejected or dropped as duplicates, and why: the engine's own build,
    train-only, into a throwaway folder (a failed build leaves no rejects.jsonl behind). None when no file is
    usable at all (the build's error then names the reasons)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "check"
        try:
            build_dataset(list(files), out, val_fraction=0.0, workers=1)
        except CrystallabError:
            return None
        rows = list(read_jsonl(out / "rejects.jsonl"))
        rows += [{"source": d["source"], "name": d["name"], "reason": f"duplicate of {d.get('kept_name', '?')}"}
                 for d in read_jsonl(out / "duplicates.jsonl")]
    return pd.DataFrame(rows, columns=["source", "name", "reason"])


st.title("Data")
s = common.settings()
upload_round = st.session_state.setdefault("data_upload_round", 0)

# --- build ---------------------------------------------------------------------------------------------------
with st.expander("Build a dataset", expanded=not common.datasets()):
    kind = st.radio("Source", ["Built-in corpus", "Upload CIFs / zip / CSV", "Folder or file on the server",
                               "CrystaLLM token archive"], horizontal=True, key="data_kind")
    if st.session_state.get("_data_name_kind") != kind or "data_name" not in st.session_state:
        # Each source has its own default name (the corpus' "builtin" is taken once it is built, and an upload
        # named after it failed with "already exists"); a widget's value= only counts on its first render.
        st.session_state["_data_name_kind"] = kind
        st.session_state["data_name"] = _default_name(kind)
    with st.form("data_build"):
        name = st.text_input("Dataset name", key="data_name", help="Folder name under runs/data/")
        argv_extra: list[str] = []
        uploads, server_path = None, ""
        if kind == "Built-in corpus":
            c1, c2 = st.columns(2)
            n = c1.number_input("Structures", 20, 200_000, 5000, step=100, key="data_corpus_n")
            seed = c2.number_input("Corpus seed", 0, 10**6, 0, key="data_corpus_seed")
        elif kind == "Upload CIFs / zip / CSV":
            # The key changes after each launched build, which empties the list (see below).
            uploads = st.file_uploader("Files", type=["cif", "zip", "csv", "gz", "tgz", "tar"],
                                       accept_multiple_files=True, key=f"data_uploads_{upload_round}")
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
            c1, c2 = st.columns(2)
            val_fraction = c1.slider("Validation share", 0.0, 0.5, 0.1, 0.01, key="data_val")
            augment = c2.number_input("Translated copies per training CIF", 0, 100, 0, key="data_augment",
                                      help="Translation augmentation (Gruver et al.): each copy is the canonical "
                                           "CIF of the crystal with all atoms moved by a random fractional "
                                           "translation. Validation CIFs are never augmented.")
            argv_extra += ["--val-fraction", str(val_fraction)]
            if augment:
                argv_extra += ["--augment-translations", str(int(augment))]
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
                argv = ["data", "build", *[str(folder / Path(f.name).name) for f in uploads], "--out", str(out),
                        "--confine"]
            else:
                if not server_path.strip():
                    raise InputError("give a path on the server")
                src = s.resolve_user_path(server_path.strip())
                sub = "import-tokens" if kind == "CrystaLLM token archive" else "build"
                argv = ["data", sub, str(src), "--out", str(out)] + (["--confine"] if sub == "build" else [])
            argv += argv_extra
            common.launch(argv, "data", name, target=out)
        if kind == "Upload CIFs / zip / CSV":
            # The files stay in the uploader while this build runs and after it fails (fix a setting, build
            # again); once it has built, a new key empties the list so they cannot join the next build unnoticed.
            st.session_state["data_upload_job"] = str(common.jobs_root("data") / name)

# --- the build in progress -----------------------------------------------------------------------------------
job = common.current_job("data")
building, failed_build = False, None
upload_job = st.session_state.get("data_upload_job")
if upload_job and jobs.job_state(Path(upload_job))["state"] == "finished":
    st.session_state["data_upload_job"] = None
    st.session_state["data_upload_round"] = upload_round + 1
    st.rerun()
if job is not None:
    state = jobs.job_state(job)
    if state["state"] in ("failed", "died"):
        failed_build = state
    if state.get("target"):
        st.session_state["data_view"] = state["target"]  # shown below once it is built
    building = state["state"] == "running"
    if building:
        @st.fragment(run_every=common.POLL_S)
        def _watch() -> None:
            now = jobs.job_state(job)
            if now["state"] != "running":
                st.rerun(scope="app")  # the new dataset appears below
            done = jobs.progress(job)
            what = _build_sources(now)
            if done and done[1]:
                if (now.get("argv") or [""])[:2] == ["data", "import-tokens"]:  # its bar counts bytes
                    text = f"{done[0] / 1e6:,.1f}/{done[1] / 1e6:,.1f} MB imported"
                else:
                    text = f"{done[0]:,}/{done[1]:,} CIFs canonicalized"
                st.progress(min(1.0, done[0] / done[1]), text=f"Building {job.name}: {text} ({what})")
            else:
                st.progress(0.0, text=f"Building {job.name}: reading {what}...")
            common.job_panel(job, key="data_job", stoppable=False)
            # A build holds nothing worth saving half-way: stop it at once (nothing is published).
            if st.button("Stop", key="data_stop", icon=":material/stop:"):
                jobs.request_stop(job, grace_s=0)
                st.toast("Stop requested: the build ends without writing a dataset")

        _watch()
    elif failed_build is not None:
        st.error(f"Building {job.name!r} failed: {_page_words(failed_build.get('message') or '')}",
                 icon=":material/error:")
        argv = failed_build.get("argv") or []
        files = [a for a in argv[2:argv.index("--out")]] if argv[:2] == ["data", "build"] and "--out" in argv \
            else []
        if files:
            stamp = max((Path(f).stat().st_mtime for f in files if Path(f).exists()), default=0.0)
            with st.spinner("Checking which files were rejected..."):
                found_rejects = _rejects_of(tuple(files), stamp)
            if found_rejects is not None:
                st.subheader(f"Rejects of this build ({len(found_rejects)})")
                if found_rejects.empty:
                    st.caption("Every file was usable: the build failed for the reason above.")
                else:
                    st.dataframe(found_rejects, hide_index=True, key="data_failed_rejects")
        with st.expander("Log"):
            st.code(_page_words(jobs.tail_log(job, 15)) or "(empty)", language=None)
    else:
        common.job_panel(job, key="data_job", stoppable=False)

# --- inspect -------------------------------------------------------------------------------------------------
found = common.datasets()
if not found:
    if building:
        st.info(f"Dataset {job.name!r} is being built; it appears here when the build finishes.")
    else:
        st.info("No dataset yet. Build one above (the built-in corpus needs no files).")
    st.stop()
want = [p for p in found if str(p) == st.session_state.get("data_view")]
if want:
    common.follow("data_pick", common.rel(want[0]))  # the dataset just built, once; the user may pick another
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
    df = _most_frequent(els).rename(columns={"name": "element"})
    right.plotly_chart(px.bar(df, x="element", y="CIFs", title=f"Element frequency (top {TOP_N})", height=320),
                       key="data_elements")
sgs = stats.get("spacegroup_counts") or {}
if sgs:
    df = _most_frequent(sgs).rename(columns={"name": "space group"})
    st.plotly_chart(px.bar(df, x="space group", y="CIFs", title=f"Space-group frequency (top {TOP_N})",
                           height=320), key="data_sgs")

if failed_build is not None:
    st.stop()  # the rejects shown are the failed build's, not this older dataset's
rejects = pd.DataFrame(list(read_jsonl(ds / "rejects.jsonl")), columns=["source", "name", "reason"])
st.subheader(f"Rejects of {ds.name} ({len(rejects)})")
if stats.get("skipped"):
    names = ", ".join(f"{f['name']} ({f.get('reason', 'not a .cif file')})"
                      for f in stats.get("skipped_files", [])[:10])
    st.caption(f"Skipped {stats['skipped']:,} file(s) that were not read: {names}"
               + (", ..." if stats["skipped"] > 10 else ""))
if rejects.empty:
    st.caption("Every input was usable.")
else:
    reasons = rejects["reason"].str.split(":").str[0].value_counts().rename_axis("reason").reset_index()
    st.dataframe(reasons, hide_index=True, key="data_reject_reasons")
    st.dataframe(rejects, hide_index=True, key="data_rejects")

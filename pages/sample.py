"""Sample page: pick a checkpoint, build a prompt, set the sampling knobs and generate (a detached job);
then browse the results: a gallery with validity badges and the reason a sample is not valid, a dialog with the
chosen crystal in 3D and its CIF (or the raw text of one that does not parse), downloads."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import streamlit as st

from engine.app import dashboard
from engine.crystal.analysis import load_structure, spacegroup_label
from engine.crystal.prompts import build_prompts, spacegroup_choices
from engine.lab import jobs
from engine.lab.errors import InputError
from engine.lab.fsutil import read_json
from engine.models.family import knob_argv, knobs_text
from pages import common, mcts_panel, stability_panels

st.title("Sample")


@st.cache_resource(show_spinner=False)
def _gpt_knobs():
    from engine.models.crystallm import CrystaLLMGPT

    return CrystaLLMGPT.knobs


CrystaLLMGPT_KNOBS = _gpt_knobs()
s = common.settings()
PER_PAGE = 12


@st.cache_data(show_spinner=False, max_entries=32)
def _model_card(path: str, mtime: float) -> dict:
    return dashboard.model_card(path)


# Widgets for the CrystaLLM GPT family's knobs (their keys are part of the page's contract with its tests);
# any other family's knobs get a widget from their kind and range.
_GPT_WIDGETS = {
    "temperature": ("slider", "Temperature", 0.0, 2.0, 0.05, "sample_temp"),
    "top_k": ("slider", "Top-k (0 = off)", 0, 100, 1, "sample_topk"),
    "top_p": ("slider", "Top-p (1 = off)", 0.05, 1.0, 0.05, "sample_topp"),
    "max_new_tokens": ("number", "Max new tokens", 16, 20_000, 1, "sample_max_tokens"),
    "constrain": ("checkbox", "Constrain elements and space group", None, None, None, "sample_constrain"),
}


def _knob_widget(container, knob, family: str):
    """One input for a sampling knob, within the knob's range; returns its value."""
    if knob.name in _GPT_WIDGETS and family == "crystallm-gpt":
        kind, label, lo, hi, step, key = _GPT_WIDGETS[knob.name]
        if kind == "slider":
            return container.slider(label, lo, hi, knob.default, step, key=key, help=knob.help)
        if kind == "checkbox":
            return container.checkbox(label, value=bool(knob.default), key=key, help=knob.help)
        return container.number_input(label, lo, hi, knob.default, key=key, help=knob.help)
    key = f"sample_knob_{family}_{knob.name}"
    label = knob.name.replace("_", " ").capitalize()
    if knob.kind == "bool":
        return container.checkbox(label, value=bool(knob.default), key=key, help=knob.help)
    if knob.kind == "choice":
        return container.selectbox(label, knob.choices, index=knob.choices.index(knob.default), key=key, help=knob.help)
    cast = float if knob.kind == "float" else int
    lo = cast(knob.low) if knob.low is not None else None
    hi = cast(knob.high) if knob.high is not None else None
    return container.number_input(label, lo, hi, cast(knob.default), key=key, help=knob.help)


@st.cache_data(show_spinner=False, max_entries=16)
def _table(set_dir: str, mtime: float):
    return dashboard.sample_table(set_dir)


@st.cache_data(show_spinner=False)
def _sg_options() -> list[str]:
    return ["(any)"] + [f"{sym} ({n})" for n, sym in spacegroup_choices()]


# --- generate ------------------------------------------------------------------------------------------------
# The chosen checkpoint and prompt live in the page's address too, so a browser reload (a new session) keeps them
# instead of falling back to the newest checkpoint and Z = 0; otherwise a running job's settings are the default.
remembered = dict(st.query_params)
running = common.current_job("sample")
if running is not None and "ckpt" not in remembered:
    argv = (jobs.job_state(running).get("argv") or [])
    flags = dict(zip(argv[1::2], argv[2::2])) if argv[:1] == ["sample"] else {}
    remembered = {"ckpt": common.rel(Path(flags["--ckpt"])) if "--ckpt" in flags else None,
                  "formula": flags.get("--prompt"), "z": flags.get("--z")}
with st.expander("Generate", expanded=True):
    ckpt = common.pick_path("Checkpoint", common.checkpoints(), key="sample_ckpt", allow_custom=True,
                            default=remembered.get("ckpt"),
                            help="Checkpoints of runs under runs/train/, or any path (e.g. CrystaLLM's ckpt.pt)",
                            empty="No checkpoint under runs/train/ yet: train one on the Train page, or give the "
                                  "path of a checkpoint file (e.g. CrystaLLM's ckpt.pt) below.")
    # A checkpoint that cannot be sampled says why; the sample sets below stay browsable.
    card = None
    with common.user_errors(stop=False):
        card = _model_card(str(ckpt), ckpt.stat().st_mtime)
    if card is not None and card["problem"]:
        st.error(f"{ckpt.name} cannot be used for sampling: {card['problem']}", icon=":material/error:")
        card = None
    if card is not None:
        st.caption(card["caption"] + ("" if card["family"] == "crystallm-gpt" else f" | family {card['family']}"))

        conditional = st.toggle("Condition on a composition", value=True, key="sample_conditional")
        formula, z, sg = None, None, None
        if conditional:
            c1, c2, c3 = st.columns([2, 1, 2])
            formula = c1.text_input("Formula", value=remembered.get("formula") or "NaCl", key="sample_formula",
                                    help="A formula unit with Z (NaCl, Z=4) or a cell composition (Na4Cl4)")
            z_default = int(remembered["z"]) if str(remembered.get("z") or "").isdigit() else 0
            z_in = c2.number_input("Z (0: try 1,2,3,4,6,8)", 0, 32, min(z_default, 32), key="sample_z")
            z = int(z_in) or None
            sg_label = c3.selectbox("Space group", _sg_options(), key="sample_sg",
                                    help="The 227 space groups the CrystaLLM vocabulary can express")
            sg = None if sg_label == "(any)" else sg_label.split(" (")[0]
        st.query_params.update({"ckpt": common.rel(ckpt), "formula": formula or "", "z": str(z or 0)})
        with common.user_errors():
            prompts = build_prompts(formula, z=z, spacegroup=sg)
        st.caption(f"{len(prompts)} prompt(s): " + ", ".join(p.label for p in prompts))

        # Enter in a field of this form does not submit it: only the button starts a job.
        with st.form("sample_form", enter_to_submit=False):
            # The family's own knobs (the checkpoint decides which), three to a row.
            shown = [k for k in card["knobs"] if k.kind != "bool"]
            knobs: dict = {}
            for start in range(0, len(shown), 3):
                cols = st.columns(3)
                for col, knob in zip(cols, shown[start : start + 3]):
                    knobs[knob.name] = _knob_widget(col, knob, card["family"])
            for knob in (k for k in card["knobs"] if k.kind == "bool"):
                knobs[knob.name] = _knob_widget(st, knob, card["family"])
            c1, c2, c3 = st.columns(3)
            n = c1.number_input("Samples per prompt", 1, 100_000, 8, key="sample_n")
            seed = c2.number_input("Seed", 0, 2**31 - 1, 1337, key="sample_seed")
            device = c3.selectbox("Device", ["auto", "cpu", "cuda"], key="sample_device")
            default_name = f"{(prompts[0].formula or 'unconditional')}-{dt.datetime.now():%Y%m%d-%H%M%S}"
            name = st.text_input("Sample set name", value=default_name, key="sample_name")
            go_ = st.form_submit_button("Generate", icon=":material/auto_awesome:", key="sample_generate")
        if go_:
            with common.user_errors():
                name = jobs.check_name(name, "sample set name")
                out = s.samples_dir / name
                if out.exists():
                    raise InputError(f"sample set {name!r} already exists; choose another name")
                argv = ["sample", "--ckpt", str(ckpt), "--n", str(int(n)), *knob_argv(knobs, CrystaLLMGPT_KNOBS),
                        "--seed", str(int(seed)), "--device", device, "--out", str(out)]
                if formula:
                    argv += ["--prompt", formula.strip()]
                if z:
                    argv += ["--z", str(z)]
                if sg:
                    argv += ["--sg", sg]
                same = common.identical_job("sample", argv)
                if same is not None:  # the same request again (a second press): follow the first, start nothing
                    same_dir, same_state = same
                    st.session_state["job_sample"] = str(same_dir)
                    st.session_state["sample_view"] = str(same_state.get("target") or same_dir)
                    st.info(f"The same request (checkpoint, prompt, knobs and seed) is already {same_state['state']} "
                            f"as {same_dir.name!r}; showing it instead of sampling the same crystals twice. Change "
                            "the seed for new samples.", icon=":material/content_copy:")
                else:
                    common.launch(argv, "sample", name, target=out)
                    st.session_state["sample_view"] = str(out)

if card is not None:  # scored decoding (issue 17): the same checkpoint and prompt, searched with a scorer
    with st.expander("Scored decoding (MCTS)", expanded=common.current_job(mcts_panel.KIND) is not None):
        mcts_panel.search(ckpt, formula, z, sg, key="sample_mcts")

job = common.current_job("sample")
if job is not None and jobs.job_state(job)["state"] == "running":
    @st.fragment(run_every=common.POLL_S)
    def _progress() -> None:
        common.following_note("sample")
        state = jobs.job_state(job)
        if state["state"] != "running":
            st.rerun(scope="app")
        done = jobs.progress(job)
        frac = done[0] / done[1] if done and done[1] else 0.0
        st.progress(frac, text=f"Generating {job.name}: " + (f"{done[0]}/{done[1]} samples" if done
                                                               else "loading the model..."))
        if st.button("Stop", key="sample_stop", icon=":material/stop:"):
            jobs.request_stop(job, grace_s=0)

    _progress()
elif job is not None:
    state = jobs.job_state(job)
    if state["state"] in ("failed", "died"):
        common.job_panel(job, key="sample_job")

# --- results -------------------------------------------------------------------------------------------------
sets = dashboard.find_sample_sets(s.samples_dir)
if not sets:
    st.info("No sample set yet: generate one above.")
    st.stop()
view = st.session_state.get("sample_view")
followed = [p for p in sets if view and (p == Path(view) or Path(view) in p.parents)]
if followed:
    common.follow("sample_set", followed[0])
set_dir = st.selectbox("Sample set", sets, format_func=common.rel, key="sample_set")
cfg = read_json(set_dir / "config.json", {}) or {}
summary = read_json(set_dir / "eval_summary.json", {}) or {}
df = _table(str(set_dir), (set_dir / "samples.jsonl").stat().st_mtime
            + ((set_dir / "eval.csv").stat().st_mtime if (set_dir / "eval.csv").exists() else 0))
samp = cfg.get("sampling", {})
st.caption(f"prompt {cfg.get('prompt', {}).get('label')} | {knobs_text(samp)} | seed {samp.get('seed')} | "
           f"{cfg.get('checkpoint', {}).get('family') or 'crystallm-gpt'} checkpoint "
           f"{cfg.get('checkpoint', {}).get('path')} (step {cfg.get('checkpoint', {}).get('step')}) | "
           f"{cfg.get('samples_per_s')} samples/s on {cfg.get('device')}")
counts = df["badge"].value_counts()
c = st.columns(4)
c[0].metric("Samples", len(df))
c[1].metric("Valid", int(counts.get("valid", 0)))
c[2].metric("Invalid", int(counts.get("invalid", 0)))
c[3].metric("Unparsable", int(counts.get("unparsable", 0)))

# --- stability (issue 13): E_hull per sample, histogram, the stability pass as a job ------------------------
stab = stability_panels.stability_table(set_dir)
stab_rows = {} if stab is None else {r["name"]: r for _, r in stab.iterrows()}
with st.expander("Stability (E_hull)", expanded=stab is not None):
    if stab is not None:
        stability_panels.stability_summary(stab, len(df), key="sample_ehull_hist")
    stability_panels.stability_job(set_dir, key="sample_stability")

BADGES = {"valid": ":green-badge[:material/check: valid]", "invalid": ":orange-badge[:material/warning: invalid]",
          "unparsable": ":red-badge[:material/close: unparsable]", "not evaluated": ":gray-badge[not evaluated]"}
pages = max(1, -(-len(df) // PER_PAGE))
page = st.number_input(f"Gallery page (of {pages})", 1, pages, 1, key="sample_page") if pages > 1 else 1


def _viewable(row) -> bool:
    """A sample whose processed CIF was read as a structure (a post-processed CIF can still fail to parse)."""
    return bool(row.get("postprocess_ok", False)) and row["badge"] != "unparsable"


def _show_sample(row) -> None:
    """One sample where the user is looking: its 3D view and CIF, or the raw text of one that does not parse."""
    formula_ = row.get("reduced_formula") if isinstance(row.get("reduced_formula"), str) else ""
    st.markdown(f"**#{row['index']}** {formula_} · {spacegroup_label(row.get('spacegroup')) or '?'} "
                f"{BADGES.get(row['badge'], '')}")
    why = dashboard.sample_reason(row)
    if why:
        st.caption(f"Why: {why}")
    if not _viewable(row):
        raw = set_dir / "raw" / f"{row['name']}.txt"
        st.caption("The generated text, as the model wrote it (it could not be read as a crystal):")
        st.code(raw.read_text(encoding="utf-8", errors="replace") if raw.exists() else "(no raw text saved)",
                language=None, height=420)
        return
    cif_path = set_dir / "processed" / f"{row['name']}.cif"
    cif = cif_path.read_text(encoding="utf-8")
    left, right = st.columns([3, 2])
    with left:
        with common.user_errors(stop=False):
            common.structure_view(load_structure(cif, label=cif_path.name), key="sample_view3d", height=520)
    with right:
        st.code(cif, language=None, height=480)
        b1, b2 = st.columns(2)
        b1.download_button("CIF", cif, f"{set_dir.name}-{row['name']}.cif", key="sample_cif",
                           icon=":material/download:")
        if b2.button("Open in Structure", key="sample_open", icon=":material/open_in_new:"):
            st.session_state["structure_ref"] = json.dumps({"set": str(set_dir), "name": row["name"]})
            st.switch_page("pages/structure.py")
    if row["name"] in stab_rows:
        st.markdown(stability_panels.ehull_badge(stab_rows[row["name"]]))
        with st.expander("Convex hull of this chemical system"):
            stability_panels.hull_plot(stab_rows[row["name"]], load_structure(cif).composition, key="sample_hull")


# "View" opens the sample in a dialog over the gallery, where the user is looking (not 1,000 px below it).
sample_dialog = st.dialog("Sample", width="large")(_show_sample)
picked = None
cols = st.columns(4)
for k, (_, row) in enumerate(df.iloc[(page - 1) * PER_PAGE: page * PER_PAGE].iterrows()):
    with cols[k % 4].container(border=True):
        formula_ = row.get("reduced_formula") if isinstance(row.get("reduced_formula"), str) else "?"
        sg_ = spacegroup_label(row.get("spacegroup")) or "?"
        st.markdown(f"**#{row['index']}** {formula_} · {sg_}  \n{BADGES.get(row['badge'], row['badge'])}"
                    + (f"  \n{stability_panels.ehull_badge(stab_rows[row['name']])}" if row["name"] in stab_rows
                       else ""))
        why = dashboard.sample_reason(row)
        if why:
            st.caption(why if len(why) <= 140 else why[:139] + "…", help=why)
        label = "View" if _viewable(row) else "Raw text"
        if st.button(label, key=f"sample_pick_{row['index']}"):
            picked = row
if picked is not None:
    sample_dialog(picked)

with st.expander(f"Table of all {len(df)} samples"):
    shown = [c for c in ("index", "badge", "reduced_formula", "spacegroup", "stated_spacegroup", "n_atoms",
                         "bond_length_score", "formula_hit", "spacegroup_hit", "failure_reason", "n_new_tokens")
             if c in df.columns]
    st.dataframe(df[shown], hide_index=True, key="sample_table")

d1, d2 = st.columns(2)
d1.download_button("All CIFs (zip)", dashboard.sample_set_zip(set_dir), f"{set_dir.name}.zip",
                   mime="application/zip", key="sample_zip", icon=":material/download:")
if (set_dir / "eval.csv").exists():
    d2.download_button("Evaluation CSV", (set_dir / "eval.csv").read_bytes(), f"{set_dir.name}-eval.csv",
                       mime="text/csv", key="sample_csv", icon=":material/download:")
if "postprocess_ok" in df.columns and not any(_viewable(r) for _, r in df.iterrows()):
    st.warning("No sample of this set could be read as a crystal structure; try a lower temperature, more "
               "max new tokens or a better-trained checkpoint.")

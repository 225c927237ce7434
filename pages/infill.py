"""Infill page: hide an element of a structure (or one site's coordinates, or the cell) and let a model fill it in:
ranked replacement elements with their scores, and each substituted structure in 3D."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from engine.app import dashboard
from engine.crystal.substitution import FILTERS
from engine.lab.errors import InputError
from engine.sample import infill
from pages import common

st.title("Infill")
st.caption("Hide every occurrence of an element in the structure's canonical CIF (data_ line, property row, "
           "formulas, site rows and labels) and rank the vocabulary's elements as replacements: a masked model "
           "scores each candidate at the hidden positions (diffusion); any model scores the whole CIF rewritten "
           "with it (likelihood, Gruver et al.). `crystallab infill` does the same from the command line.")
s = common.settings()


@st.cache_resource(show_spinner=False, max_entries=4)
def _model(path: str, stamp: float):
    from engine.models.family import load_family_model

    return load_family_model(path, "cpu")


@st.cache_data(show_spinner=False, max_entries=32)
def _structure(cif: str, label: str):
    return infill.read_structure(cif, label)


@st.cache_data(show_spinner="Scoring every replacement element...", max_entries=16)
def _rank(cif: str, label: str, ckpt: str, stamp: float, element: str, scorer: str, filter: str):
    return infill.rank_replacements(_structure(cif, label), element, _model(ckpt, stamp), scorer=scorer,
                                    filter=filter, label=label)


@st.cache_data(show_spinner="Filling the masked span...", max_entries=16)
def _fill(cif: str, label: str, ckpt: str, stamp: float, site: int | None, seed: int):
    view = infill.canonical_view(_structure(cif, label), label)
    return infill.fill_span(_model(ckpt, stamp), view, site=site, cell=site is None, seed=seed)


# --- which structure -----------------------------------------------------------------------------------------
source = st.radio("Structure from", ["Sample set", "Dataset CSV", "Upload a CIF"], horizontal=True,
                  key="infill_source")
cif, label = None, ""
if source == "Sample set":
    sets = [p for p in dashboard.find_sample_sets(s.runs_dir, depth=5) if any((p / "processed").glob("*.cif"))]
    if not sets:
        st.info("No sample set with a post-processed CIF yet: generate one on the Sample page, or upload a CIF.")
        st.stop()
    set_dir = st.selectbox("Sample set", sets, format_func=common.rel, key="infill_set")
    names = sorted(p.stem for p in (set_dir / "processed").glob("*.cif"))
    name = st.selectbox("Sample", names, key="infill_sample")
    cif = (set_dir / "processed" / f"{name}.cif").read_text(encoding="utf-8")
    label = f"{common.rel(set_dir)}/{name}"
elif source == "Dataset CSV":
    typed = st.text_input("CSV with a 'cif' column (path on the server)", key="infill_csv",
                          help="e.g. an MP-20 split; its folder must be allowed (CRYSTALLAB_DATA_DIRS)")
    if not typed.strip():
        st.stop()
    with common.user_errors():
        path = s.resolve_user_path(typed.strip())
        table = pd.read_csv(path)
        if "cif" not in table.columns:
            raise InputError(f"{path} has no 'cif' column: give a CSV with one CIF per row in a 'cif' column")
    row = int(st.number_input("Row", 0, len(table) - 1, 0, key="infill_row"))
    cif = str(table.iloc[row]["cif"])
    label = f"{Path(path).name} row {row}"
else:
    up = st.file_uploader("CIF file", type=["cif"], key="infill_upload")
    if up is None:
        st.stop()
    cif, label = up.getvalue().decode("utf-8", errors="replace"), up.name

with common.user_errors():
    structure = _structure(cif, label)
elements = sorted({el.symbol for el in structure.composition.elements})

# --- model and what to hide ----------------------------------------------------------------------------------
ckpt = common.pick_path("Model", common.checkpoints(), key="infill_ckpt", allow_custom=True,
                        empty="No checkpoint yet: train one on the Train page, or give a path.")
if ckpt is None:
    st.stop()
stamp = ckpt.stat().st_mtime if ckpt.exists() else 0.0
with common.user_errors():
    model = _model(str(ckpt), stamp)
c1, c2, c3 = st.columns(3)
mode = c1.radio("Hide", ["an element", "one site's coordinates", "the cell"], key="infill_mode")

if mode != "an element":
    if not infill.is_masked_model(model) or not hasattr(model, "fill"):
        st.info(f"{ckpt.name} is a {model.family} model: regenerating a site or the cell needs a masked-diffusion "
                "checkpoint.", icon=":material/info:")
        st.stop()
    site = None
    if mode == "one site's coordinates":
        site = int(c2.number_input("Site row of the canonical CIF (0-based)", 0, None, 0, key="infill_site"))
    seed = int(c3.number_input("Seed", 0, None, 1337, key="infill_seed"))
    with common.user_errors():
        span = _fill(cif, label, str(ckpt), stamp, site, seed)
    left, right = st.columns(2)
    left.markdown("**Masked**")
    left.code(span.masked_text, language=None)
    right.markdown("**Filled**")
    right.code(span.text, language=None)
    if span.error:
        st.warning(f"The filled text does not read as a structure: {span.error}")
    else:
        common.structure_view(infill.read_structure(span.cif, "filled"), key="infill_fill_view", height=480)
        st.download_button("CIF", span.cif, "filled.cif", key="infill_fill_cif", icon=":material/download:")
    st.stop()

element = c2.selectbox("Element", elements, key="infill_element")
scorer = c3.selectbox("Scorer", infill.SCORERS, key="infill_scorer",
                      help="auto: diffusion for a masked model, likelihood otherwise")
c1, c2 = st.columns(2)
chem = c1.selectbox("Chemistry filter", FILTERS, key="infill_filter",
                    help="oxidation: smact finds charge-neutral oxidation states; radius: ionic radius within 35 % "
                    "of the hidden element's")
top = int(c2.number_input("Candidates shown", 1, 89, 10, key="infill_top"))
with common.user_errors():
    result = _rank(cif, label, str(ckpt), stamp, element, scorer, chem)

kept = result.kept[:top]
rank = result.rank_of(element)
st.subheader(f"{result.formula}: replacements for {element}")
st.caption(f"{element} hidden at {sum(result.regions.values())} places "
           f"({', '.join(f'{k} {v}' for k, v in result.regions.items())}); scorer {result.scorer}; "
           f"{len(result.kept)} of {len(result.candidates)} candidates pass the {result.filter} filter; "
           f"{element} itself ranks {rank if rank else 'nowhere (filtered)'}.")
with st.expander("Masked canonical CIF"):
    st.code(result.masked_text, language=None)
unit = "log p at the hidden positions (nats)" if result.scorer == "diffusion" else "log p of the CIF (nats)"
st.dataframe(pd.DataFrame({"rank": range(1, len(kept) + 1), "element": [c.element for c in kept],
                           unit: [c.score for c in kept], "tokens": [c.n_tokens for c in kept],
                           "original": [c.original for c in kept]}),
             hide_index=True, key="infill_table", column_config={unit: st.column_config.NumberColumn(format="%.3f")})
dropped = [c for c in result.candidates if c.filter_reason]
if dropped:
    with st.expander(f"{len(dropped)} candidates dropped by the {result.filter} filter"):
        st.dataframe(pd.DataFrame({"element": [c.element for c in dropped],
                                   "reason": [c.filter_reason for c in dropped]}), hide_index=True,
                     key="infill_dropped")
if not kept:
    st.stop()
pick = st.selectbox("Show the structure with", [c.element for c in kept], key="infill_pick",
                    format_func=lambda e: f"{e} (rank {result.rank_of(e)})")
chosen = next(c for c in kept if c.element == pick)
common.structure_view(chosen.structure, key="infill_view3d", height=480)
st.download_button("CIF", chosen.cif, f"{chosen.structure.composition.reduced_formula}.cif", key="infill_cif",
                   icon=":material/download:")

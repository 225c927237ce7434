"""Structure page: one crystal in depth: 3D view, lattice and sites, symmetry at an adjustable tolerance,
nearest-neighbour bonds against expected lengths, a simulated powder XRD pattern, and where it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.app import dashboard
from engine.crystal import analysis
from engine.lab.fsutil import read_json
from pages import common, stability_panels

st.title("Structure")
s = common.settings()


@st.cache_data(show_spinner=False, max_entries=64)
def _bonds(cif: str):
    return analysis.neighbour_bonds(analysis.load_structure(cif))


@st.cache_data(show_spinner=False, max_entries=64)
def _xrd(cif: str, wavelength: str, symprec: float):
    return analysis.xrd_pattern(analysis.load_structure(cif), wavelength=wavelength, symprec=symprec)


RADIATION = {"CuKa": "Cu Kα", "MoKa": "Mo Kα", "CoKa": "Co Kα", "FeKa": "Fe Kα", "AgKa": "Ag Kα"}


def _lattice_table(cells: dict) -> pd.DataFrame:
    """Lattice parameters as text, one column per cell: a table shows full values in a narrow column."""
    rows = {"a (Å)": "{:.4f}", "b (Å)": "{:.4f}", "c (Å)": "{:.4f}", "α (°)": "{:.2f}", "β (°)": "{:.2f}",
            "γ (°)": "{:.2f}", "volume (Å³)": "{:.2f}", "sites": "{:d}"}
    columns = {}
    for name, cell in cells.items():
        lat = cell.lattice
        values = [lat.a, lat.b, lat.c, lat.alpha, lat.beta, lat.gamma, lat.volume, len(cell)]
        columns[name] = [fmt.format(v) for fmt, v in zip(rows.values(), values)]
    return pd.DataFrame(columns, index=list(rows))


@st.cache_data(show_spinner=False, max_entries=64)
def _cached_table(set_dir: str, stamp: tuple[float, float]) -> pd.DataFrame:
    return dashboard.sample_table(set_dir)


def _table(set_dir: Path) -> pd.DataFrame:
    """The set's sample table, read again only when its generation record or evaluation changes (every widget
    on this page reruns it, and the default-set search reads several sets)."""
    stamp = tuple((set_dir / f).stat().st_mtime if (set_dir / f).exists() else 0.0
                  for f in ("samples.jsonl", "eval.csv"))
    return _cached_table(str(set_dir), stamp)


def _readable(set_dir: Path) -> set[str]:
    """Names of the set's samples that post-processed and parsed into a structure (all processed ones when the
    set is not evaluated yet)."""
    table = _table(set_dir)
    if "badge" not in table.columns or "postprocess_ok" not in table.columns:
        return set()
    ok = table["postprocess_ok"].fillna(False).astype(bool) & (table["badge"] != "unparsable")
    return set(table.loc[ok, "name"])


# --- which structure -----------------------------------------------------------------------------------------
ref = json.loads(st.session_state.get("structure_ref") or "{}")
source = st.radio("Structure from", ["Sample set", "Upload a CIF", "Paste a CIF"], horizontal=True,
                  key="structure_source")
cif, label, provenance = None, "", None
if source == "Sample set":
    sets = dashboard.find_sample_sets(s.runs_dir, depth=5)
    if not sets:
        st.info("No sample set yet: generate one on the Sample page, or upload a CIF.")
        st.stop()
    default = [i for i, p in enumerate(sets) if ref.get("set") and p == Path(ref["set"])]
    if not default:  # otherwise open the newest set that has a structure to show
        default = next(([i] for i, p in enumerate(sets) if _readable(p)), [])
    set_dir = st.selectbox("Sample set", sets, index=default[0] if default else 0, format_func=common.rel,
                           key="structure_set")
    names = sorted(p.stem for p in (set_dir / "processed").glob("*.cif"))
    if not names:
        st.warning("This sample set has no post-processed CIF.")
        st.stop()
    readable = _readable(set_dir)
    first = next((n for n in names if n in readable), names[0])  # open a sample that parses, when there is one
    idx = names.index(ref["name"]) if ref.get("name") in names else names.index(first)
    if st.session_state.get("_structure_set_shown") != str(set_dir):  # another set: start from its default
        st.session_state["_structure_set_shown"] = str(set_dir)
        st.session_state.pop("structure_sample", None)
    name = st.selectbox("Sample", names, index=idx, key="structure_sample",
                        format_func=lambda n: n if n in readable else f"{n} (does not parse)")
    cif = (set_dir / "processed" / f"{name}.cif").read_text(encoding="utf-8")
    label = f"{common.rel(set_dir)}/{name}"
    cfg = read_json(set_dir / "config.json", {}) or {}
    provenance = {"prompt": cfg.get("prompt", {}).get("text"), "checkpoint": cfg.get("checkpoint"),
                  "sampling": cfg.get("sampling")}
    table = _table(set_dir)
    hit = table[table["name"] == name]
    if len(hit):
        provenance["evaluation"] = json.loads(hit.iloc[0].drop(labels=["name"]).to_json())
elif source == "Upload a CIF":
    up = st.file_uploader("CIF file", type=["cif"], key="structure_upload")
    if up is None:
        st.stop()
    cif, label = up.getvalue().decode("utf-8", errors="replace"), up.name
else:
    cif = st.text_area("CIF text", height=200, key="structure_paste")
    label = "pasted CIF"
    if not cif.strip():
        st.stop()

with common.user_errors():
    structure = analysis.load_structure(cif, label=label)

# --- view, symmetry and cell --------------------------------------------------------------------------------
info = analysis.lattice_info(structure)
st.subheader(f"{info['reduced_formula']} ({info['formula']}) · {label}")
left, right = st.columns([3, 2])
with left:
    common.structure_view(structure, key="structure_view3d", height=600)
with right:
    symprec = st.select_slider("Symmetry tolerance (Å)", [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5], value=0.1,
                               key="structure_symprec", help="spglib symprec; CrystaLLM's checks use 0.1 Å")
    sym, conventional = None, None
    with common.user_errors(stop=False):
        sym = analysis.symmetry(structure, symprec=symprec)
        conventional = analysis.conventional_cell(structure, symprec=symprec)
    if sym and sym["error"]:
        st.warning(sym["error"])
        conventional = None
    elif sym:
        wyckoff = ", ".join(f"{w['element']} {w['wyckoff']}" for w in sym["wyckoff"])
        st.markdown(f"**Space group** {sym['symbol']} (No. {sym['number']}), {sym['crystal_system']}, point group "
                    f"{sym['point_group']}  \n**Wyckoff positions** {wyckoff}  \n{sym['n_operations']} symmetry "
                    f"operations in the conventional cell ({sym['n_operations_cell']} in this cell)")
    cells = {"this cell": structure}
    if conventional is not None:
        cells["conventional cell"] = conventional
    st.table(_lattice_table(cells))
    note = ("Wyckoff multiplicities and XRD Miller indices refer to the conventional standard cell "
            "(International Tables setting), whatever cell the CIF is written in." if conventional is not None else "")
    st.caption(f"Density {info['density']:.3f} g/cm³, {info['volume_per_atom']:.2f} Å³ per atom. {note}")

tab_sites, tab_bonds, tab_xrd, tab_src = st.tabs(["Sites", "Bonds", "Powder XRD", "Provenance"])
with tab_sites:
    decimals = analysis.cif_precision(cif)
    sites = analysis.sites_table(structure, decimals=decimals)
    if sym and sym["site_wyckoff"]:
        sites.insert(2, "Wyckoff", sym["site_wyckoff"])
    frac_fmt = f"%.{decimals}f"  # the CIF's own precision: no float noise, no cut digits
    sites = sites.rename(columns={"x": "x (frac)", "y": "y (frac)", "z": "z (frac)", "cart_x": "x (Å)",
                                  "cart_y": "y (Å)", "cart_z": "z (Å)"})
    st.dataframe(sites, hide_index=True, key="structure_sites", column_config={
        **{c: st.column_config.NumberColumn(c, format=frac_fmt) for c in ("x (frac)", "y (frac)", "z (frac)")},
        **{c: st.column_config.NumberColumn(c, format="%.4f") for c in ("x (Å)", "y (Å)", "z (Å)")}})
with tab_bonds:
    with common.user_errors(stop=False):
        bonds = _bonds(cif)
        if bonds.empty:
            st.warning("CrystalNN found no bonds (the CrystaLLM bond score counts this as a failure).")
        else:
            summary = analysis.bond_summary(bonds)
            st.caption(f"{bonds['reasonable'].mean():.0%} of {len(bonds)} bonds within 0.68-1.32 of the expected "
                       "length (ionic radii when the electronegativity difference is at least 1.7, else atomic "
                       "radii); this fraction is the CrystaLLM bond-length score.")
            summary = summary.rename(columns={c: f"{c} (Å)" for c in ("mean", "min", "max", "expected")})
            st.dataframe(summary, hide_index=True, key="structure_bond_summary",
                         column_config={"reasonable": st.column_config.ProgressColumn(
                             "reasonable", min_value=0.0, max_value=1.0, format="percent")})
            with st.expander("Every bond"):
                st.dataframe(bonds.rename(columns={"distance": "distance (Å)", "expected": "expected (Å)"}),
                             hide_index=True, key="structure_bonds")
with tab_xrd:
    wavelength = st.selectbox("Radiation", list(RADIATION), format_func=RADIATION.get, key="structure_xrd_wl")
    with common.user_errors(stop=False):
        peaks = _xrd(cif, wavelength, symprec)
        fig = go.Figure(go.Bar(x=peaks["two_theta"], y=peaks["intensity"], width=0.3,
                               customdata=peaks[["hkl", "d_spacing"]],
                               hovertemplate="2θ %{x:.2f}°<br>I %{y:.1f}<br>%{customdata[0]}<br>"
                                             "d %{customdata[1]:.4f} Å<extra></extra>"))
        fig.update_layout(xaxis_title="2θ (degrees)", yaxis_title="intensity (max 100)", height=340,
                          margin={"t": 20})
        st.plotly_chart(fig, key="structure_xrd")
        if conventional is None:
            st.caption(f"Miller indices of the cell as given: no space group found at {symprec} Å.")
        else:
            abc = ", ".join(f"{x:.4f}" for x in conventional.lattice.abc)
            st.caption(f"Miller indices of the conventional cell of {sym['symbol']} (a, b, c = {abc} Å).")
        st.dataframe(peaks.rename(columns={"two_theta": f"2θ (°, {RADIATION[wavelength]})",
                                           "intensity": "intensity (max 100)", "d_spacing": "d (Å)"}),
                     hide_index=True, key="structure_peaks")
with tab_src:
    if provenance is None:
        st.caption("Uploaded or pasted: no prompt or checkpoint.")
    else:
        if provenance.get("prompt"):
            st.markdown("**Prompt**")
            st.code(provenance["prompt"], language=None)
        st.json({k: v for k, v in provenance.items() if k != "prompt"}, expanded=False)
    st.download_button("CIF", cif, f"{info['reduced_formula']}.cif", key="structure_cif",
                       icon=":material/download:")

# --- generated against relaxed (issue 13: the set's stability.csv) -------------------------------------------
if source == "Sample set":
    stab = stability_panels.stability_table(set_dir)
    if stab is not None:
        st.subheader("Generated and relaxed")
        match = stab[stab["name"] == name]
        stability_panels.relaxed_comparison(structure, match.iloc[0] if len(match) else None,
                                            key="structure_relaxed")

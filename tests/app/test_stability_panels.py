"""Stability and distribution panels (issue 13) on the Sample, Structure and Compare pages.

Each test writes one evaluated sample set by hand (NaCl and CsCl, the way the sampler and evaluator write them) and
a ``stability.csv`` as the stability half writes it, with values chosen so every badge and count is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from apptest_helpers import open_page, wait_for_job
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.evaluate.metrics import METRIC_DEFINITIONS
from engine.lab import jobs
from engine.lab.settings import get_settings


def _structures() -> list[Structure]:
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    cscl = Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5] * 3])
    return [nacl.get_primitive_structure(), cscl]


def _set(name: str = "salts") -> Path:
    folder = get_settings().samples_dir / name
    (folder / "processed").mkdir(parents=True)
    (folder / "raw").mkdir()
    structures = _structures()
    config = {"prompt": {"text": "data_\n", "formula": None, "z": None, "spacegroup": None, "label": "unconditional"},
              "sampling": {"n": 2, "temperature": 0.8, "top_k": 10, "top_p": 1.0, "seed": 1, "max_new_tokens": 300,
                           "constrain": True},
              "checkpoint": {"path": "/x/ckpt.pt", "step": 1, "sha256": "ab" * 32, "run": "m"}, "device": "cpu"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "samples.jsonl").write_text("".join(
        json.dumps({"index": i, "name": f"{i:04d}", "postprocess_ok": True}) + "\n" for i in range(2)))
    for i, s in enumerate(structures):
        (folder / "processed" / f"{i:04d}.cif").write_text(str(CifWriter(s)))
        (folder / "raw" / f"{i:04d}.txt").write_text(str(CifWriter(s)))
    pd.DataFrame({"file": ["0000.txt", "0001.txt"], "parse_ok": True, "is_valid": True, "failure_reason": None,
                  "spacegroup": ["Fm-3m", "Pm-3m"], "reduced_formula": ["NaCl", "CsCl"],
                  "density": [s.density for s in structures], "n_atoms": [2, 2], "n_elements": [2, 2],
                  "cdvae_struct_valid": True, "smact_valid": True}).to_csv(folder / "eval.csv", index=False)
    values = {k: None for k in METRIC_DEFINITIONS}
    values.update(n=2, parse_rate=1.0, validity=1.0, uniqueness_all=1.0, uniqueness_valid=1.0,
                  distinct_formulas=2, distinct_spacegroups=2)
    summary = {k: {"value": v, "definition": METRIC_DEFINITIONS[k]} for k, v in values.items()}
    summary["metastable_rate"] = {"value": 0.5, "definition": "test"}
    summary["sun_rate"] = {"value": 0.5, "definition": "test"}
    (folder / "eval_summary.json").write_text(json.dumps(summary))
    relaxed = structures[0].copy()
    relaxed.scale_lattice(relaxed.volume * 1.02)
    pd.DataFrame({
        "file": ["0000.txt", "0001.txt"], "potential": "chgnet", "hull": "h",
        "energy_per_atom": [-3.4, -3.1], "formation_energy_per_atom": [-2.0, -1.9], "e_hull": [0.0, 0.04],
        "stable": [True, False], "metastable": [True, True], "hull_covered": [True, False],
        "relaxed": True, "converged": True, "steps": [12, 30], "final_fmax": 0.05, "volume_change": [0.02, 0.0],
        "rmsd": [0.011, 0.0], "relaxed_cif": [str(CifWriter(relaxed)), ""], "failure_reason": [None, None],
    }).to_csv(folder / "stability.csv", index=False)
    return folder


def _checkpoint() -> None:
    """A tiny checkpoint: the Sample page's generate form needs one before it shows results."""
    import torch

    from engine.models.checkpoint import save_checkpoint
    from engine.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    save_checkpoint(get_settings().train_dir / "tiny" / "ckpt" / "best.pt",
                    model=GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=64)), iter_num=1,
                    best_val_loss=None, config={}, meta={"run": "tiny"})


def test_sample_page_shows_ehull_badges_counts_histogram_and_launches_a_stability_job(use_asset_cache):
    _checkpoint()
    folder = _set()
    hull = get_settings().runs_dir / "hulls" / "h"
    hull.mkdir(parents=True)
    (hull / "hull.json").write_text("{}")
    at = open_page("pages/sample.py")
    assert not at.exception, [e.value for e in at.exception]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Stable (E_hull <= 0)"] == "1/2" and shown["Lower bound only"] == "1"
    text = " ".join(m.value for m in at.markdown)
    assert "E_hull 0.000 eV/atom, stable" in text
    assert "E_hull 0.040 eV/atom (lower bound: hull lacks this system)" in text
    assert any("E_hull of the samples" in json.loads(c.proto.spec)["layout"]["title"]["text"]
               for c in at.get("plotly_chart") if "title" in json.loads(c.proto.spec)["layout"])
    at.selectbox(key="sample_stability_potential").set_value("sevennet-0")
    at.button(key="sample_stability_run").click().run()
    job = get_settings().runs_dir / "jobs" / "stability" / "salts-sevennet-0-h"
    state = wait_for_job(job)
    assert state["argv"] == ["stability", str(folder), "--potential", "sevennet-0", "--hull", "h", "--out",
                             str(folder)]
    assert jobs.job_state(job)["kind"] == "stability"


def test_structure_page_shows_generated_and_relaxed_side_by_side(use_asset_cache):
    folder = _set()
    at = open_page("pages/structure.py")
    at.session_state["structure_ref"] = json.dumps({"set": str(folder), "name": "0000"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(h.value == "Generated and relaxed" for h in at.subheader)
    shown = {m.label: m.value for m in at.metric}
    assert shown["RMSD"] == "0.011 Å" and shown["Volume change"] == "2.000 %" and shown["Steps"] == "12"
    assert any("**Relaxed**" in m.value for m in at.markdown)


def test_compare_page_has_published_shapes_ehull_histogram_and_reference_figures(use_asset_cache):
    folder = _set()
    ref = get_settings().runs_dir / "ref.csv"
    pd.DataFrame({"material_id": ["a", "b"], "cif": [str(CifWriter(s)) for s in _structures()]}).to_csv(ref,
                                                                                                        index=False)
    at = open_page("pages/compare.py")
    at.radio(key="compare_mode").set_value("Sample sets").run()
    assert not at.exception, [e.value for e in at.exception]
    per_ckpt = at.table[0].value
    assert list(per_ckpt["metastable"]) == ["50.0%"] and list(per_ckpt["S.U.N."]) == ["50.0%"]
    published = [t.value for t in at.table if "COV-R" in t.value.columns]
    assert published and "LLaMA-2 70B, T 0.7 (Gruver)" in published[0].index
    at.selectbox(key="compare_reference_choice").set_value("a CSV or folder path...").run()
    at.text_input(key="compare_reference_path").set_value(str(ref)).run()
    assert not at.exception, [e.value for e in at.exception]
    wdist = next(d.value for d in at.dataframe if "density (g/cm³)" in d.value.columns)
    assert wdist.loc["m", "density (g/cm³)"] == 0.0  # the same two crystals on both sides
    titles = [json.loads(c.proto.spec)["layout"].get("title", {}).get("text") for c in at.get("plotly_chart")]
    assert {"density (g/cm³)", "atoms per cell", "number of elements"} <= set(titles)
    assert any(folder.name in str(o) for o in at.selectbox(key="compare_ref_covjob_set").options)


class _NaClHull:
    """Stands in for the stability half's hull object through the agreed API: ``phase_diagram(chemsys)``."""

    def phase_diagram(self, chemsys: str):
        from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

        assert chemsys == "Cl-Na"
        return PhaseDiagram([PDEntry("Na", -1.3), PDEntry("Cl", -1.8), PDEntry("NaCl", -6.8)])


def test_sample_page_places_the_sample_on_its_convex_hull(use_asset_cache, monkeypatch):
    import sys
    import types

    hull_module = types.ModuleType("engine.evaluate.hull")
    hull_module.load_hull = lambda name: _NaClHull()
    monkeypatch.setitem(sys.modules, "engine.evaluate.hull", hull_module)
    _checkpoint()
    _set()
    at = open_page("pages/sample.py")
    at.button(key="sample_pick_0").click().run()  # "View" opens the sample (and its hull) in a dialog
    assert not at.exception, [e.value for e in at.exception]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    hull = [s for s in specs if "Cl-Na hull (h)" in str(s["layout"].get("title", {}).get("text"))]
    assert hull and "sample E_hull 0.000 eV/atom" in hull[0]["layout"]["title"]["text"]
    assert "this sample" in [trace.get("name") for trace in hull[0]["data"]]

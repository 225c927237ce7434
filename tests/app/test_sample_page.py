"""Sample page: a sample that cannot be read as a structure says why and cannot be opened."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from apptest_helpers import APP, open_page
from streamlit.testing.v1 import AppTest

from engine.evaluate.evaluation import evaluate_sample_set


def _broken_set(lab: Path) -> Path:
    """A copy of the lab's NaCl set whose sample 0 has a processed CIF but no longer parses (its evaluation says
    so): the state of a sample whose CIF post-processes yet fails to parse."""
    broken = lab / "samples" / "apptest-broken"
    if broken.exists():
        shutil.rmtree(broken)
    shutil.copytree(lab / "samples" / "nacl", broken)
    (broken / "raw" / "0000.txt").write_text("data_Na4Cl4\nloop_\n_atom_type_symbol\n", encoding="utf-8")
    evaluate_sample_set(broken, workers=1)
    assert (broken / "processed" / "0000.cif").exists()
    return broken


def test_an_unreadable_sample_shows_its_reason_and_cannot_be_viewed(lab):
    broken = _broken_set(lab)

    at = open_page("pages/sample.py")
    at.selectbox(key="sample_set").set_value(broken).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.button(key="sample_pick_0").disabled
    assert not at.button(key="sample_pick_1").disabled
    reason = pd.read_csv(broken / "eval.csv").set_index("file").loc["0000.txt", "failure_reason"]
    assert isinstance(reason, str) and reason.replace("_", " ") in [c.value for c in at.caption]  # says why
    assert "nan" not in at.subheader[0].value  # the structure shown is a readable one, with its formula
    assert at.subheader[0].value.startswith("Sample #1")


def test_a_reload_keeps_the_prompt_through_the_page_address(lab):
    at = open_page("pages/sample.py")
    at.selectbox(key="sample_ckpt").set_value("train/tiny/ckpt/last.pt")  # not necessarily the newest one
    at.text_input(key="sample_formula").input("KCl")
    at.number_input(key="sample_z").set_value(4).run()
    assert at.query_params["formula"] == "KCl" and at.query_params["z"] == "4"
    assert at.query_params["ckpt"] == "train/tiny/ckpt/last.pt"

    reloaded = AppTest.from_file(APP, default_timeout=120)  # a new session opened at that address
    reloaded.switch_page("pages/sample.py")
    reloaded.query_params.update(dict(at.query_params))
    reloaded.run()
    assert not reloaded.exception, [e.value for e in reloaded.exception]
    assert reloaded.text_input(key="sample_formula").value == "KCl"
    assert reloaded.number_input(key="sample_z").value == 4
    assert reloaded.selectbox(key="sample_ckpt").value == "train/tiny/ckpt/last.pt"


def test_the_structure_page_opens_a_sample_that_parses(lab):
    broken = _broken_set(lab)
    at = open_page("pages/structure.py")
    at.selectbox(key="structure_set").set_value(lab / "samples" / "nacl").run()
    at.selectbox(key="structure_sample").set_value("0000").run()  # a sample chosen in another set ...
    at.selectbox(key="structure_set").set_value(broken).run()  # ... does not carry over to this one
    assert not at.exception, [e.value for e in at.exception]
    sample = at.selectbox(key="structure_sample")
    assert sample.value == "0001" and not at.error  # not the unparseable 0000, which is labelled as such
    assert "does not parse" in sample.format_func("0000") and sample.format_func("0001") == "0001"

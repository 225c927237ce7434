"""Sample page: a sample that cannot be read as a structure says why and cannot be opened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from apptest_helpers import APP, open_page, wait_for_job
from streamlit.testing.v1 import AppTest

from engine.evaluate.evaluation import evaluate_sample_set
from engine.lab import jobs


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


def _dialog_texts(at: AppTest) -> list[str]:
    return [c.value for c in at.code]


def _dialogs(at: AppTest) -> list:
    """The dialogs open on the page (AppTest files them under the app's event block, not under main)."""
    found, todo = [], [at._tree]
    while todo:
        node = todo.pop()
        if getattr(node, "type", None) == "dialog":
            found.append(node)
        todo += list(getattr(node, "children", {}).values())
    return found


def test_an_unreadable_sample_shows_its_reason_and_its_raw_text(lab):
    broken = _broken_set(lab)

    at = open_page("pages/sample.py")
    at.selectbox(key="sample_set").set_value(broken).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.button(key="sample_pick_0").label == "Raw text" and at.button(key="sample_pick_1").label == "View"
    reason = pd.read_csv(broken / "eval.csv").set_index("file").loc["0000.txt", "failure_reason"]
    assert isinstance(reason, str) and any(c.value.startswith(reason.replace("_", " ")) for c in at.caption)
    assert not at.code  # nothing opened yet
    at.button(key="sample_pick_0").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "data_Na4Cl4\nloop_\n_atom_type_symbol" in _dialog_texts(at)[0]  # what the model wrote, to debug it


def test_view_opens_the_sample_in_a_dialog_with_its_3d_view_and_cif(lab):
    at = open_page("pages/sample.py")
    at.selectbox(key="sample_set").set_value(lab / "samples" / "nacl").run()
    assert not at.get("iframe")  # no viewer below the gallery until a sample is chosen
    at.button(key="sample_pick_2").click().run()
    assert not at.exception, [e.value for e in at.exception]
    dialogs = _dialogs(at)
    assert len(dialogs) == 1 and dialogs[0].proto.dialog.is_open
    assert "**#2**" in dialogs[0].markdown[0].value
    assert len(dialogs[0].get("iframe")) == 1 and dialogs[0].code[0].value.startswith("data_Na4Cl4")


def test_an_invalid_sample_says_which_check_failed(lab):
    invalid = lab / "samples" / "apptest-invalid"
    if invalid.exists():
        shutil.rmtree(invalid)
    shutil.copytree(lab / "samples" / "nacl", invalid)
    ev = pd.read_csv(invalid / "eval.csv")
    ev.loc[0, ["is_valid", "bond_length_score", "space_group_consistent", "stated_spacegroup"]] = [
        False, 0.5, False, "P1"]
    ev.to_csv(invalid / "eval.csv", index=False)
    at = open_page("pages/sample.py")
    at.selectbox(key="sample_set").set_value(invalid).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "bond lengths: 50% reasonable (needs 100%); space group: states P1, is Fm-3m" in [
        c.value for c in at.caption]
    assert any("Fm-3m (225)" in md.value for md in at.markdown)  # space group with its number


def test_the_sample_form_submits_only_by_its_button_and_refuses_a_repeat(lab):
    at = open_page("pages/sample.py")
    form = at.get("form")[0]
    assert form.proto.form.enter_to_submit is False  # Enter in a field does not start a job
    at.selectbox(key="sample_ckpt").set_value("train/tiny/ckpt/last.pt")
    at.number_input(key="sample_z").set_value(4).run()  # one prompt: a quick job
    at.number_input(key="sample_n").set_value(1)
    at.number_input(key="sample_max_tokens").set_value(16)
    at.text_input(key="sample_name").input("apptest-once")
    at.button(key="sample_generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    first = common_jobs(lab) / "apptest-once"
    state = wait_for_job(first)
    assert state["state"] == "finished", jobs.tail_log(first)
    before = set(common_jobs(lab).iterdir())
    at.text_input(key="sample_name").input("apptest-twice")  # the same request under another name
    at.button(key="sample_generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert set(common_jobs(lab).iterdir()) == before  # no second job
    assert any("already finished as 'apptest-once'" in i.value for i in at.info)
    shown = at.selectbox(key="sample_set").value
    assert lab / "samples" / "apptest-once" in (shown, *shown.parents)  # the first request's samples


def common_jobs(lab: Path) -> Path:
    return lab / "jobs" / "sample"


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


def test_a_checkpoint_of_another_model_family_samples_through_the_same_page(lab, golden_canonical, monkeypatch):
    """The family seam: the page shows the family's own knobs, and the detached job samples through it."""
    tests_dir = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("CRYSTALLAB_FAMILY_MODULES", "families.replay")
    monkeypatch.setenv("PYTHONPATH", str(tests_dir))  # the detached job imports the family module too
    monkeypatch.syspath_prepend(str(tests_dir))
    from families.replay import save_replay

    texts = [r["decoded"] for r in sorted((r for r in golden_canonical if "error" not in r),
                                          key=lambda r: len(r["ids"]))[:2]]
    replay_run = lab / "train" / "replay"
    save_replay(replay_run / "ckpt" / "best.pt", texts)
    try:
        _sample_with_replay(lab, texts)
    finally:  # the lab is shared by the session's page tests: leave no checkpoint of a test-only family in it
        shutil.rmtree(replay_run, ignore_errors=True)
        shutil.rmtree(lab / "samples" / "apptest-replay", ignore_errors=True)


def test_a_checkpoint_whose_family_is_unknown_leaves_the_sample_sets_browsable(lab, monkeypatch):
    monkeypatch.delenv("CRYSTALLAB_FAMILY_MODULES", raising=False)
    odd = lab / "train" / "odd-family"
    (odd / "ckpt").mkdir(parents=True, exist_ok=True)
    import torch

    torch.save({"crystallab": {"family": "no-such-family"}}, odd / "ckpt" / "best.pt")
    try:
        at = open_page("pages/sample.py")
        at.selectbox(key="sample_ckpt").set_value("train/odd-family/ckpt/best.pt").run()
        assert not at.exception, [e.value for e in at.exception]
        assert any("model family 'no-such-family' is not known" in e.value for e in at.error)
        assert not at.get("form")  # nothing to sample with
        assert at.selectbox(key="sample_set").value is not None  # the results below are still there
    finally:
        shutil.rmtree(odd, ignore_errors=True)


def _sample_with_replay(lab: Path, texts: list[str]) -> None:
    at = open_page("pages/sample.py")
    at.selectbox(key="sample_ckpt").set_value("train/replay/ckpt/best.pt").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("family replay" in c.value for c in at.caption)
    assert "sample_temp" not in [s.key for s in at.slider]  # the GPT's knobs are not this family's
    at.number_input(key="sample_z").set_value(4).run()
    at.number_input(key="sample_knob_replay_stride").set_value(2)
    at.number_input(key="sample_n").set_value(2)
    at.text_input(key="sample_name").input("apptest-replay")
    at.button(key="sample_generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    state = wait_for_job(common_jobs(lab) / "apptest-replay")
    assert state["state"] == "finished", jobs.tail_log(common_jobs(lab) / "apptest-replay")
    out = lab / "samples" / "apptest-replay"
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint"]["family"] == "replay" and config["sampling"]["stride"] == 2
    assert (out / "raw" / "0000.txt").read_text() in texts

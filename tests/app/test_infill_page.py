"""Infill page against the tiny lab: a sample's element is hidden and ranked by the memorising GPT, the substituted
structure shows in 3D, and span infill with a GPT says it needs a masked model."""

from __future__ import annotations

from apptest_helpers import open_page


def _open_nacl(lab):
    at = open_page("pages/infill.py")
    at.selectbox(key="infill_set").set_value(lab / "samples" / "nacl").run()
    at.selectbox(key="infill_sample").set_value("0000").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_infill_page_ranks_replacements_and_shows_the_substituted_structure(lab):
    at = _open_nacl(lab)
    at.selectbox(key="infill_element").set_value("Na").run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert len(table) == 10 and list(table["rank"]) == list(range(1, 11))
    assert "Na" in list(table["element"])[:2]  # the tiny model memorised NaCl (and KCl)
    assert any("Na hidden at 6 places" in c.value for c in at.caption)
    assert any("scorer likelihood" in c.value for c in at.caption)
    frames = at.get("iframe")
    assert len(frames) == 1 and '"elem": "Cl"' in frames[0].proto.srcdoc
    second = list(table["element"])[1]
    at.selectbox(key="infill_pick").set_value(second).run()
    assert f'"elem": "{second}"' in at.get("iframe")[0].proto.srcdoc


def test_span_infill_with_a_gpt_checkpoint_says_it_needs_a_masked_model(lab):
    at = _open_nacl(lab)
    at.radio(key="infill_mode").set_value("the cell").run()
    assert not at.exception
    assert any("needs a masked-diffusion checkpoint" in i.value for i in at.info)

"""AppTest over every dashboard page against the tiny lab: pages render their key content, user mistakes show
readable messages, and the launch / sample / sweep buttons start real detached jobs whose results appear."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from apptest_helpers import metrics, open_page, wait_for_job

from engine.lab import jobs


def test_home_page_counts_what_the_lab_holds_and_links_every_page(lab):
    at = open_page("pages/home.py")
    assert at.title[0].value == "crystallab"
    m = metrics(at)
    assert m["Datasets"] == "1" and m["Training runs"] == "1" and m["Sweeps"] == "1" and m["CSP runs"] == "1"
    links = [p.proto.page for p in at.get("page_link")]  # the url paths the links lead to
    assert links == ["data", "train", "sample", "compare", "csp", "structure"]


def test_data_page_shows_dataset_statistics(lab):
    at = open_page("pages/data.py")
    assert at.title[0].value == "Data"
    m = metrics(at)
    assert m["Train CIFs"] == "3" and m["Rejected"] == "0"
    charts = at.get("plotly_chart")
    assert len(charts) == 3  # tokens per CIF, elements, space groups
    assert "Every input was usable." in [c.value for c in at.caption]


def test_train_page_shows_the_finished_run(lab):
    at = open_page("pages/train.py")
    m = metrics(at)
    assert m["State"] == "completed" and m["Step"] == "60 / 60"
    assert float(m["Train loss"]) < 1.0  # the tiny model memorised its three CIFs
    assert len(at.get("plotly_chart")) == 2  # loss, learning rate
    assert "finished 60 steps" in "\n".join(c.value for c in at.code)


def test_sample_page_gallery_3d_and_downloads(lab):
    at = open_page("pages/sample.py")
    at.selectbox(key="sample_set").set_value(lab / "samples" / "nacl").run()
    m = metrics(at)
    assert m["Samples"] == "4" and int(m["Valid"]) >= 1
    assert [b.key for b in at.button if b.key.startswith("sample_pick_")] == [f"sample_pick_{i}" for i in range(4)]
    assert not at.get("iframe")  # the 3D view opens with View, in a dialog
    keys = {d.key for d in at.get("download_button")}
    assert {"sample_zip", "sample_csv"} <= keys

    at.button(key="sample_pick_2").click().run()
    assert not at.exception, [e.value for e in at.exception]
    frames = at.get("iframe")
    assert len(frames) == 1
    html = frames[0].proto.srcdoc
    assert "createViewer" in html and "cdn.jsdelivr" not in html and '"elem": "Na"' in html
    assert "sample_cif" in {d.key for d in at.get("download_button")}
    assert any(md.value.startswith("**#2**") for md in at.markdown)


def test_compare_page_tables_of_the_sweep(lab):
    at = open_page("pages/compare.py")
    table = at.table[0].value
    assert list(table["prompt"]) == ["Na4Cl4", "Mg4O4"]
    assert set(table.columns) >= {"valid", "unique (valid)", "space groups"} and set(table.index) == {"tiny"}
    assert len(at.get("plotly_chart")) >= 4  # trade-off, valid per prompt, space groups, formulas (+ loss)
    keys = {d.key for d in at.get("download_button")}
    assert {"compare_csv", "compare_md"} <= keys


def test_structure_page_analyses_a_sample(lab):
    at = open_page("pages/structure.py")
    at.selectbox(key="structure_set").set_value(lab / "samples" / "nacl").run()
    at.selectbox(key="structure_sample").set_value("0000").run()
    lattice = at.table[0].value
    assert lattice.loc["a (Å)", "this cell"] == "5.6400" and lattice.loc["sites", "this cell"] == "8"
    assert any("Fm-3m (No. 225)" in md.value for md in at.markdown)
    at.select_slider(key="structure_symprec").set_value(0.001).run()
    assert not at.exception
    assert len(at.get("iframe")) == 1 and len(at.get("plotly_chart")) == 1  # 3D view, XRD


@pytest.mark.parametrize("page, action, expected", [
    ("pages/sample.py", lambda at: at.text_input(key="sample_formula").input("Xx2Cl").run(), "Xx"),
    ("pages/structure.py", lambda at: (at.radio(key="structure_source").set_value("Paste a CIF").run(),
                                       at.text_area(key="structure_paste").input("data_x\nnot a cif\n").run()),
     "cannot be read"),
    # Form fields are submitted with their button (a run() in between would discard them, as in a browser).
    ("pages/data.py", lambda at: (at.text_input(key="data_name").input("../escape"),
                                  at.button(key="data_build_go").click().run()), "cannot be used as a folder"),
    ("pages/train.py", lambda at: (at.number_input(key="train_warmup").set_value(500),
                                   at.number_input(key="train_steps").set_value(10),
                                   at.button(key="train_launch").click().run()), "warmup_iters"),
])
def test_user_mistakes_show_a_message_not_a_traceback(lab, page, action, expected):
    at = open_page(page)
    action(at)
    assert not at.exception, [e.value for e in at.exception]
    errors = " ".join(e.value for e in at.error)
    assert expected in errors


def test_launch_from_two_tabs_starts_one_training_run(lab):
    tabs = [open_page("pages/train.py") for _ in range(2)]
    for at in tabs:
        at.text_input(key="train_name").input("apptest-run")
        at.selectbox(key="train_dataset").set_value("tiny")
        at.selectbox(key="train_device").set_value("cpu")
        at.number_input(key="train_steps").set_value(4)
        at.number_input(key="train_warmup").set_value(1)
        at.number_input(key="train_eval").set_value(4)
        at.number_input(key="train_batch").set_value(2)
    for at in tabs:
        at.button(key="train_launch").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
    job_dir = lab / "jobs" / "train" / "apptest-run"
    assert not (job_dir / "history").exists()
    assert "already running" in " ".join(i.value for i in tabs[1].info)
    state = wait_for_job(job_dir)
    assert state["state"] == "finished", jobs.tail_log(job_dir)

    at = tabs[0].run()
    at.selectbox(key="train_run").set_value(lab / "train" / "apptest-run").run()
    m = metrics(at)
    assert m["State"] == "completed" and m["Step"] == "4 / 4"


def test_generate_button_samples_into_a_new_set(lab):
    at = open_page("pages/sample.py")
    at.selectbox(key="sample_ckpt").set_value("train/tiny/ckpt/last.pt")
    at.text_input(key="sample_formula").input("KCl")
    at.number_input(key="sample_z").set_value(4).run()
    at.slider(key="sample_temp").set_value(0.3)
    at.number_input(key="sample_n").set_value(2)
    at.number_input(key="sample_max_tokens").set_value(300)
    at.selectbox(key="sample_device").set_value("cpu")
    at.text_input(key="sample_name").input("apptest-kcl")
    at.button(key="sample_generate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    state = wait_for_job(lab / "jobs" / "sample" / "apptest-kcl")
    assert state["state"] == "finished", jobs.tail_log(lab / "jobs" / "sample" / "apptest-kcl")

    at.run()
    assert at.selectbox(key="sample_set").value == lab / "samples" / "apptest-kcl"
    assert metrics(at)["Samples"] == "2"


def test_sweep_button_runs_a_two_prompt_sweep(lab):
    at = open_page("pages/compare.py")
    at.text_input(key="sweep_name").input("apptest-sweep")
    at.multiselect(key="sweep_ckpts").set_value([lab / "train" / "tiny" / "ckpt" / "last.pt"])
    at.text_area(key="sweep_prompts").input("Na4Cl4\nK4Cl4")
    at.text_input(key="sweep_temps").input("0.3")
    at.text_input(key="sweep_n").input("1")
    at.number_input(key="sweep_max_tokens").set_value(300)
    at.selectbox(key="sweep_device").set_value("cpu")
    at.button(key="sweep_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    state = wait_for_job(lab / "jobs" / "sweep" / "apptest-sweep")
    assert state["state"] == "finished", jobs.tail_log(lab / "jobs" / "sweep" / "apptest-sweep")

    at.run()
    assert at.selectbox(key="compare_pick_sweep").value == lab / "sweeps" / "apptest-sweep"
    assert list(at.table[0].value["prompt"]) == ["Na4Cl4", "K4Cl4"]


def test_structure_prediction_page_runs_the_benchmark_and_shows_target_and_sample(lab):
    at = open_page("pages/csp.py")
    assert at.title[0].value == "Structure prediction"
    at.selectbox(key="csp_ckpt").set_value("train/tiny/ckpt/last.pt").run()
    at.radio(key="csp_target_kind").set_value("Path on the server").run()
    outside = lab.parent / "cifs"  # the lab's training CIFs, outside the runs root
    at.text_input(key="csp_targets").input(str(outside))
    at.button(key="csp_run").click().run()
    assert "outside the folders this lab may read" in " ".join(e.value for e in at.error)

    # The same files from the browser: a zip of CIFs, as a user holding a standard split would upload it.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cif in sorted(outside.glob("*.cif")):
            zf.writestr(cif.name, cif.read_text())
    at.radio(key="csp_target_kind").set_value("Upload").run()
    at.file_uploader(key="csp_upload").set_value(("rocksalts.zip", buf.getvalue(), "application/zip")).run()
    at.text_input(key="csp_name").input("apptest-csp")
    at.number_input(key="csp_k").set_value(1)
    at.number_input(key="csp_limit").set_value(0)
    at.slider(key="csp_temp").set_value(0.0)
    at.number_input(key="csp_max_tokens").set_value(400)
    at.selectbox(key="csp_device").set_value("cpu")
    at.button(key="csp_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    state = wait_for_job(lab / "jobs" / "csp" / "apptest-csp")
    assert state["state"] == "finished", jobs.tail_log(lab / "jobs" / "csp" / "apptest-csp")

    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="csp_pick").value == lab / "csp" / "apptest-csp"
    m = metrics(at)
    assert m["Targets"] == "3" and m["Match rate"] == "100.0 %"  # greedy recalls the memorised rock salts
    assert len(at.get("iframe")) == 2  # the target and its best sample in 3D
    (chart,) = [c for c in at.get("plotly_chart") if c.key == "csp_by_sites"]
    spec = json.loads(chart.proto.spec)
    assert spec["layout"]["yaxis"]["range"] == [0, 1.1]  # 0-100 %, never from -100 %
    assert spec["data"][0]["x"] == ["5-8"]  # Na4Cl4, K4Cl4, Mg4O4: 8 atoms in each target cell
    assert "matched" in at.selectbox(key="csp_sample").format_func(at.selectbox(key="csp_sample").value)

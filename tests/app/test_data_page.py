"""AppTest of the Data page: frequency charts show the most frequent elements and space groups, and a build
launched from the page shows its progress, empties the uploader and is selected once it is done."""

from __future__ import annotations

import json
from pathlib import Path

from apptest_helpers import metrics, open_page, wait_for_job
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from streamlit.testing.v1 import AppTest

from engine.crystal.vocab import ELEMENTS
from engine.lab import jobs
from engine.lab.fsutil import atomic_write_json
from engine.lab.settings import get_settings


def chart_x(at: AppTest, key: str) -> list[str]:
    """The bar labels of the plotly chart with widget key ``key``, left to right."""
    (chart,) = [c for c in at.get("plotly_chart") if c.key == key]
    return json.loads(chart.proto.spec)["data"][0]["x"]


def rock_salt_cif(cation: str, anion: str, a: float) -> bytes:
    """A rock-salt CIF (cubic cell length ``a`` in Å) as uploaded bytes."""
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return str(CifWriter(s)).encode()


def test_frequency_charts_show_the_most_frequent_not_the_alphabetically_first():
    folder = get_settings().datasets_dir / "many"
    folder.mkdir(parents=True)
    (folder / "train.bin").write_bytes(b"\x00\x00")
    # 60 elements seen once, plus Zr and O (late in the alphabet) seen most often; written with sorted keys as
    # every build writes stats.json.
    elements = {el: 1 for el in sorted(ELEMENTS)[:60]}
    elements.update({"Zr": 50, "O": 30})
    groups = {f"P{k}": 1 for k in range(50)} | {"R-3m": 9}
    atomic_write_json(folder / "stats.json", {"train_cifs": 62, "element_counts": elements,
                                              "spacegroup_counts": groups})
    at = open_page("pages/data.py")
    x = chart_x(at, "data_elements")
    assert len(x) == 40 and x[:2] == ["Zr", "O"]
    assert chart_x(at, "data_sgs")[0] == "R-3m"


def test_build_from_uploads_shows_progress_empties_the_uploader_and_selects_the_new_dataset(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the build job inherits it: faster on a shared 2-core machine
    jobs_dir = get_settings().runs_dir / "jobs" / "data"
    at = open_page("pages/data.py")
    assert any("No dataset yet" in i.value for i in at.info)
    at.radio(key="data_kind").set_value("Upload CIFs / zip / CSV").run()

    at.text_input(key="data_name").input("first")
    at.file_uploader[0].set_value([("NaCl.cif", rock_salt_cif("Na", "Cl", 5.64), "text/plain"),
                                   ("KCl.cif", rock_salt_cif("K", "Cl", 6.29), "text/plain"),
                                   ("MgO.cif", rock_salt_cif("Mg", "O", 4.21), "text/plain")])
    at.button(key="data_build_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.file_uploader[0].value) == 3  # kept while the build runs (and after it fails)
    if jobs.job_state(jobs_dir / "first")["state"] == "running":  # it cannot end this fast, but never flake
        infos = [i.value for i in at.info]
        assert not any("No dataset yet" in v for v in infos)
        assert any("'first' is being built" in v for v in infos)
        (bar,) = at.get("progress")
        assert "Building first" in bar.proto.text and "NaCl.cif, KCl.cif, MgO.cif" in bar.proto.text
    assert wait_for_job(jobs_dir / "first")["state"] == "finished"
    at.run()
    assert at.selectbox(key="data_pick").value == "data/first"
    assert not at.file_uploader[0].value  # built: these files cannot slip into the next build

    at.text_input(key="data_name").input("second")
    at.file_uploader[0].set_value([("CsCl.cif", rock_salt_cif("Cs", "Cl", 6.9), "text/plain"),
                                   ("LiF.cif", rock_salt_cif("Li", "F", 4.03), "text/plain")])
    at.button(key="data_build_go").click().run()
    assert [Path(a).name for a in jobs.job_state(jobs_dir / "second")["argv"][2:4]] == ["CsCl.cif", "LiF.cif"]
    assert wait_for_job(jobs_dir / "second")["state"] == "finished"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="data_pick").value == "data/second"  # the dataset just built, not the one shown before
    assert metrics(at)["Train CIFs"] == "1"
    at.selectbox(key="data_pick").set_value("data/first").run()  # followed once: the user may go back
    assert at.selectbox(key="data_pick").value == "data/first" and metrics(at)["Train CIFs"] == "2"


def test_a_name_whose_build_failed_can_be_used_again():
    folder = get_settings().runs_dir / "incoming"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("no CIF here yet\n")
    at = open_page("pages/data.py")
    at.radio(key="data_kind").set_value("Folder or file on the server").run()
    at.text_input(key="data_name").input("retry")
    at.text_input(key="data_path").input("incoming")
    at.button(key="data_build_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = get_settings().runs_dir / "jobs" / "data" / "retry"
    assert wait_for_job(job)["state"] == "failed"  # a folder without CIFs
    assert not (get_settings().datasets_dir / "retry").exists()

    (folder / "NaCl.cif").write_bytes(rock_salt_cif("Na", "Cl", 5.64))
    (folder / "KCl.cif").write_bytes(rock_salt_cif("K", "Cl", 6.29))
    at.text_input(key="data_name").input("retry")
    at.text_input(key="data_path").input("incoming")
    at.button(key="data_build_go").click().run()
    assert not at.error, [e.value for e in at.error]  # not "choose a new name"
    assert wait_for_job(job)["state"] == "finished", jobs.tail_log(job)
    assert (get_settings().datasets_dir / "retry" / "train.bin").exists()
    assert (job / "history" / "1" / "job.json").exists()  # the failed attempt's records are kept


def test_a_failed_upload_build_keeps_the_files_names_the_slider_and_lists_its_rejects(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    old = get_settings().datasets_dir / "old"  # a dataset already there, with no rejects
    old.mkdir(parents=True)
    (old / "train.bin").write_bytes(b"\x00\x00")
    atomic_write_json(old / "stats.json", {"train_cifs": 1})
    at = open_page("pages/data.py")
    at.radio(key="data_kind").set_value("Upload CIFs / zip / CSV").run()
    name = at.text_input(key="data_name").value
    assert name.startswith("upload-")  # not "builtin", which a corpus build takes
    at.file_uploader[0].set_value([("NaCl.cif", rock_salt_cif("Na", "Cl", 5.64), "text/plain"),
                                   ("broken.cif", b"data_broken\n_cell_length_a 5\n", "text/plain")])
    at.button(key="data_build_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = get_settings().runs_dir / "jobs" / "data" / name
    assert wait_for_job(job)["state"] == "failed"  # one usable CIF cannot be split into train and validation
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    message = " ".join(e.value for e in at.error)
    assert "Validation share" in message and "--val-fraction" not in message and "val_fraction" not in message
    rejects = next(df.value for df in at.dataframe if "reason" in df.value.columns)
    assert list(rejects["name"]) == ["broken.cif"] and rejects["reason"].iloc[0]
    headers = [h.value for h in at.subheader]
    assert "Rejects of this build (1)" in headers and not any(h.startswith("Rejects of old") for h in headers)
    assert [f.name for f in at.file_uploader[0].value] == ["NaCl.cif", "broken.cif"]  # ready to build again

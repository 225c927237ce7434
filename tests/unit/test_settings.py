"""Dashboard file access stays inside the runs root and the folders named in CRYSTALLAB_DATA_DIRS."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.lab.errors import PathNotAllowed
from engine.lab.settings import get_settings


@pytest.fixture
def roots(tmp_path, monkeypatch):
    runs, data, outside = tmp_path / "runs", tmp_path / "data", tmp_path / "outside"
    for d in (runs, data, outside):
        d.mkdir()
    (runs / "a.cif").write_text("x")
    (data / "ckpt.pt").write_bytes(b"x")
    (outside / "secret.txt").write_text("x")
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(runs))
    monkeypatch.setenv("CRYSTALLAB_DATA_DIRS", str(data))
    return runs, data, outside


def test_paths_inside_allowed_roots_resolve(roots):
    runs, data, _ = roots
    s = get_settings()
    assert s.resolve_user_path("a.cif") == (runs / "a.cif").resolve()  # relative: under the runs root
    assert s.resolve_user_path(str(data / "ckpt.pt")) == (data / "ckpt.pt").resolve()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_paths_outside_are_refused_with_the_fix(roots, how):
    runs, _, outside = roots
    target = {
        "absolute": str(outside / "secret.txt"),
        "dotdot": "../outside/secret.txt",
        "symlink": "link.txt",
    }[how]
    if how == "symlink":
        (runs / "link.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(PathNotAllowed) as exc:
        get_settings().resolve_user_path(target)
    msg = str(exc.value)
    assert "secret.txt" in msg and "CRYSTALLAB_DATA_DIRS" in msg


def test_missing_file_inside_a_root_is_reported(roots):
    with pytest.raises(FileNotFoundError):
        get_settings().resolve_user_path("nope.cif")


def test_dashboard_data_dir_lets_the_readme_csp_example_through(tmp_path, monkeypatch):
    """`crystallab dashboard --data-dir ../shared/data` makes `../shared/data/perov_5/test.csv` readable."""
    from engine.app.dashboard import extend_data_dirs
    from engine.cli import build_parser
    from engine.lab.errors import InputError

    targets = tmp_path / "shared" / "data" / "perov_5" / "test.csv"
    targets.parent.mkdir(parents=True)
    targets.write_text("cif\n")
    monkeypatch.delenv("CRYSTALLAB_DATA_DIRS", raising=False)
    with pytest.raises(PathNotAllowed, match="--data-dir"):
        get_settings().resolve_user_path(targets)
    monkeypatch.chdir(tmp_path / "shared")  # a relative folder, as the README writes it
    args = build_parser("dashboard").parse_args(["dashboard", "--data-dir", "data", "--data-dir", "data"])
    monkeypatch.setenv("CRYSTALLAB_DATA_DIRS", "")  # monkeypatch restores the variable after the test
    extend_data_dirs(args.data_dir)
    assert get_settings().resolve_user_path(targets) == targets.resolve()
    assert get_settings().data_dirs == (targets.parents[1].resolve(),)  # once, though given twice
    with pytest.raises(InputError, match="--data-dir nowhere: no such folder"):
        extend_data_dirs(["nowhere"])


def test_nul_bytes_and_symlink_loops_give_the_usual_error(roots):
    runs, _, outside = roots
    s = get_settings()
    with pytest.raises(PathNotAllowed, match="NUL byte"):
        s.resolve_user_path("a\x00.cif")
    (runs / "loop").symlink_to(runs / "loop")
    with pytest.raises(PathNotAllowed):
        s.resolve_user_path("loop")
    (runs / "away").symlink_to(outside / "secret.txt")
    assert s.is_allowed(runs / "a.cif") and not s.is_allowed(runs / "away") and not s.is_allowed("a\x00b")


def test_the_dashboard_lists_no_run_checkpoint_or_sample_set_behind_an_escaping_symlink(roots, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # pages/ is not an installed package
    import pages.common as common
    from engine.app.dashboard import find_sample_sets, sample_set_zip

    runs, _, outside = roots
    for name in ("mine", "theirs"):
        folder = (runs / "train" / name) if name == "mine" else (outside / name)
        (folder / "ckpt").mkdir(parents=True)
        (folder / "status.json").write_text("{}")
        (folder / "ckpt" / "last.pt").write_bytes(b"x")
        sset = (runs / "samples" / name) if name == "mine" else (outside / f"set-{name}")
        (sset / "raw").mkdir(parents=True)
        (sset / "config.json").write_text("{}")
        (sset / "samples.jsonl").write_text("")
    (runs / "train" / "theirs").symlink_to(outside / "theirs")
    (runs / "train" / "mine" / "ckpt" / "best.pt").symlink_to(outside / "secret.txt")
    (runs / "samples" / "theirs").symlink_to(outside / "set-theirs")
    (runs / "samples" / "mine" / "raw" / "0000.txt").symlink_to(outside / "secret.txt")
    assert [p.name for p in common.train_runs()] == ["mine"]
    assert common.checkpoints() == [runs / "train" / "mine" / "ckpt" / "last.pt"]
    assert [p.name for p in find_sample_sets(runs / "samples")] == ["mine"]
    assert b"0000.txt" not in sample_set_zip(runs / "samples" / "mine")

"""Dashboard file access stays inside the runs root and the folders named in CRYSTALLAB_DATA_DIRS."""

from __future__ import annotations

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

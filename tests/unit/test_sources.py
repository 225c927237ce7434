"""Reading dataset sources safely: confinement to the allowed folders, links inside archives, size and
compression-ratio caps (zip bombs), the time and size bound on canonicalizing one input, and the one rule for
files that are not UTF-8."""

from __future__ import annotations

import io
import json
import re
import tarfile
import tracemalloc
import zipfile

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.cli import main
from engine.data.datasets import build_dataset
from engine.data.sources import ReadLimits, scan_source
from engine.lab.errors import InputError, PathNotAllowed
from engine.lab.settings import get_settings

ROCK_SALT = str(CifWriter(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                                    [[0, 0, 0], [0.5, 0.5, 0.5]])))
SMALL = ReadLimits(file_bytes=8 * 2**20, source_bytes=64 * 2**20, max_ratio=200, ratio_floor=2**20)
"""Caps lowered so a bomb of a few tens of MB trips them."""


def _big_p1(n: int) -> str:
    """A random P1 cell of ``n`` Na/Cl sites as CIF text (cheap to write, slow to symmetrize)."""
    rng = np.random.default_rng(0)
    s = Structure(Lattice.cubic((n * 12) ** (1 / 3)), ["Na", "Cl"] * (n // 2), rng.random((n // 2 * 2, 3)))
    return str(CifWriter(s))


# ---- confinement --------------------------------------------------------------------------------------------


@pytest.fixture
def escaping_folder(tmp_path, monkeypatch):
    """A folder of CIFs under the runs root holding symlinks to a file outside it and to /etc/passwd."""
    runs, outside = tmp_path / "runs", tmp_path / "elsewhere"
    monkeypatch.setenv("CRYSTALLAB_RUNS", str(runs))
    monkeypatch.setenv("CRYSTALLAB_DATA_DIRS", "")
    folder = runs / "uploads" / "mine"
    folder.mkdir(parents=True)
    outside.mkdir()
    (folder / "good.cif").write_text(ROCK_SALT)
    (runs / "also_allowed.cif").write_text(ROCK_SALT.replace("5.64", "5.70"))
    (outside / "secret.cif").write_text(ROCK_SALT.replace("5.64", "6.00"))
    (folder / "inside_link.cif").symlink_to(runs / "also_allowed.cif")
    (folder / "outside.cif").symlink_to(outside / "secret.cif")
    (folder / "passwd.cif").symlink_to("/etc/passwd")
    (folder / "subdir_link").symlink_to(outside, target_is_directory=True)
    return folder


def test_confined_build_follows_no_symlink_out_of_the_allowed_folders(escaping_folder, tmp_path):
    out = get_settings().datasets_dir / "d"
    stats = build_dataset([escaping_folder], out, val_fraction=0, dedup=False, workers=1, confine=True)
    assert stats["accepted"] == 2  # good.cif and the link that stays inside the runs root
    skipped = {f["name"]: f["reason"] for f in stats["skipped_files"]}
    assert set(skipped) == {"outside.cif", "passwd.cif"}
    assert all("outside the folders this lab may read" in r for r in skipped.values())
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert {r["name"] for r in index} == {"good.cif", "inside_link.cif"}
    # The command line follows the user's own symlinks unless asked to confine (the dashboard always asks).
    assert main(["data", "build", str(escaping_folder), "--out", str(tmp_path / "cli"), "--val-fraction", "0",
                 "--workers", "1", "--no-dedup", "--confine"]) == 0
    with pytest.raises(PathNotAllowed, match="outside the folders"):
        build_dataset([tmp_path / "elsewhere"], tmp_path / "x", val_fraction=0, workers=1, confine=True)


def test_a_nul_byte_in_a_typed_path_is_the_usual_error(escaping_folder):
    with pytest.raises(PathNotAllowed, match="NUL byte"):
        get_settings().resolve_user_path("uploads/mine\x00/good.cif")
    with pytest.raises(InputError, match="NUL byte"):
        scan_source("uploads\x00.cif")
    assert not get_settings().is_allowed("a\x00b")


def test_tar_links_are_skipped_with_their_reason(tmp_path):
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = ROCK_SALT.encode()
        info = tarfile.TarInfo("cifs/a.cif")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, kind, target in (("cifs/passwd.cif", tarfile.SYMTYPE, "/etc/passwd"),
                                   ("cifs/again.cif", tarfile.LNKTYPE, "cifs/a.cif")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            tf.addfile(link)
    scan = scan_source(archive)
    assert [i.name for i in scan.items] == ["cifs/a.cif"]
    assert scan.skipped == [("cifs/again.cif", "a hard link inside the archive (to 'cifs/a.cif'); links are not "
                                               "followed"),
                            ("cifs/passwd.cif", "a symbolic link inside the archive (to '/etc/passwd'); links are "
                                                "not followed")]


# ---- archive caps -------------------------------------------------------------------------------------------


def test_a_zip_bomb_member_is_rejected_unread(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.cif", ROCK_SALT)
        zf.writestr("bomb.cif", bytes(50 * 2**20))  # 50 MB of zeros, about 50 kB packed
    assert archive.stat().st_size < 2**20
    tracemalloc.start()
    try:
        scan = scan_source(archive, limits=SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # judged from its header: never decompressed
    (good, bomb) = scan.items
    assert good.error is None
    assert re.fullmatch(r"it would expand more than 200-fold \(50 MB from \d+ kB\): a zip bomb, not CIF text",
                        bomb.error)
    plain = ReadLimits(file_bytes=8 * 2**20, max_ratio=1e9)  # the size cap alone catches it too
    assert "decompresses to 50 MB, over the 8 MB" in scan_source(archive, limits=plain).items[1].error


@pytest.mark.parametrize("member", ["bomb.cif", "readme.txt"])
def test_a_tar_bomb_is_refused_as_a_whole(tmp_path, member):
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        info.size = 50 * 2**20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(InputError, match="looks like a zip bomb"):
        scan_source(archive, limits=SMALL)
    with pytest.raises(InputError, match="decompresses to more than 16 MB"):
        scan_source(archive, limits=ReadLimits(source_bytes=16 * 2**20, max_ratio=1e9))


# ---- bounded canonicalization -------------------------------------------------------------------------------


def test_an_input_too_large_or_too_slow_is_rejected_and_the_rest_built(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "a.cif").write_text(ROCK_SALT)
    (folder / "big.cif").write_text(_big_p1(3000))
    stats = build_dataset([folder], tmp_path / "sized", val_fraction=0, workers=1)
    assert stats["accepted"] == 1
    (reject,) = [json.loads(line) for line in (tmp_path / "sized" / "rejects.jsonl").read_text().splitlines()]
    assert reject["name"] == "big.cif" and reject["reason"].startswith("too_many_sites: its atom-site loop lists "
                                                                       "3000 sites, over the limit of 500")
    stats = build_dataset([folder], tmp_path / "timed", val_fraction=0, workers=1, max_sites=5000, timeout_s=3)
    assert stats["accepted"] == 1
    (reject,) = [json.loads(line) for line in (tmp_path / "timed" / "rejects.jsonl").read_text().splitlines()]
    assert reject["reason"].startswith("timeout: no result within 3 s")


def test_cif_canonicalize_bounds_each_file_and_goes_on(tmp_path, capsys):
    big, good = tmp_path / "big.cif", tmp_path / "good.cif"
    big.write_text(_big_p1(3000))
    good.write_text(ROCK_SALT)
    assert main(["cif", "canonicalize", str(big), str(good)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("data_Na4Cl4\n") and err.count("\n") == 1 and "too_many_sites" in err
    assert main(["cif", "canonicalize", str(big), str(good), "--max-sites", "5000", "--timeout", "2"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("data_Na4Cl4\n") and err == f"error: {big}: timeout: no result within 2 s; the worker " \
                                                      "was killed; raise --timeout, or leave this file out\n"


# ---- encodings ----------------------------------------------------------------------------------------------


def test_one_rule_for_files_that_are_not_utf8(tmp_path, capsys):
    latin1 = tmp_path / "latin1.cif"
    latin1.write_bytes(ROCK_SALT.replace("data_", "# Universit\xe9 de Li\xe8ge\ndata_", 1).encode("latin-1"))
    utf16 = tmp_path / "utf16.cif"
    utf16.write_bytes(ROCK_SALT.encode("utf-16"))
    assert main(["cif", "canonicalize", str(latin1)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("data_Na4Cl4\n")
    assert err == (f"warning: {latin1} is not UTF-8 (line 2); it was read as Latin-1. Convert it to UTF-8 "
                   "(iconv -f LATIN1 -t UTF-8) if its text is in another encoding.\n")
    stats = build_dataset([latin1], tmp_path / "d", val_fraction=0, workers=1)
    assert stats["accepted"] == 1 and stats["latin1_files"] == [{"source": str(latin1), "name": "latin1.cif",
                                                                 "line": 2}]
    assert main(["cif", "canonicalize", str(utf16)]) == 2
    assert capsys.readouterr().err == f"error: {utf16}: the file is UTF-16 text; save it as UTF-8 (e.g. iconv -f " \
                                      "UTF-16 -t UTF-8).\n"
    with pytest.raises(InputError, match="UTF-16 text; save it as UTF-8"):
        build_dataset([utf16], tmp_path / "e", val_fraction=0, workers=1)


def test_an_oversized_meta_pkl_in_a_token_archive_is_not_read_whole(tmp_path, monkeypatch):
    import engine.data.sources
    from engine.data.tokens import import_tokens

    monkeypatch.setattr(engine.data.sources, "META_MAX_BYTES", 4096)
    archive = tmp_path / "tokens.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, size in (("t/meta.pkl", 8192), ("t/train.bin", 4), ("t/val.bin", 0)):
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BytesIO(bytes(size)))
    with pytest.raises(InputError, match=r"t/meta.pkl is over 4 kB; a CrystaLLM meta.pkl holds 371 tokens"):
        import_tokens(archive, tmp_path / "out")

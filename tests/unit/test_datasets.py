"""Datasets: building token files from CIF sources, importing CrystaLLM token archives, loading for training."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from engine.cli import main
from engine.crystal.canonical import canonicalize, model_view
from engine.crystal.tokenizer import decode
from engine.crystal.vocab import DATA_ID, TOKENS
from engine.data.datasets import build_dataset
from engine.data.tokens import import_tokens, iter_cifs, load_token_dataset
from engine.lab.errors import InputError
from engine.lab.settings import get_settings


def _nacl(a: float) -> str:
    """Rock-salt NaCl with lattice constant ``a`` (angstrom), as pymatgen P1 CIF text."""
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return str(CifWriter(s))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mp20_rows(shared_dir) -> pd.DataFrame:
    return pd.read_csv(shared_dir / "data" / "mp20_subset" / "train.csv", nrows=20)


@pytest.fixture(scope="module")
def mp20_csv(mp20_rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("csv") / "mp20.csv"
    mp20_rows.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def built(mp20_csv, tmp_path_factory) -> tuple[Path, dict, list]:
    out = tmp_path_factory.mktemp("built") / "mp20"
    calls: list[tuple[int, int]] = []
    stats = build_dataset([mp20_csv], out, val_fraction=0.2, seed=7, workers=1,
                          progress=lambda done, total: calls.append((done, total)))
    return out, stats, calls


def test_csv_build_decodes_back_to_canonical_cifs(built, mp20_rows):
    out, stats, progress_calls = built
    assert progress_calls[0] == (0, 20) and progress_calls[-1] == (20, 20) and progress_calls == sorted(progress_calls)
    assert stats["inputs"] == 20 and stats["accepted"] + stats["rejected"] == 20
    assert stats["train_cifs"] + stats["val_cifs"] == stats["accepted"] - stats["duplicates_removed"]
    assert stats["val_cifs"] == round(0.2 * (stats["train_cifs"] + stats["val_cifs"]))
    raw = dict(zip(mp20_rows.material_id, mp20_rows.cif))
    index = _read_jsonl(out / "index.jsonl")
    assert len(index) == stats["train_cifs"] + stats["val_cifs"]
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype="<u2")
        assert ids.size == stats[f"{split}_tokens"]
        records = [r for r in index if r["split"] == split]
        for rec in records:
            text = decode(ids[rec["offset"]: rec["offset"] + rec["n_tokens"]].tolist())
            assert text == model_view(canonicalize(raw[rec["name"]]))
            assert text.endswith("\n\n") and rec["meta"]["material_id"] == rec["name"]
        with open(out / ("starts.pkl" if split == "train" else "starts_val.pkl"), "rb") as fh:
            starts = pickle.load(fh)  # plain pickle, as upstream reads it
        assert starts == [r["offset"] for r in records] and all(ids[s] == DATA_ID for s in starts)


def test_meta_files_are_crystallm_layout(built):
    out, _, _ = built
    with open(out / "meta.pkl", "rb") as fh:
        meta = pickle.load(fh)
    assert meta["vocab_size"] == 371 and len(meta["itos"]) == 371
    assert meta["itos"][124] == "data_" and meta["stoi"]["data_"] == 124 and meta["itos"][142] == "\n"
    assert all(isinstance(k, int) for k in meta["itos"])
    # Upstream's layout: space-group ids map to the bare symbol in itos, stoi keeps the suffix.
    assert meta["itos"][143] == TOKENS[143][: -len("_sg")] and meta["stoi"][TOKENS[143]] == 143
    assert "".join(meta["itos"][int(i)] for i in np.fromfile(out / "train.bin", dtype="<u2")[:400]) == decode(
        np.fromfile(out / "train.bin", dtype="<u2")[:400].tolist())  # upstream's identify_starts rebuilds text so
    assert load_token_dataset(out).meta == meta  # and we read our own files back
    as_json = json.loads((out / "meta.json").read_text())
    assert {int(k): v for k, v in as_json["itos"].items()} == meta["itos"] and as_json["stoi"] == meta["stoi"]
    provenance = json.loads((out / "dataset.json").read_text())
    assert provenance["options"]["seed"] == 7 and len(provenance["fingerprint"]) == 64
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_split_is_seeded_and_worker_count_does_not_change_output(built, mp20_csv, tmp_path):
    out, _, _ = built
    again = tmp_path / "again"
    build_dataset([mp20_csv], again, val_fraction=0.2, seed=7, workers=2)
    for f in ("train.bin", "val.bin", "starts.pkl", "index.jsonl"):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f
    other = tmp_path / "other"
    build_dataset([mp20_csv], other, val_fraction=0.2, seed=8, workers=1)
    names = lambda d: {r["name"] for r in _read_jsonl(d / "index.jsonl") if r["split"] == "val"}  # noqa: E731
    assert names(other) != names(out)
    assert load_token_dataset(other).fingerprint != load_token_dataset(out).fingerprint


def test_folder_zip_and_tar_sources_give_identical_datasets(mp20_rows, tmp_path):
    folder = tmp_path / "cifs"
    (folder / "sub").mkdir(parents=True)
    texts = dict(zip(mp20_rows.material_id[:5], mp20_rows.cif[:5]))
    for k, (name, text) in enumerate(texts.items()):
        (folder / ("sub" if k % 2 else "") / f"{name}.cif").write_text(text)
    with zipfile.ZipFile(tmp_path / "cifs.zip", "w") as zf:
        for p in sorted(folder.rglob("*.cif")):
            zf.write(p, p.relative_to(folder).as_posix())
        zf.writestr("README.txt", "not a CIF, ignored")
    with tarfile.open(tmp_path / "cifs.tar.gz", "w:gz") as tf:
        for p in sorted(folder.rglob("*.cif")):
            tf.add(p, p.relative_to(folder).as_posix())
    fingerprints = set()
    for src in (folder, tmp_path / "cifs.zip", tmp_path / "cifs.tar.gz"):
        out = tmp_path / f"out-{src.name}"
        stats = build_dataset([src], out, val_fraction=0.2, seed=1, workers=1)
        assert (stats["inputs"], stats["train_cifs"], stats["val_cifs"]) == (5, 4, 1)
        fingerprints.add(json.loads((out / "dataset.json").read_text())["fingerprint"])
        names = {r["name"] for r in _read_jsonl(out / "index.jsonl")}
        assert "sub/" + list(texts)[1] + ".cif" in names
    assert len(fingerprints) == 1


def test_rejects_name_every_failed_input_with_a_reason(mp20_rows, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = mp20_rows.cif[0]
    (folder / "good.cif").write_text(good)
    (folder / "good2.cif").write_text(mp20_rows.cif[1])
    (folder / "no_cell_b.cif").write_text("\n".join(l for l in good.splitlines()
                                                    if not l.startswith("_cell_length_b")))
    (folder / "truncated.cif").write_text(good[: len(good) // 2])
    partial = Structure(Lattice.cubic(5.64), [{"Na": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    (folder / "partial.cif").write_text(str(CifWriter(partial)))
    (folder / "binary.cif").write_bytes(b"\x89PNG\x00\x00\x1a" + bytes(range(256)))
    (folder / "two_blocks.cif").write_text(mp20_rows.cif[2] + "\n" + mp20_rows.cif[3])
    csv = tmp_path / "rows.csv"
    pd.DataFrame({"material_id": ["mp-ok", "mp-empty"], "cif": [mp20_rows.cif[4], None]}).to_csv(csv, index=False)
    out = tmp_path / "out"
    stats = build_dataset([folder, csv], out, val_fraction=0, workers=1)
    rejects = {r["name"]: r for r in _read_jsonl(out / "rejects.jsonl")}
    assert set(rejects) == {"no_cell_b.cif", "truncated.cif", "partial.cif", "binary.cif", "mp-empty"}
    assert all(r["source"] == str(folder) and r["reason"] for n, r in rejects.items() if n != "mp-empty")
    assert "partially occupied" in rejects["partial.cif"]["reason"]
    assert "binary" in rejects["binary.cif"]["reason"]
    assert "empty 'cif' cell" in rejects["mp-empty"]["reason"] and rejects["mp-empty"]["source"] == str(csv)
    assert (stats["inputs"], stats["accepted"], stats["rejected"]) == (10, 5, 5)
    names = {r["name"] for r in _read_jsonl(out / "index.jsonl")}
    assert {"two_blocks.cif#1", "two_blocks.cif#2", "good.cif", "good2.cif", "mp-ok"} == names


def test_dedup_keeps_lowest_volume_per_formula_unit(tmp_path):
    folder = tmp_path / "nacl"
    folder.mkdir()
    (folder / "a_big.cif").write_text(_nacl(5.80))
    (folder / "b_small.cif").write_text(_nacl(5.64))
    (folder / "c_mid.cif").write_text(_nacl(5.70))
    stats = build_dataset([folder], tmp_path / "dedup", val_fraction=0, workers=1)
    assert (stats["accepted"], stats["duplicates_removed"], stats["train_cifs"]) == (3, 2, 1)
    (text,) = iter_cifs(load_token_dataset(tmp_path / "dedup"))
    assert "_cell_length_a 5.6400" in text
    dups = _read_jsonl(tmp_path / "dedup" / "duplicates.jsonl")
    assert {d["name"] for d in dups} == {"a_big.cif", "c_mid.cif"} and {d["kept_name"] for d in dups} == {
        "b_small.cif"}
    stats = build_dataset([folder], tmp_path / "all", val_fraction=0, dedup=False, workers=1)
    assert (stats["duplicates_removed"], stats["train_cifs"]) == (0, 3)


def test_builtin_source_uses_the_corpus_generator(monkeypatch, tmp_path):
    import engine.data.corpus

    calls = []

    def fake_generate(n, seed):
        calls.append((n, seed))
        return [("rocksalt-NaCl", Structure.from_str(_nacl(5.64), fmt="cif")),
                ("cscl-CsCl", Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.1), ["Cs", "Cl"],
                                                        [[0, 0, 0], [0.5, 0.5, 0.5]]))]

    monkeypatch.setattr(engine.data.corpus, "generate_structures", fake_generate)
    stats = build_dataset(["builtin:2:5"], tmp_path / "b", val_fraction=0.5, workers=1)
    assert calls == [(2, 5)] and (stats["train_cifs"], stats["val_cifs"]) == (1, 1)
    assert {r["name"] for r in _read_jsonl(tmp_path / "b" / "index.jsonl")} == {"rocksalt-NaCl", "cscl-CsCl"}
    assert set(stats["spacegroup_counts"]) == {"Fm-3m", "Pm-3m"} and stats["element_counts"]["Cl"] == 2


def test_wrong_inputs_raise_input_errors_naming_them(mp20_rows, tmp_path):
    with pytest.raises(InputError, match="nowhere.csv.*does not exist"):
        build_dataset([tmp_path / "nowhere.csv"], tmp_path / "o")
    pd.DataFrame({"structure": ["x"]}).to_csv(tmp_path / "nocif.csv", index=False)
    with pytest.raises(InputError, match="nocif.csv has no 'cif' column"):
        build_dataset([tmp_path / "nocif.csv"], tmp_path / "o")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(InputError, match="empty.zip contains no .cif files"):
        build_dataset([tmp_path / "empty.zip"], tmp_path / "o")
    (tmp_path / "blob.cif").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(InputError, match="blob.cif is a binary file"):
        build_dataset([tmp_path / "blob.cif"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_too_few_cifs_for_a_split_names_the_source_the_rejects_and_the_setting(mp20_rows, tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "one.cif").write_text(mp20_rows.cif[0])
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a -3.0\n")
    with pytest.raises(InputError) as err:
        build_dataset([folder], tmp_path / "o", workers=1)
    message = str(err.value)
    assert f"only 1 CIF remains from {folder} (1 input(s) rejected (broken.cif: _cell_length_a is -3.0" in message
    assert "--val-fraction" in message and "the Data page's Validation share" in message and "\n" not in message
    assert not (tmp_path / "o").exists()


def test_an_output_folder_that_cannot_be_created_is_refused_before_reading(mp20_rows, tmp_path):
    (tmp_path / "one.cif").write_text(mp20_rows.cif[0])
    # /sys refuses new files even to root, as a read-only folder does
    with pytest.raises(InputError, match="dataset folder /sys/crystallab-test/o cannot be created: .*cannot be "
                                         "written"):
        build_dataset([tmp_path / "one.cif"], "/sys/crystallab-test/o", workers=1)


def test_an_unreadable_source_among_several_is_a_reject_and_the_build_goes_on(mp20_rows, tmp_path):
    for k in range(3):
        (tmp_path / f"good{k}.cif").write_text(mp20_rows.cif[k])
    (tmp_path / "blob.cif").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "empty.cif").write_text("")
    pd.DataFrame({"formula": ["NaCl"], "x": [1]}).to_csv(tmp_path / "nocif.csv", index=False)
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    bad = ["blob.cif", "empty.cif", "nocif.csv", "corrupt.zip"]
    sources = [tmp_path / "good0.cif", *(tmp_path / b for b in bad), tmp_path / "good1.cif", tmp_path / "good2.cif"]
    stats = build_dataset(sources, tmp_path / "out", val_fraction=0, workers=1)
    assert (stats["inputs"], stats["accepted"], stats["rejected"], stats["unreadable_sources"]) == (7, 3, 4, 4)
    rejects = {r["name"]: r for r in _read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert set(rejects) == set(bad) and all(r["source"] == str(tmp_path / n) for n, r in rejects.items())
    assert "binary file" in rejects["blob.cif"]["reason"] and "no 'data_' block" in rejects["empty.cif"]["reason"]
    assert "no 'cif' column" in rejects["nocif.csv"]["reason"]
    assert "not a readable zip" in rejects["corrupt.zip"]["reason"]
    assert stats["train_cifs"] == 3


def test_build_fails_clearly_when_every_source_is_unreadable_or_one_is_missing(mp20_rows, tmp_path):
    (tmp_path / "blob.cif").write_bytes(b"\x00\x01\x02" * 100)
    pd.DataFrame({"formula": ["NaCl"]}).to_csv(tmp_path / "nocif.csv", index=False)
    with pytest.raises(InputError, match="none of the 2 sources could be read: .*blob.cif is a binary file.*"
                                         "nocif.csv has no 'cif' column"):
        build_dataset([tmp_path / "blob.cif", tmp_path / "nocif.csv"], tmp_path / "o")
    (tmp_path / "good.cif").write_text(mp20_rows.cif[0])
    with pytest.raises(InputError, match="typo.cif.*does not exist"):  # a mistyped path is not a reject
        build_dataset([tmp_path / "good.cif", tmp_path / "typo.cif"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_non_cif_files_in_folders_and_archives_are_counted_as_skipped(mp20_rows, tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for k in range(3):
        (folder / f"c{k}.cif").write_text(mp20_rows.cif[k])
    (folder / "readme.txt").write_text("notes")
    (folder / "._c0.cif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:
        zf.writestr("c3.cif", mp20_rows.cif[3])
        zf.writestr("c4.cif", mp20_rows.cif[4])
        zf.writestr("docs/readme.txt", "not a CIF")
    stats = build_dataset([folder, tmp_path / "mixed.zip"], tmp_path / "out", val_fraction=0, workers=1)
    assert (stats["inputs"], stats["rejected"], stats["skipped"]) == (5, 0, 3)
    assert stats["skipped_files"] == [
        {"source": str(folder), "name": "._c0.cif", "reason": "a macOS resource fork, not a CIF"},
        {"source": str(folder), "name": "readme.txt", "reason": "not a .cif file"},
        {"source": str(tmp_path / "mixed.zip"), "name": "docs/readme.txt", "reason": "not a .cif file"}]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["skipped"] == 3


def test_existing_output_is_never_clobbered_silently(mp20_rows, tmp_path):
    (tmp_path / "one.cif").write_text(mp20_rows.cif[0])
    out = tmp_path / "ds"
    build_dataset([tmp_path / "one.cif"], out, val_fraction=0, workers=1)
    with pytest.raises(InputError, match="already exists"):
        build_dataset([tmp_path / "one.cif"], out, val_fraction=0, workers=1)
    build_dataset([tmp_path / "one.cif"], out, val_fraction=0, workers=1, overwrite=True)
    assert load_token_dataset(out).train_starts.tolist() == [0]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="not a dataset folder"):
        build_dataset([tmp_path / "one.cif"], precious, val_fraction=0, workers=1, overwrite=True)
    assert (precious / "thesis.tex").exists()


# ---- import_tokens ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(golden_canonical, tmp_path_factory) -> dict:
    """An upstream-format token archive: bins from the golden ids, meta.pkl written with plain pickle.

    ``itos`` as upstream's ``bin/tokenize_cifs.py`` writes it: space-group ids map to bare symbols.
    """
    cifs = [np.asarray(r["ids"], dtype="<u2") for r in golden_canonical if "ids" in r][:30]
    train, val = cifs[:24], cifs[24:]
    root = tmp_path_factory.mktemp("upstream")
    folder = root / "tokens_v1_train_val"
    folder.mkdir()
    np.concatenate(train).tofile(folder / "train.bin")
    np.concatenate(val).tofile(folder / "val.bin")
    itos = {i: t.removesuffix("_sg") for i, t in enumerate(TOKENS)}
    meta = {"vocab_size": 371, "itos": itos, "stoi": {t: i for i, t in enumerate(TOKENS)}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    archive = root / "tokens_v1_train_val.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in ("meta.pkl", "train.bin", "val.bin"):
            tf.add(folder / name, f"tokens_v1_train_val/{name}")
    return {"archive": archive, "folder": folder, "train": train, "val": val}


def test_import_whole_archive_copies_bins_and_computes_starts(upstream, tmp_path):
    out = tmp_path / "imported"
    stats = import_tokens(upstream["archive"], out)
    assert (out / "train.bin").read_bytes() == (upstream["folder"] / "train.bin").read_bytes()
    assert (out / "val.bin").read_bytes() == (upstream["folder"] / "val.bin").read_bytes()
    lengths = [c.size for c in upstream["train"]]
    with open(out / "starts.pkl", "rb") as fh:
        assert pickle.load(fh) == np.cumsum([0] + lengths[:-1]).tolist()
    assert (stats["train_cifs"], stats["val_cifs"]) == (24, len(upstream["val"]))
    assert stats["tokens_per_cif"]["max"] == max(c.size for c in upstream["train"] + upstream["val"])
    ds = load_token_dataset(out)
    assert list(iter_cifs(ds, "val")) == [decode(c.tolist()) for c in upstream["val"]]
    assert sum(stats["spacegroup_counts"].values()) + stats["cifs_without_spacegroup_token"] == 24 + len(
        upstream["val"])


def test_import_subset_takes_whole_cifs_honouring_min_len(upstream, tmp_path):
    train_lens, val_lens = [c.size for c in upstream["train"]], sorted(c.size for c in upstream["val"])
    min_len = int(min(np.median(train_lens), val_lens[-2]))
    assert min(train_lens) < min_len  # the filter has something to drop
    originals = {c.tobytes() for c in upstream["train"] + upstream["val"]}
    for src in (upstream["archive"], upstream["folder"]):
        out = tmp_path / f"sub-{src.name}"
        stats = import_tokens(src, out, n_train=5, n_val=2, min_len=min_len, seed=3)
        ds = load_token_dataset(out)
        assert (ds.train_starts.size, ds.val_starts.size) == (5, 2) == (stats["train_cifs"], stats["val_cifs"])
        for ids, starts in ((ds.train, ds.train_starts), (ds.val, ds.val_starts)):
            ends = np.append(starts[1:], ids.size)
            for a, b in zip(starts, ends):
                assert np.asarray(ids[a:b]).tobytes() in originals and b - a >= min_len
    assert (tmp_path / "sub-tokens_v1_train_val").joinpath("train.bin").read_bytes() == (
        tmp_path / "sub-tokens_v1_train_val.tar.gz").joinpath("train.bin").read_bytes()
    with pytest.raises(InputError, match="only .* with at least"):
        import_tokens(upstream["folder"], tmp_path / "too-many", n_train=24, min_len=min_len)


def test_token_archive_given_to_build_points_to_import_tokens(upstream, tmp_path):
    with pytest.raises(InputError, match="use `crystallab data import-tokens`"):
        build_dataset([upstream["archive"]], tmp_path / "o")


def test_malicious_meta_pkl_is_refused_without_executing(upstream, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in ("train.bin", "val.bin"):
            tf.add(upstream["folder"] / name, f"evil/{name}")
        data = pickle.dumps({"vocab_size": 371, "itos": Exploit()})
        info = tarfile.TarInfo("evil/meta.pkl")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match="refusing to load"):
        import_tokens(archive, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_meta_with_suffixed_space_groups_in_itos_is_accepted_too(upstream, tmp_path):
    folder = tmp_path / "suffixed"
    folder.mkdir()
    for name in ("train.bin", "val.bin"):
        (folder / name).write_bytes((upstream["folder"] / name).read_bytes())
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 371, "itos": dict(enumerate(TOKENS)),
                                                    "stoi": {t: i for i, t in enumerate(TOKENS)}}))
    assert import_tokens(folder, tmp_path / "out")["train_cifs"] == 24
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 371, "itos": dict(enumerate(TOKENS)),
                                                    "stoi": {t.removesuffix("_sg"): i for i, t in enumerate(TOKENS)}}))
    with pytest.raises(InputError, match="'stoi' does not map"):  # bare names in stoi would collide (Pm)
        load_token_dataset(folder)


def test_foreign_vocabulary_and_bad_ids_are_refused(upstream, tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    for name in ("train.bin", "val.bin"):
        (folder / name).write_bytes((upstream["folder"] / name).read_bytes())
    tokens = list(TOKENS)
    tokens[5], tokens[7] = tokens[7], tokens[5]
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 371, "itos": dict(enumerate(tokens)),
                                                    "stoi": {t: i for i, t in enumerate(tokens)}}))
    with pytest.raises(InputError, match=r"id 5: file 'O' vs ours 'Cl'; id 7: file 'Cl' vs ours 'O'"):
        import_tokens(folder, tmp_path / "out")
    with pytest.raises(InputError, match="vocabulary differs"):
        load_token_dataset(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.pkl").write_bytes((upstream["folder"] / "meta.pkl").read_bytes())
    np.array([DATA_ID, 5, 371, 142, 142], dtype="<u2").tofile(bad / "train.bin")
    (bad / "val.bin").write_bytes(b"")
    with pytest.raises(InputError, match="token id 371"):
        load_token_dataset(bad)


def test_load_plain_upstream_folder_scans_starts_and_lists_missing_files(upstream, tmp_path):
    ds = load_token_dataset(upstream["folder"])  # no starts.pkl, no dataset.json: both computed
    assert ds.train_starts.tolist() == np.cumsum([0] + [c.size for c in upstream["train"][:-1]]).tolist()
    assert ds.train.dtype == np.uint16 and not ds.train.flags.writeable and len(ds.fingerprint) == 64
    assert ds.stats == {} and ds.meta["itos"][124] == "data_"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="missing train.bin, val.bin, meta.pkl"):
        load_token_dataset(empty)


# ---- CLI --------------------------------------------------------------------------------------------------------


def test_cli_build_inspect_and_import(mp20_csv, upstream, capsys):
    assert main(["data", "build", str(mp20_csv), "--out", "mp20", "--workers", "1", "--seed", "7"]) == 0
    out = get_settings().datasets_dir / "mp20"
    assert (out / "train.bin").exists() and "accepted 20" in capsys.readouterr().out
    assert main(["data", "inspect", "mp20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == 20
    assert main(["data", "import-tokens", str(upstream["archive"]), "--out", "up", "--n-train", "3",
                 "--n-val", "1"]) == 0
    assert load_token_dataset(get_settings().datasets_dir / "up").train_starts.size == 3
    assert main(["data", "build", "missing.csv", "--out", "x"]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_cli_build_rejects_one_bad_cif_among_several_but_refuses_a_lone_one(mp20_rows, tmp_path, capsys):
    for k in range(3):
        (tmp_path / f"good{k}.cif").write_text(mp20_rows.cif[k])
    (tmp_path / "empty.cif").write_text("")
    files = [str(tmp_path / f) for f in ("good0.cif", "good1.cif", "good2.cif", "empty.cif")]
    assert main(["data", "build", *files, "--out", "x", "--workers", "1"]) == 0
    assert "rejected 1" in capsys.readouterr().out
    (reject,) = _read_jsonl(get_settings().datasets_dir / "x" / "rejects.jsonl")
    assert reject["name"] == "empty.cif" and "no 'data_' block" in reject["reason"]
    assert main(["data", "build", str(tmp_path / "empty.cif"), "--out", "y"]) == 2
    assert "empty.cif has no 'data_' block" in capsys.readouterr().err
    assert not (get_settings().datasets_dir / "y").exists()


def test_translation_augmentation_adds_moved_copies_of_training_cifs_only(mp20_rows, tmp_path):
    src = tmp_path / "six.csv"
    mp20_rows.head(6).to_csv(src, index=False)
    plain = build_dataset([src], tmp_path / "plain", val_fraction=0.2, workers=1)
    aug = build_dataset([src], tmp_path / "aug", val_fraction=0.2, workers=1, augment_translations=2)
    build_dataset([src], tmp_path / "again", val_fraction=0.2, workers=1, augment_translations=2)

    rows = _read_jsonl(tmp_path / "aug" / "index.jsonl")
    copies = [r for r in rows if "augment" in r]
    originals = {r["name"]: r for r in rows if "augment" not in r}
    assert aug["augmented"] + aug["augment_failed"] == 2 * sum(r["split"] == "train" for r in originals.values())
    assert copies and all(r["split"] == "train" for r in copies)
    # validation is the same as without augmentation: same CIFs, same bytes
    assert (tmp_path / "aug" / "val.bin").read_bytes() == (tmp_path / "plain" / "val.bin").read_bytes()
    # seeded: a rebuild writes the same training tokens
    assert (tmp_path / "aug" / "train.bin").read_bytes() == (tmp_path / "again" / "train.bin").read_bytes()
    assert aug["train_cifs"] == plain["train_cifs"] + aug["augmented"]

    train = np.fromfile(tmp_path / "aug" / "train.bin", dtype="<u2")

    def text(row: dict) -> str:
        return decode(train[row["offset"]:row["offset"] + row["n_tokens"]])

    def header(t: str) -> list[str]:  # data_ line, cell lengths and angles, formula: what a translation keeps
        return [line for line in t.splitlines() if line.startswith(("data_", "_cell_length", "_cell_angle",
                                                                      "_chemical_formula_sum"))]

    moved = 0
    for copy in copies:
        original = text(originals[copy["name"]])
        assert header(text(copy)) == header(original)
        assert len(copy["augment"]["translation"]) == 3
        moved += text(copy) != original
    assert moved > 0  # low-symmetry MP-20 cells: a translation changes the coordinates written
    assert aug["augment_identical"] == len(copies) - moved


def test_translation_augmentation_refuses_a_count_out_of_range(mp20_csv, tmp_path):
    with pytest.raises(InputError, match="augment_translations=-1"):
        build_dataset([mp20_csv], tmp_path / "x", augment_translations=-1)
    assert main(["data", "build", str(mp20_csv), "--out", str(tmp_path / "y"), "--augment-translations", "101"]) == 2

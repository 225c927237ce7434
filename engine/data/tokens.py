"""Token folders: reading, writing, importing upstream token files, loading.

A dataset folder (``runs/data/<name>/`` by default) holds:

- ``train.bin`` / ``val.bin``: raw little-endian uint16 token ids, CIFs concatenated, each ending in its two
  newlines, no separator (what upstream CrystaLLM trains on).
- ``meta.pkl`` (upstream layout ``{"vocab_size", "itos": {int: str}, "stoi": {str: int}}``, space-group ids
  spelt bare in ``itos`` as upstream writes them) and ``meta.json`` (the same; JSON turns the ``itos`` keys into
  strings).
- ``starts.pkl`` / ``starts_val.pkl``: sorted offsets where each CIF's ``data_`` token begins.
- ``rejects.jsonl`` (``{"source", "name", "reason"}`` per input that could not be used: a CIF, or a whole
  source file that could not be read when several sources were given), ``duplicates.jsonl``
  (``{"source", "name", "kept_source", "kept_name", "key"}``), ``index.jsonl`` (built datasets: one record per
  CIF with split, offset, token count, source, name and CSV metadata), ``stats.json`` and ``dataset.json``
  (provenance and the data fingerprint).

A dataset is assembled in a hidden temporary sibling folder and renamed into place at the end, so a crash never
leaves a half-written folder that looks complete. Building from CIFs and the ``crystallab data`` command line
live in :mod:`engine.data.datasets`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engine import __version__
from engine.crystal.vocab import DATA_ID, ELEMENTS, NEWLINE_ID, SG_SUFFIX, STOI, TOKENS, UNK_ID, VOCAB_SIZE, meta_dict
from engine.data.sources import (
    READ_CHUNK,
    Progress,
    copy_stream,
    extract_token_archive,
    open_bin,
    read_meta,
)
from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_json, atomic_write_text, read_json
from engine.lab.safe_pickle import dump_pickle, load_pickle

BIN_FILES = ("train.bin", "val.bin")


# ----------------------------------------------------------------------------------------------------------------
# Reading token arrays: starts and statistics (shared by built, imported and loaded datasets)

_ELEMENT_INDEX = np.full(VOCAB_SIZE, -1, dtype=np.int16)
_ELEMENT_INDEX[[STOI[el] for el in ELEMENTS]] = np.arange(len(ELEMENTS))
_SG_TOKENS = [tok for tok in TOKENS if tok.endswith(SG_SUFFIX)]
_SG_INDEX = np.full(VOCAB_SIZE, -1, dtype=np.int16)
_SG_INDEX[[STOI[tok] for tok in _SG_TOKENS]] = np.arange(len(_SG_TOKENS))
_WINDOW = 1 << 23  # tokens examined at once when scanning token arrays (16 MiB of uint16)


def _chunks(ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, slice) windows over a possibly memory-mapped array, so it is never loaded whole."""
    for a in range(0, ids.size, _WINDOW):
        yield a, np.asarray(ids[a:a + _WINDOW])


def find_starts(ids: np.ndarray) -> np.ndarray:
    """Offsets (int64, ascending) of every ``data_`` token: where each CIF begins."""
    found = [np.flatnonzero(chunk == DATA_ID) + a for a, chunk in _chunks(ids)]
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def cif_lengths(ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Tokens per CIF: a CIF runs from its ``data_`` token to the next one (or the end of the array)."""
    return np.diff(np.append(starts, ids.size)).astype(np.int64)


def _header_and_sg_counts(ids: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per element: CIFs whose ``data_`` formula contains it; per space-group token: CIFs using it.

    Elements are read from the ``data_<formula>`` line only, so an untokenized H-M symbol such as ``P6``
    (spelled with the element token ``P``) is not counted as phosphorus.
    """
    el_counts = np.zeros(len(ELEMENTS), dtype=np.int64)
    sg_counts = np.zeros(len(_SG_TOKENS), dtype=np.int64)
    without_sg = 0
    i = 0
    while i < starts.size:
        j = max(i + 1, int(np.searchsorted(starts, starts[i] + _WINDOW, side="right")))
        lo, hi = int(starts[i]), int(starts[j]) if j < starts.size else ids.size
        seg = np.asarray(ids[lo:hi])
        rel = starts[i:j] - lo
        newlines = np.flatnonzero(seg == NEWLINE_ID)
        header_end = np.append(rel[1:], seg.size)  # a header never runs into the next CIF
        if newlines.size:
            k = np.searchsorted(newlines, rel)
            first_nl = np.where(k < newlines.size, newlines[np.minimum(k, newlines.size - 1)], seg.size)
            header_end = np.minimum(header_end, first_nl)
        depth = np.zeros(seg.size + 1, dtype=np.int32)
        np.add.at(depth, rel, 1)
        np.add.at(depth, header_end, -1)
        in_header = np.cumsum(depth[:-1], dtype=np.int32) > 0
        el = _ELEMENT_INDEX[seg]
        pos = np.flatnonzero(in_header & (el >= 0))
        cif = np.searchsorted(rel, pos, side="right") - 1
        pairs = np.unique(cif.astype(np.int64) * len(ELEMENTS) + el[pos])
        el_counts += np.bincount(pairs % len(ELEMENTS), minlength=len(ELEMENTS))
        sg = _SG_INDEX[seg]
        spos = np.flatnonzero(sg >= 0)
        scif, first = np.unique(np.searchsorted(rel, spos, side="right") - 1, return_index=True)
        sg_counts += np.bincount(sg[spos[first]], minlength=len(_SG_TOKENS))
        without_sg += (j - i) - scif.size
        i = j
    return el_counts, sg_counts, without_sg


def _histogram(lengths: np.ndarray, bins: int = 40) -> dict:
    """Integer-edged histogram of CIF lengths (tokens)."""
    lo, hi = int(lengths.min()), int(lengths.max())
    width = max(1, math.ceil((hi - lo + 1) / bins))
    edges = lo + width * np.arange(math.ceil((hi - lo + 1) / width) + 1)
    counts, _ = np.histogram(lengths, bins=edges)
    return {"bin_edges": edges.tolist(), "counts": counts.tolist()}


def token_stats(train: np.ndarray, train_starts: np.ndarray, val: np.ndarray, val_starts: np.ndarray) -> dict:
    """Statistics computed from token ids alone (no decoding), for ``stats.json``."""
    lengths = np.concatenate([cif_lengths(train, train_starts), cif_lengths(val, val_starts)])
    el = np.zeros(len(ELEMENTS), dtype=np.int64)
    sg = np.zeros(len(_SG_TOKENS), dtype=np.int64)
    without_sg = 0
    for ids, starts in ((train, train_starts), (val, val_starts)):
        e, s, w = _header_and_sg_counts(ids, starts)
        el, sg, without_sg = el + e, sg + s, without_sg + w
    per_cif = None
    if lengths.size:
        per_cif = {"min": int(lengths.min()), "median": float(np.median(lengths)),
                   "mean": round(float(lengths.mean()), 2), "max": int(lengths.max()),
                   "histogram": _histogram(lengths)}
    return {
        "train_cifs": int(train_starts.size), "val_cifs": int(val_starts.size),
        "train_tokens": int(train.size), "val_tokens": int(val.size),
        # Tokens before the first data_ belong to no CIF; non-zero means a truncated or foreign file.
        "leading_tokens": int((train_starts[0] if train_starts.size else train.size)
                              + (val_starts[0] if val_starts.size else val.size)),
        "tokens_per_cif": per_cif,
        "unk_tokens": int(sum(np.count_nonzero(c == UNK_ID) for ids in (train, val) for _, c in _chunks(ids))),
        "element_counts": {ELEMENTS[k]: int(c) for k in np.argsort(-el, kind="stable") if (c := el[k])},
        "spacegroup_counts": {_SG_TOKENS[k][:-len(SG_SUFFIX)]: int(c)
                              for k in np.argsort(-sg, kind="stable") if (c := sg[k])},
        "cifs_without_spacegroup_token": int(without_sg),
    }


# ----------------------------------------------------------------------------------------------------------------
# Output folder handling


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing non-empty folder, and never delete one that is not a dataset."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is a file; choose another output folder.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{out_dir} already exists and is not empty; choose another output folder or pass "
                         "overwrite=True (--overwrite) to replace it.")
    if not any((out_dir / f).exists() for f in ("dataset.json", "train.bin", "meta.pkl")):
        raise InputError(f"{out_dir} is not a dataset folder (no dataset.json / train.bin); refusing to delete "
                         "it. Choose an empty or new output folder.")


def new_tmp_dir(out_dir: Path) -> Path:
    """A hidden sibling of ``out_dir`` (same file system, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()  # unlike mkdtemp, honours the umask: the dataset ends up as readable as any other folder
    return tmp


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a finished temporary folder into place (replacing an old dataset only if allowed)."""
    check_out_dir(out_dir, overwrite)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def write_bin(path: Path, ids: np.ndarray) -> None:
    with open(path, "wb") as fh:
        fh.write(np.ascontiguousarray(ids, dtype="<u2").tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _write_meta(folder: Path) -> None:
    meta = meta_dict()
    dump_pickle(meta, folder / "meta.pkl")
    atomic_write_json(folder / "meta.json", meta)


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))


def data_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 hex of ``train.bin`` then ``val.bin``, each preceded by its name and byte length.

    The length prefix makes the hash change when CIFs move between splits, not only when tokens change.
    """
    import hashlib

    h = hashlib.sha256()
    for name in BIN_FILES:
        path = Path(folder) / name
        h.update(f"{name}:{path.stat().st_size}\n".encode())
        with open(path, "rb") as fh:
            while block := fh.read(READ_CHUNK):
                h.update(block)
    return h.hexdigest()


def finish(tmp: Path, out_dir: Path, overwrite: bool, stats: dict, provenance: dict,
            t0: float) -> dict:
    """Write starts, stats and dataset.json into ``tmp``, then publish it as ``out_dir``."""
    train, val = (open_bin(tmp / f) for f in BIN_FILES)
    starts, starts_val = find_starts(train), find_starts(val)
    dump_pickle([int(s) for s in starts], tmp / "starts.pkl")
    dump_pickle([int(s) for s in starts_val], tmp / "starts_val.pkl")
    _write_meta(tmp)
    stats = {**stats, **token_stats(train, starts, val, starts_val)}
    stats["build_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(tmp / "stats.json", stats)
    atomic_write_json(tmp / "dataset.json", {
        **provenance,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "crystallab_version": __version__,
        "fingerprint": data_fingerprint(tmp),
        "format": "crystallm-tokens-v1",
    })
    _publish(tmp, out_dir, overwrite)
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Importing CrystaLLM token files


def _copy_bins(src: Path, dst: Path, progress: Progress | None) -> None:
    """Copy train.bin and val.bin in chunks, reporting bytes copied."""
    total, done = sum((src / f).stat().st_size for f in BIN_FILES), 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    for f in BIN_FILES:
        with open(src / f, "rb") as fh:
            copy_stream(fh, dst / f, report)


def _check_ids(ids: np.ndarray, label: str) -> None:
    """Every id must index the vocabulary (checked window by window, so memory stays flat)."""
    top = max((int(c.max()) for _, c in _chunks(ids)), default=0)
    if top >= VOCAB_SIZE:
        raise InputError(f"{label} holds token id {top}, but the vocabulary has {VOCAB_SIZE} tokens (0-370): it was "
                         "made with another tokenizer or is not a token file.")


def _write_subset(src: Path, dst: Path, n: int | None, min_len: int, rng: np.random.Generator) -> dict:
    """Copy ``n`` randomly chosen whole CIFs of at least ``min_len`` tokens, keeping their original order."""
    ids = open_bin(src)
    starts = find_starts(ids)
    lengths = cif_lengths(ids, starts)
    eligible = np.flatnonzero(lengths >= min_len)
    if n is None:
        chosen = eligible
    elif n > eligible.size:
        raise InputError(f"asked for {n} CIFs from {src.name}, but it has only {eligible.size} of "
                         f"{starts.size} with at least {min_len} tokens; lower the count or --min-len.")
    else:
        chosen = np.sort(rng.choice(eligible, size=n, replace=False))
    with open(dst, "wb") as out:
        for a in range(0, chosen.size, 10_000):
            batch = chosen[a:a + 10_000]
            if batch.size:
                out.write(np.concatenate([ids[starts[c]:starts[c] + lengths[c]] for c in batch])
                          .astype("<u2").tobytes())
        out.flush()
        os.fsync(out.fileno())
    return {"available": int(starts.size), "eligible": int(eligible.size), "chosen": int(chosen.size)}


def import_tokens(archive_or_dir: str | os.PathLike, out_dir: str | os.PathLike, *, n_train: int | None = None,
                  n_val: int | None = None, min_len: int | None = None, seed: int = 1337,
                  overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Import CrystaLLM token files (``tokens_v1_train_val.tar.gz`` or a folder) as a dataset, whole or a subset.

    Args:
        archive_or_dir: a tar(.gz) with ``<name>/train.bin``, ``<name>/val.bin``, ``<name>/meta.pkl``, or a
            folder holding those files (``meta.json`` may replace ``meta.pkl``).
        out_dir: the dataset folder to create.
        n_train, n_val: take this many whole CIFs from ``train.bin`` / ``val.bin`` (None: all eligible ones).
            Giving any of ``n_train``, ``n_val``, ``min_len`` makes a subset; otherwise the bins are copied.
        min_len: drop CIFs shorter than this many tokens (subset only).
        seed: seeds the choice of CIFs.
        overwrite: replace an existing dataset in ``out_dir``.
        progress: ``progress(done, total)`` in bytes of the archive (or bins) read.

    Returns:
        The statistics written to ``stats.json`` (computed from the tokens, nothing decoded).

    Raises:
        InputError: missing files, a different vocabulary, token ids >= 371, or too few CIFs for the subset.
    """
    t0 = time.perf_counter()
    src = Path(archive_or_dir).expanduser().resolve()
    if not src.exists():
        raise InputError(f"{archive_or_dir} does not exist; give CrystaLLM's tokens_v1_train_val.tar.gz or a "
                         "folder with train.bin, val.bin and meta.pkl.")
    out_dir = Path(out_dir).expanduser().resolve()
    check_out_dir(out_dir, overwrite)
    for label, value, least in (("n_train", n_train, 1), ("n_val", n_val, 0), ("min_len", min_len, 0)):
        if value is not None and value < least:
            raise InputError(f"{label}={value} must be a whole number of at least {least}.")
    subset = any(v is not None for v in (n_train, n_val, min_len))
    tmp = new_tmp_dir(out_dir)
    try:
        staging = tmp / ".source" if subset else tmp
        if src.is_dir():
            missing = [f for f in BIN_FILES if not (src / f).is_file()]
            if not (src / "meta.pkl").is_file() and not (src / "meta.json").is_file():
                missing.append("meta.pkl")
            if missing:
                raise InputError(f"{src} lacks {', '.join(missing)}; give a folder with train.bin, val.bin "
                                 "and meta.pkl, or the tokens_v1_train_val.tar.gz archive.")
            read_meta(src)
            if subset:
                staging = src  # read in place through a memory map: nothing to copy
            else:
                _copy_bins(src, tmp, progress)
        else:
            extract_token_archive(src, staging, progress)
        for f in BIN_FILES:
            _check_ids(open_bin(staging / f), f"{src}/{f}" if src.is_dir() else f"{src}:{f}")
        stats: dict[str, Any] = {"kind": "imported", "subset": None}
        if subset:
            rng = np.random.default_rng(seed)
            stats["subset"] = {split: _write_subset(staging / f"{split}.bin", tmp / f"{split}.bin", n,
                                                    min_len or 0, rng)
                               for split, n in (("train", n_train), ("val", n_val))}
            if staging != src:
                shutil.rmtree(staging)
        write_jsonl(tmp / "rejects.jsonl", [])
        provenance = {"sources": [str(src)], "options": {
            "n_train": n_train, "n_val": n_val, "min_len": min_len, "seed": seed}}
        return finish(tmp, out_dir, overwrite, stats, provenance, t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Loading datasets


@dataclass
class TokenDataset:
    """A dataset folder opened for training or evaluation (token arrays are read-only memory maps)."""

    path: Path
    train: np.ndarray
    """uint16 token ids of the training split."""
    val: np.ndarray
    """uint16 token ids of the validation split (may be empty)."""
    train_starts: np.ndarray
    """int64 offsets in ``train`` where each CIF's ``data_`` token sits."""
    val_starts: np.ndarray
    meta: dict
    """The vocabulary in upstream ``meta.pkl`` layout (int keys in ``itos``)."""
    stats: dict
    fingerprint: str
    """Identifies the token data exactly (checkpoints record it)."""


def _load_starts(path: Path, ids: np.ndarray) -> np.ndarray:
    """Read a starts pickle and check it really points at ``data_`` tokens; scan when absent."""
    if not path.exists():
        return find_starts(ids)
    raw = load_pickle(path)
    if not isinstance(raw, list) or not all(isinstance(s, int) for s in raw):
        raise InputError(f"{path} must hold a list of integer offsets; delete it to have starts recomputed.")
    starts = np.asarray(raw, dtype=np.int64)
    if starts.size and (np.any(np.diff(starts) <= 0) or starts[0] < 0 or starts[-1] >= ids.size
                        or np.any(np.asarray(ids[starts]) != DATA_ID)):
        raise InputError(f"{path} does not match its token file (offsets unsorted, out of range or not at a "
                         "'data_' token); delete it to have starts recomputed.")
    return starts


def load_token_dataset(folder: str | os.PathLike) -> TokenDataset:
    """Open and validate a dataset folder (built, imported, or a plain upstream train/val/meta folder).

    Raises:
        InputError: files are missing, the vocabulary differs, ids exceed the vocabulary, or starts are wrong.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise InputError(f"{path} is not a dataset folder; create one with `crystallab data build` or "
                         "`crystallab data import-tokens`.")
    missing = [f for f in BIN_FILES if not (path / f).is_file()]
    if not (path / "meta.pkl").is_file() and not (path / "meta.json").is_file():
        missing.append("meta.pkl (or meta.json)")
    if missing:
        raise InputError(f"{path} is missing {', '.join(missing)}; rebuild it with `crystallab data build` or "
                         "`crystallab data import-tokens`.")
    meta = read_meta(path)
    train, val = (open_bin(path / f) for f in BIN_FILES)
    for ids, f in ((train, "train.bin"), (val, "val.bin")):
        _check_ids(ids, str(path / f))
    if train.size == 0:
        raise InputError(f"{path / 'train.bin'} is empty: there is nothing to train on.")
    provenance = read_json(path / "dataset.json", {}) or {}
    return TokenDataset(
        path=path, train=train, val=val,
        train_starts=_load_starts(path / "starts.pkl", train),
        val_starts=_load_starts(path / "starts_val.pkl", val),
        meta=meta, stats=read_json(path / "stats.json", {}) or {},
        fingerprint=provenance.get("fingerprint") or data_fingerprint(path),
    )


def iter_cifs(dataset: TokenDataset, split: str = "train") -> Iterator[str]:
    """Decode each CIF of a split back to text (model view, ending in its two newlines)."""
    from engine.crystal.tokenizer import decode

    if split not in ("train", "val"):
        raise InputError(f"split {split!r} must be 'train' or 'val'.")
    ids, starts = (dataset.train, dataset.train_starts) if split == "train" else (dataset.val, dataset.val_starts)
    for a, n in zip(starts, cif_lengths(ids, starts)):
        yield decode(np.asarray(ids[a:a + n]).tolist())

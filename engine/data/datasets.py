"""Token datasets in CrystaLLM's file format: build from CIFs, import published token files, load for training.

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
leaves a half-written folder that looks complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from engine import __version__
from engine.crystal.vocab import DATA_ID, ELEMENTS, NEWLINE_ID, SG_SUFFIX, STOI, TOKENS, UNK_ID, VOCAB_SIZE, meta_dict
from engine.data.sources import (
    DEFAULT_LIMITS,
    READ_CHUNK,
    SOURCE_KINDS_HELP,
    Allowed,
    Progress,
    ReadLimits,
    SourceItem,
    check_source,
    copy_stream,
    describe_source,
    extract_token_archive,
    open_bin,
    read_meta,
    scan_source,
)
from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_json, atomic_write_text, read_json, writable_problem
from engine.lab.safe_pickle import dump_pickle, load_pickle
from engine.lab.settings import get_settings

BIN_FILES = ("train.bin", "val.bin")
MAX_SKIPPED_LISTED = 100
"""``stats.json`` names at most this many skipped non-CIF files (``skipped`` counts them all)."""


# ----------------------------------------------------------------------------------------------------------------
# Canonicalization in worker processes


class _Canonical(NamedTuple):
    """What a worker sends back for one accepted input (a rejected one comes back as its reason, a str)."""

    ids: bytes
    """Token ids of the model view, little-endian uint16."""
    dropped: str
    """Characters the tokenizer could not place (upstream drops them silently)."""
    key: tuple[str, str]
    """Deduplication key: (cell composition as in ``data_``, H-M space-group symbol)."""
    vpfu: float
    """Cell volume per formula unit, A^3."""


_DATA_LINE = re.compile(r"^data_(\S+)", re.MULTILINE)
_SG_LINE = re.compile(r"^_symmetry_space_group_name_H-M (.+)$", re.MULTILINE)
_VOLUME_LINE = re.compile(r"^_cell_volume (\S+)$", re.MULTILINE)
_Z_LINE = re.compile(r"^_cell_formula_units_Z (\S+)$", re.MULTILINE)


def _canonicalize_one(text: str | None, structure: Any, symmetrized: bool, max_sites: int) -> _Canonical:
    from engine.crystal.canonical import canonicalize, canonicalize_structure, model_view
    from engine.crystal.tokenizer import encode_with_report

    view = model_view(canonicalize_structure(structure, max_sites) if structure is not None
                      else canonicalize(text, symmetrized=symmetrized, max_sites=max_sites))
    ids, dropped = encode_with_report(view)
    formula, sg, volume, z = (rx.search(view) for rx in (_DATA_LINE, _SG_LINE, _VOLUME_LINE, _Z_LINE))
    if not (formula and sg and volume and z):
        raise InputError("the canonical CIF lacks a data_, space-group, volume or Z line")
    # Upstream's deduplication treats Z = 0 as 1; canonicalize() already rejects Z = 0.
    vpfu = float(volume.group(1)) / max(float(z.group(1)), 1.0)
    return _Canonical(np.asarray(ids, dtype="<u2").tobytes(), "".join(dropped),
                      (formula.group(1), sg.group(1).strip().strip("'")), vpfu)


def _canonicalize_task(text: str | None, structure: Any, symmetrized: bool, max_sites: int) -> _Canonical | str:
    """Canonicalize and tokenize one input (in a pool worker); a failure comes back as its reason."""
    from engine.lab.errors import CrystallabError

    # spglib's C code prints "spglib: ... failed." lines on stderr for cells it retries; they garble the progress
    # bar and say nothing the rejects do not. The variable is read at each call, so restoring it is enough.
    previous = os.environ.get("SPGLIB_WARNING")
    os.environ["SPGLIB_WARNING"] = "OFF"
    try:
        return _canonicalize_one(text, structure, symmetrized, max_sites)
    except CrystallabError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one odd CIF must not sink a 100k-CIF build; it is reported
        return f"unexpected {type(exc).__name__} while canonicalizing: {exc}"
    finally:
        if previous is None:
            os.environ.pop("SPGLIB_WARNING", None)
        else:
            os.environ["SPGLIB_WARNING"] = previous


def _pool_problem(reason: str, detail: str) -> str:
    """The reject reason of an input whose worker ran out of time or died."""
    hint = ("; raise --timeout, or leave this CIF out" if reason == "timeout"
            else " (out of memory, or a crash in compiled code)")
    return f"{reason}: {detail}{hint}"


def _run_workers(payloads: list[tuple], workers: int | None, symmetrized: bool, progress: Progress | None,
                 timeout_s: float | None, max_sites: int) -> list[_Canonical | str]:
    """Process all payloads, each in a killable worker with a time box; results come back in input order."""
    from engine.crystal.canonical import warm_up
    from engine.lab.pool import run_pool

    n = len(payloads)
    workers = max(1, min(workers or os.cpu_count() or 1, n or 1))
    if progress:
        progress(0, n)
    tasks = [(i, text, structure, symmetrized, max_sites) for i, (text, structure) in enumerate(payloads)]
    return run_pool(_canonicalize_task, tasks, workers, timeout_s, progress, problem=_pool_problem, warm_up=warm_up)


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


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
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


def _new_tmp_dir(out_dir: Path) -> Path:
    """A hidden sibling of ``out_dir`` (same file system, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()  # unlike mkdtemp, honours the umask: the dataset ends up as readable as any other folder
    return tmp


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a finished temporary folder into place (replacing an old dataset only if allowed)."""
    _check_out_dir(out_dir, overwrite)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def _write_bin(path: Path, ids: np.ndarray) -> None:
    with open(path, "wb") as fh:
        fh.write(np.ascontiguousarray(ids, dtype="<u2").tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _write_meta(folder: Path) -> None:
    meta = meta_dict()
    dump_pickle(meta, folder / "meta.pkl")
    atomic_write_json(folder / "meta.json", meta)


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
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


def _finish(tmp: Path, out_dir: Path, overwrite: bool, stats: dict, provenance: dict,
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
# Building from CIFs


VAL_FRACTION_KNOB = "the validation fraction (--val-fraction; the Data page's Validation share)"
"""How messages name ``val_fraction``: the same words serve the CLI and the dashboard."""


def _split_counts(n: int, val_fraction: float, sources: Sequence[str | os.PathLike], rejects: list[dict],
                  n_duplicates: int) -> int:
    """Number of validation CIFs out of ``n`` accepted ones.

    Raises:
        InputError: fewer than 2 CIFs for a split; names the sources, the rejected inputs (count and first
            reasons), the duplicates removed and the setting to change.
    """
    if val_fraction == 0:
        return 0
    if n < 2:
        names = ", ".join(str(src) for src in sources[:3]) + (" ..." if len(sources) > 3 else "")
        first = "; ".join(f"{r['name']}: {r['reason']}" for r in rejects[:2])
        why = [f"{len(rejects)} input(s) rejected" + (f" ({first})" if first else "")]
        if n_duplicates:
            why.append(f"{n_duplicates} duplicate(s) removed")
        raise InputError(
            f"only {n} CIF remains from {names} ({', '.join(why)}): too few for a train/validation split; add "
            f"more CIFs, or set {VAL_FRACTION_KNOB} to 0 for a train-only dataset"
        )
    return min(n - 1, max(1, round(n * val_fraction)))


def build_dataset(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  val_fraction: float = 0.1, seed: int = 1337, dedup: bool = True, workers: int | None = None,
                  symmetrized: bool = False, overwrite: bool = False, progress: Progress | None = None,
                  timeout_s: float | None = 60.0, max_sites: int | None = 500, confine: bool = False,
                  limits: ReadLimits = DEFAULT_LIMITS) -> dict:
    """Canonicalize, deduplicate, tokenize and split CIFs into a CrystaLLM token dataset.

    Args:
        sources: each one of: a folder of ``.cif`` files (searched recursively), a ``.zip`` / ``.tar.gz`` /
            ``.tgz`` / ``.tar`` of CIFs, a CSV with a ``cif`` column (other columns are kept in ``index.jsonl``;
            ``material_id`` names the row), a ``.cif`` file (every ``data_`` block is one input), or
            ``builtin`` / ``builtin:N`` / ``builtin:N:SEED`` (the generated corpus).
        out_dir: the dataset folder to create.
        val_fraction: share of CIFs (after deduplication) held out for validation; 0 makes ``val.bin`` empty.
        seed: seeds the shuffle before the split; the same inputs and seed give byte-identical files.
        dedup: keep, per (cell composition, space group), only the CIF with the lowest volume per formula unit
            (CrystaLLM's rule; ties keep the first input).
        workers: worker processes for canonicalization (default: all CPU cores).
        symmetrized: passed to `engine.crystal.canonical.canonicalize`.
        overwrite: replace an existing dataset in ``out_dir``.
        progress: called as ``progress(done, total)`` with counts of inputs processed.
        timeout_s: time box for canonicalizing one input, in seconds (None: none); an input over it is killed
            and rejected as ``timeout`` (default `engine.crystal.canonical.TIMEOUT_S`).
        max_sites: inputs with more sites are rejected as ``too_many_sites`` before symmetrizing (None: no
            limit; default `engine.crystal.canonical.MAX_SITES`).
        confine: read only what lies inside the runs root and ``CRYSTALLAB_DATA_DIRS`` (the dashboard's rule):
            each source must, and a file found inside a folder source whose real path (symlinks resolved) does not
            is skipped with its reason.
        limits: size and compression-ratio bounds on reading sources (`engine.data.sources.ReadLimits`).

    A CIF that cannot be used becomes a line of ``rejects.jsonl`` with its reason. So does a whole source file
    that cannot be read (a binary ``.cif``, a CSV without a ``cif`` column, a corrupt zip) when several sources
    are given: the build goes on with the others. Files inside a folder or archive that are not read (not CIFs,
    links inside an archive, symlinks leading outside the allowed folders) are skipped and counted in
    ``stats.json`` (``skipped``, ``skipped_files`` with each one's reason). Files that are not UTF-8 are read
    as Latin-1 and named in ``latin1_files``.

    Returns:
        The statistics also written to ``stats.json``.

    Raises:
        InputError: a source does not exist (checked before anything is read); the only source, or every
            source, cannot be read; ``out_dir`` is taken; or too few CIFs survive for the split.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir, overwrite)
    problem = writable_problem(out_dir.parent)
    if problem is not None:  # before any CIF is read: a build can take hours
        raise InputError(f"the dataset folder {out_dir} cannot be created: {problem}; choose another output folder")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"{VAL_FRACTION_KNOB} is {val_fraction}: it must be at least 0 and below 1 (e.g. 0.1)")
    if not sources:
        raise InputError(f"no dataset sources given; give {SOURCE_KINDS_HELP}.")
    if timeout_s is not None and not timeout_s > 0:
        raise InputError(f"timeout_s={timeout_s} must be a positive number of seconds (--timeout).")
    if max_sites is not None and max_sites < 1:
        raise InputError(f"max_sites={max_sites} must be a whole number of at least 1 (--max-sites).")
    for s in sources:  # a mistyped path fails at once, not after the other sources were read
        check_source(s)
        if confine and Path(str(s)).expanduser().exists():
            get_settings().resolve_user_path(s)
    allowed = get_settings().is_allowed if confine else None
    items, rejects, skipped, latin1 = _read_sources(sources, allowed, limits)
    unreadable = len(rejects)  # whole sources; the loop below adds the rejected CIFs
    todo = [i for i, item in enumerate(items) if item.error is None]
    results = _run_workers([(items[i].text, items[i].structure) for i in todo], workers, symmetrized, progress,
                           timeout_s, max_sites)

    outcome = dict(zip(todo, results))
    accepted: list[tuple[int, _Canonical]] = []  # (item index, result), in input order
    dropped_chars: Counter[str] = Counter()
    for i, item in enumerate(items):
        res = item.error or outcome[i]
        if isinstance(res, str):
            rejects.append({"source": item.source, "name": item.name, "reason": res})
        else:
            accepted.append((i, res))
            dropped_chars.update(res.dropped)

    kept, duplicates = _deduplicate(accepted, items) if dedup else (accepted, [])
    if not kept:
        first = "; ".join(f"{r['name']}: {r['reason']}" for r in rejects[:3])
        names = ", ".join(str(src) for src in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise InputError(f"none of the {len(items) + unreadable} inputs from {names} could be used ({first}); fix "
                         "the inputs listed")
    n_val = _split_counts(len(kept), val_fraction, sources, rejects, len(duplicates))
    order = np.random.default_rng(seed).permutation(len(kept))
    splits = {"val": [kept[k] for k in order[:n_val]], "train": [kept[k] for k in order[n_val:]]}

    tmp = _new_tmp_dir(out_dir)
    try:
        index = []
        for split, entries in splits.items():
            offset = 0
            parts = []
            for i, res in entries:
                ids = np.frombuffer(res.ids, dtype="<u2")
                parts.append(ids)
                index.append({"split": split, "offset": offset, "n_tokens": int(ids.size),
                              "source": items[i].source, "name": items[i].name, "meta": items[i].meta})
                offset += ids.size
            _write_bin(tmp / f"{split}.bin", np.concatenate(parts) if parts else np.zeros(0, "<u2"))
        _write_jsonl(tmp / "rejects.jsonl", rejects)
        _write_jsonl(tmp / "duplicates.jsonl", duplicates)
        _write_jsonl(tmp / "index.jsonl", index)
        stats = {
            "kind": "built",
            "inputs": len(items) + unreadable,
            "accepted": len(accepted),
            "rejected": len(rejects),
            "unreadable_sources": unreadable,
            "skipped": len(skipped),
            "skipped_files": skipped[:MAX_SKIPPED_LISTED],
            "latin1": len(latin1),
            "latin1_files": latin1[:MAX_SKIPPED_LISTED],
            "duplicates_removed": len(duplicates),
            "dropped_chars": sum(dropped_chars.values()),
            "dropped_char_counts": dict(dropped_chars.most_common()),
        }
        provenance = {"sources": [describe_source(s) for s in sources], "options": {
            "val_fraction": val_fraction, "seed": seed, "dedup": dedup, "symmetrized": symmetrized,
            "timeout_s": timeout_s, "max_sites": max_sites}}
        return _finish(tmp, out_dir, overwrite, stats, provenance, t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_sources(sources: Sequence[str | os.PathLike], allowed: Allowed | None, limits: ReadLimits,
                  ) -> tuple[list[SourceItem], list[dict], list[dict], list[dict]]:
    """Read every source: ``(items, rejects, skipped, latin1)``.

    A source that cannot be read becomes a reject ``{"source", "name", "reason"}`` (its items are missing) as
    long as another source can be read; with a single source, or when none can be read, the error is raised.
    ``skipped`` holds ``{"source", "name", "reason"}`` per file of a folder or archive that was not read;
    ``latin1`` holds ``{"source", "name", "line"}`` per file read as Latin-1 (``line``: the first not in UTF-8).
    """
    items: list[SourceItem] = []
    rejects: list[dict] = []
    skipped: list[dict] = []
    latin1: list[dict] = []
    errors: list[InputError] = []
    for s in sources:
        try:
            scan = scan_source(s, allowed=allowed, limits=limits)
        except InputError as exc:
            if len(sources) == 1:
                raise
            errors.append(exc)
            rejects.append({"source": str(s), "name": Path(str(s)).name, "reason": str(exc)})
            continue
        items += scan.items
        skipped += [{"source": str(s), "name": name, "reason": reason} for name, reason in scan.skipped]
        latin1 += [{"source": str(s), "name": name, "line": line} for name, line in scan.latin1]
    if errors and len(errors) == len(sources):
        shown = " | ".join(str(e) for e in errors[:3]) + (f" | ... ({len(errors) - 3} more)" if len(errors) > 3
                                                           else "")
        raise InputError(f"none of the {len(sources)} sources could be read: {shown}")
    return items, rejects, skipped, latin1


def _deduplicate(accepted: list[tuple[int, _Canonical]],
                 items: list[SourceItem]) -> tuple[list[tuple[int, _Canonical]], list[dict]]:
    """CrystaLLM's rule: per (cell composition, space group) keep the lowest volume per formula unit.

    Ties keep the earliest input. Returns the kept entries (input order) and one record per removed CIF.
    """
    best: dict[tuple[str, str], int] = {}  # key -> position in `accepted`
    for pos, (_, res) in enumerate(accepted):
        if res.key not in best or res.vpfu < accepted[best[res.key]][1].vpfu:
            best[res.key] = pos
    winners = set(best.values())
    kept = [entry for pos, entry in enumerate(accepted) if pos in winners]
    duplicates = []
    for pos, (i, res) in enumerate(accepted):
        if pos not in winners:
            winner = items[accepted[best[res.key]][0]]
            duplicates.append({"source": items[i].source, "name": items[i].name, "kept_source": winner.source,
                               "kept_name": winner.name, "key": list(res.key)})
    return kept, duplicates


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
    _check_out_dir(out_dir, overwrite)
    for label, value, least in (("n_train", n_train, 1), ("n_val", n_val, 0), ("min_len", min_len, 0)):
        if value is not None and value < least:
            raise InputError(f"{label}={value} must be a whole number of at least {least}.")
    subset = any(v is not None for v in (n_train, n_val, min_len))
    tmp = _new_tmp_dir(out_dir)
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
        _write_jsonl(tmp / "rejects.jsonl", [])
        provenance = {"sources": [str(src)], "options": {
            "n_train": n_train, "n_val": n_val, "min_len": min_len, "seed": seed}}
        return _finish(tmp, out_dir, overwrite, stats, provenance, t0)
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


# ----------------------------------------------------------------------------------------------------------------
# Command line: crystallab data build | import-tokens | corpus | inspect

_OUT_HELP = ("dataset folder to create. A bare name (no '/', e.g. 'mp20') goes under the runs folder as "
             "<runs>/data/NAME, where the dashboard and `crystallab train` find it; anything with a '/' "
             "('./x', '/tmp/x') is a path, relative to the current folder")


def resolve_dataset_dir(arg: str | os.PathLike) -> Path:
    """CLI rule for dataset folders: a bare name means ``<runs>/data/NAME``; anything else is a path."""
    text = str(arg)
    if text and "/" not in text and os.sep not in text and text not in (".", "..") and not text.startswith("~"):
        return get_settings().datasets_dir / text
    return Path(text).expanduser().resolve()


class _Bar:
    """A tqdm bar on stderr driven by ``progress(done, total)`` callbacks; created on the first call."""

    def __init__(self, desc: str, **kwargs: Any) -> None:
        self.desc, self.kwargs, self.bar = desc, kwargs, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, file=sys.stderr, dynamic_ncols=True, **self.kwargs)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(folder: Path, stats: dict) -> None:
    per = stats.get("tokens_per_cif") or {}
    print(f"dataset: {folder}")
    if stats.get("kind") == "built":
        print(f"  inputs {stats['inputs']}  accepted {stats['accepted']}  rejected {stats['rejected']}"
              f"  duplicates removed {stats['duplicates_removed']}")
        if stats.get("unreadable_sources"):
            print(f"  {stats['unreadable_sources']} source file(s) could not be read at all (listed as rejects)")
        if stats["rejected"]:
            print(f"  reasons for each reject: {folder / 'rejects.jsonl'}")
        if stats.get("skipped"):
            names = ", ".join(f"{f['name']} ({f.get('reason', 'not a .cif file')})"
                              for f in stats.get("skipped_files", [])[:5])
            more = ", ..." if stats["skipped"] > 5 else ""
            print(f"  skipped {stats['skipped']} file(s) that were not read: {names}{more}")
        if stats.get("latin1"):
            names = ", ".join(f"{f['name']} (line {f['line']})" for f in stats.get("latin1_files", [])[:5])
            more = ", ..." if stats["latin1"] > 5 else ""
            print(f"  warning: {stats['latin1']} file(s) are not UTF-8 and were read as Latin-1: {names}{more}; "
                  "convert them to UTF-8 (iconv -f LATIN1 -t UTF-8) if their text is in another encoding")
    print(f"  train {stats.get('train_cifs')} CIFs / {stats.get('train_tokens')} tokens;"
          f"  val {stats.get('val_cifs')} CIFs / {stats.get('val_tokens')} tokens")
    if per:
        print(f"  tokens per CIF: min {per['min']}  median {per['median']:g}  max {per['max']}")
    print(f"  unknown tokens {stats.get('unk_tokens', 0)}  dropped characters {stats.get('dropped_chars', 0)}")
    def top(counts: dict, k: int) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:k])

    top_sg, top_el = top(stats.get("spacegroup_counts", {}), 5), top(stats.get("element_counts", {}), 8)
    print(f"  top space groups: {top_sg}\n  top elements: {top_el}")
    if "build_seconds" in stats:
        print(f"  took {stats['build_seconds']:.1f} s")


def _build_with_bar(out_arg: str, sources: list[str], **options: Any) -> int:
    out, bar = resolve_dataset_dir(out_arg), _Bar("canonicalizing", unit="cif")
    try:
        stats = build_dataset(sources, out, progress=bar, **options)
    finally:
        bar.close()
    _print_summary(out, stats)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    for flag, value in (("--max-file-mb", args.max_file_mb), ("--max-source-mb", args.max_source_mb)):
        if value <= 0:
            raise InputError(f"{flag} {value:g}: give a positive number of megabytes")
    limits = ReadLimits(file_bytes=int(args.max_file_mb * 2**20), source_bytes=int(args.max_source_mb * 2**20))
    return _build_with_bar(args.out, args.sources, val_fraction=args.val_fraction, seed=args.seed,
                           dedup=not args.no_dedup, workers=args.workers, symmetrized=args.symmetrized,
                           overwrite=args.overwrite, timeout_s=args.timeout, max_sites=args.max_sites,
                           confine=args.confine, limits=limits)


def _cmd_corpus(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InputError(f"--n {args.n}: the corpus needs at least 1 structure (default 5000)")
    # --seed picks the generated structures; the train/val split keeps build's default seed.
    return _build_with_bar(args.out, [f"builtin:{args.n}:{args.seed}"], val_fraction=args.val_fraction,
                           workers=args.workers, overwrite=args.overwrite)


def _cmd_import(args: argparse.Namespace) -> int:
    out, bar = resolve_dataset_dir(args.out), _Bar("importing", unit="B", unit_scale=True)
    try:
        stats = import_tokens(args.source, out, n_train=args.n_train, n_val=args.n_val, min_len=args.min_len,
                              seed=args.seed, overwrite=args.overwrite, progress=bar)
    finally:
        bar.close()
    _print_summary(out, stats)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    ds = load_token_dataset(resolve_dataset_dir(args.dir))
    stats = ds.stats or token_stats(ds.train, ds.train_starts, ds.val, ds.val_starts)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        _print_summary(ds.path, stats)
        print(f"  fingerprint {ds.fingerprint}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab data ...``."""
    data = subparsers.add_parser("data", help="build, import and inspect token datasets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="canonicalize + tokenize CIFs into train/val token files",
                       description=f"SOURCE is {SOURCE_KINDS_HELP}. Rejected inputs are listed with reasons in "
                                   "rejects.jsonl.")
    b.add_argument("sources", nargs="+", metavar="SOURCE")
    b.add_argument("--out", required=True, help=_OUT_HELP)
    b.add_argument("--val-fraction", type=float, default=0.1, help="share of CIFs for validation (default 0.1)")
    b.add_argument("--seed", type=int, default=1337, help="seed of the train/val shuffle (default 1337)")
    b.add_argument("--no-dedup", action="store_true",
                   help="keep every CIF (default: per cell composition + space group keep the lowest volume "
                        "per formula unit, as CrystaLLM does)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPU cores)")
    b.add_argument("--symmetrized", action="store_true",
                   help="inputs are already CifWriter(symprec=0.1) output: apply the CrystaLLM edits without "
                        "re-symmetrizing")
    b.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    b.add_argument("--timeout", type=float, default=60.0,
                   help="seconds canonicalizing one CIF may take; it is then stopped and rejected (default 60)")
    b.add_argument("--max-sites", type=int, default=500,
                   help="reject CIFs with more sites than this before symmetrizing (default 500)")
    b.add_argument("--max-file-mb", type=float, default=DEFAULT_LIMITS.file_bytes / 2**20,
                   help="largest file in a folder or archive, decompressed (default %(default)g MB)")
    b.add_argument("--max-source-mb", type=float, default=DEFAULT_LIMITS.source_bytes / 2**20,
                   help="most an archive may decompress to, or a CSV / CIF file may hold (default %(default)g MB)")
    b.add_argument("--confine", action="store_true",
                   help="read only inside the runs folder and CRYSTALLAB_DATA_DIRS, following no symlink out of "
                        "them (what dashboard builds do)")
    b.set_defaults(func=_cmd_build)

    c = sub.add_parser("corpus", help="build a dataset from the built-in generated corpus")
    c.add_argument("--out", default="builtin", help=_OUT_HELP + " (default: builtin)")
    c.add_argument("--n", type=int, default=5000, help="number of generated structures (default 5000)")
    c.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default 0)")
    c.add_argument("--val-fraction", type=float, default=0.1)
    c.add_argument("--workers", type=int, default=None)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_corpus)

    i = sub.add_parser("import-tokens", help="import CrystaLLM token files (tokens_v1_train_val.tar.gz or a folder)")
    i.add_argument("source", metavar="ARCHIVE_OR_DIR")
    i.add_argument("--out", required=True, help=_OUT_HELP)
    i.add_argument("--n-train", type=int, default=None, help="take this many whole CIFs from train.bin")
    i.add_argument("--n-val", type=int, default=None, help="take this many whole CIFs from val.bin")
    i.add_argument("--min-len", type=int, default=None, help="drop CIFs shorter than this many tokens")
    i.add_argument("--seed", type=int, default=1337, help="seed of the subset choice (default 1337)")
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(func=_cmd_import)

    n = sub.add_parser("inspect", help="print a dataset's statistics")
    n.add_argument("dir", metavar="DIR", help="dataset folder (a bare name means <runs>/data/NAME)")
    n.add_argument("--json", action="store_true", help="print stats.json as JSON")
    n.set_defaults(func=_cmd_inspect)

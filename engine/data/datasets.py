"""Token datasets built from CIFs: canonicalization in worker processes, building, and ``crystallab data``.

The dataset folder layout, and reading, writing, importing and loading token folders, live in
:mod:`engine.data.tokens`; this module turns CIF sources into such a folder (``build_dataset``) and registers the
``crystallab data build | import-tokens | corpus | inspect`` commands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from engine.data.sources import (
    DEFAULT_LIMITS,
    SOURCE_KINDS_HELP,
    Allowed,
    Progress,
    ReadLimits,
    SourceItem,
    check_source,
    describe_source,
    scan_source,
)
from engine.data.tokens import (
    check_out_dir,
    finish,
    import_tokens,
    load_token_dataset,
    new_tmp_dir,
    token_stats,
    write_bin,
    write_jsonl,
)
from engine.lab.errors import InputError
from engine.lab.fsutil import writable_problem
from engine.lab.settings import get_settings

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


def _canonicalize_one(text: str | None, structure: Any, symmetrized: bool, max_sites: int,
                      shift: tuple[float, float, float] | None = None) -> _Canonical:
    from engine.crystal.canonical import _parse, canonicalize, canonicalize_structure, model_view, translated
    from engine.crystal.tokenizer import encode_with_report

    if shift is not None:  # a translation-augmented copy: symmetrize the moved structure afresh
        structure = translated(structure if structure is not None else _parse(text or ""), shift)
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


def _canonicalize_task(text: str | None, structure: Any, symmetrized: bool, max_sites: int,
                       shift: tuple[float, float, float] | None = None) -> _Canonical | str:
    """Canonicalize and tokenize one input (in a pool worker); a failure comes back as its reason."""
    from engine.lab.errors import CrystallabError

    # spglib's C code prints "spglib: ... failed." lines on stderr for cells it retries; they garble the progress
    # bar and say nothing the rejects do not. The variable is read at each call, so restoring it is enough.
    previous = os.environ.get("SPGLIB_WARNING")
    os.environ["SPGLIB_WARNING"] = "OFF"
    try:
        return _canonicalize_one(text, structure, symmetrized, max_sites, shift)
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
                 timeout_s: float | None, max_sites: int | None) -> list[_Canonical | str]:
    """Process all payloads ``(text, structure[, shift])``, each in a killable worker with a time box; results come
    back in input order."""
    from engine.crystal.canonical import warm_up
    from engine.lab.pool import run_pool

    n = len(payloads)
    workers = max(1, min(workers or os.cpu_count() or 1, n or 1))
    if progress:
        progress(0, n)
    tasks = [(i, p[0], p[1], symmetrized, max_sites, p[2] if len(p) > 2 else None) for i, p in enumerate(payloads)]
    return run_pool(_canonicalize_task, tasks, workers, timeout_s, progress, problem=_pool_problem, warm_up=warm_up)


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
                  limits: ReadLimits = DEFAULT_LIMITS, augment_translations: int = 0) -> dict:
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
        augment_translations: add this many copies of every *training* CIF, each the canonical CIF of the
            structure with all atoms moved by one random fractional translation (seeded by ``seed``), after the
            split and deduplication. The validation split is never augmented. This is Gruver et al.'s translation
            augmentation for CrystaLLM's format, done once at build time since token files are fixed: the
            crystal is the same, its text (coordinates, sometimes the symmetry operations found) differs. A copy
            that fails to canonicalize is left out and counted in ``augment_failed``.

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
    check_out_dir(out_dir, overwrite)
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
    if not (isinstance(augment_translations, int) and 0 <= augment_translations <= MAX_AUGMENT):
        raise InputError(f"augment_translations={augment_translations}: give a whole number of translated copies "
                         f"per training CIF from 0 to {MAX_AUGMENT} (--augment-translations)")
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
    augmented, augment_failed, augment_identical = _augment(splits["train"], items, augment_translations, seed,
                                                            workers, progress, timeout_s, max_sites)
    splits["train"] = splits["train"] + augmented

    tmp = new_tmp_dir(out_dir)
    try:
        index = []
        for split, entries in splits.items():
            offset = 0
            parts = []
            for entry in entries:
                i, res = entry[0], entry[1]
                ids = np.frombuffer(res.ids, dtype="<u2")
                parts.append(ids)
                row = {"split": split, "offset": offset, "n_tokens": int(ids.size), "source": items[i].source,
                       "name": items[i].name, "meta": items[i].meta}
                if len(entry) > 2:  # a translated copy: which translation, so the file says what it holds
                    row["augment"] = {"translation": entry[2]}
                index.append(row)
                offset += ids.size
            write_bin(tmp / f"{split}.bin", np.concatenate(parts) if parts else np.zeros(0, "<u2"))
        write_jsonl(tmp / "rejects.jsonl", rejects)
        write_jsonl(tmp / "duplicates.jsonl", duplicates)
        write_jsonl(tmp / "index.jsonl", index)
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
            "augmented": len(augmented),
            "augment_failed": augment_failed,
            "augment_identical": augment_identical,
            "dropped_chars": sum(dropped_chars.values()),
            "dropped_char_counts": dict(dropped_chars.most_common()),
        }
        provenance = {"sources": [describe_source(s) for s in sources], "options": {
            "val_fraction": val_fraction, "seed": seed, "dedup": dedup, "symmetrized": symmetrized,
            "timeout_s": timeout_s, "max_sites": max_sites, "augment_translations": augment_translations}}
        return finish(tmp, out_dir, overwrite, stats, provenance, t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


MAX_AUGMENT = 100
"""Most translated copies per training CIF a build accepts (a dataset 101x its size is already large)."""


def _augment(train: list[tuple[int, _Canonical]], items: list[SourceItem], k: int, seed: int, workers: int | None,
             progress: Progress | None, timeout_s: float | None, max_sites: int | None,
             ) -> tuple[list[tuple[int, _Canonical, list[float]]], int, int]:
    """``k`` randomly translated canonical copies of each training entry: ``([(item, result, shift)], failed,
    identical)``; ``identical`` counts copies whose text equals their original's (symmetrizing put the cell back
    at its standard origin).

    The shifts are drawn from ``default_rng([seed, 1])`` in training order, so a rebuild gives the same files.
    """
    if k == 0 or not train:
        return [], 0, 0
    shifts = np.random.default_rng([seed, 1]).random((len(train), k, 3)).round(6)  # (train, k, 3) fractional
    jobs = [(i, [float(x) for x in shifts[j, c]]) for j, (i, _) in enumerate(train) for c in range(k)]
    payloads = [(items[i].text, items[i].structure, tuple(g)) for i, g in jobs]
    results = _run_workers(payloads, workers, False, progress, timeout_s, max_sites)
    ok = [(i, res, g) for (i, g), res in zip(jobs, results) if not isinstance(res, str)]
    original = dict(train)
    identical = sum(res.ids == original[i].ids for i, res, _ in ok)
    return ok, len(jobs) - len(ok), identical


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
        if stats.get("augmented") or stats.get("augment_failed"):
            print(f"  translated training copies {stats['augmented']}, {stats.get('augment_identical', 0)} of them "
                  "identical to their original (high-symmetry cells come back at their standard origin)"
                  + (f" ({stats['augment_failed']} failed to canonicalize and were left out)"
                     if stats.get("augment_failed") else ""))
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
                           confine=args.confine, limits=limits, augment_translations=args.augment_translations)


def _cmd_corpus(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InputError(f"--n {args.n}: the corpus needs at least 1 structure (default 5000)")
    # --seed picks the generated structures; the train/val split keeps build's default seed.
    return _build_with_bar(args.out, [f"builtin:{args.n}:{args.seed}"], val_fraction=args.val_fraction,
                           workers=args.workers, overwrite=args.overwrite,
                           augment_translations=args.augment_translations)


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


AUGMENT_HELP = ("add this many randomly translated copies of every training CIF (Gruver et al.'s translation "
                "augmentation; validation is never augmented; default 0)")


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
    b.add_argument("--augment-translations", type=int, default=0, metavar="K", help=AUGMENT_HELP)
    b.set_defaults(func=_cmd_build)

    c = sub.add_parser("corpus", help="build a dataset from the built-in generated corpus")
    c.add_argument("--out", default="builtin", help=_OUT_HELP + " (default: builtin)")
    c.add_argument("--n", type=int, default=5000, help="number of generated structures (default 5000)")
    c.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default 0)")
    c.add_argument("--val-fraction", type=float, default=0.1)
    c.add_argument("--workers", type=int, default=None)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--augment-translations", type=int, default=0, metavar="K", help=AUGMENT_HELP)
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

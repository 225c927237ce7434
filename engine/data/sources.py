"""Reading dataset inputs: folders, archives and CSVs of CIFs, single CIF files, and the built-in corpus.

`read_source` turns one user-given source into an ordered list of `SourceItem`s, one per CIF (``data_`` block);
`scan_source` also names the files a folder or archive holds that are not CIFs (``readme.txt``), which are skipped.
Order is deterministic (sorted paths / archive members, CSV row order) so the same inputs always give the same
dataset. Problems with a single CIF inside a container (an unreadable member, an empty CSV cell) become items
carrying an ``error`` that the builder writes to ``rejects.jsonl``; problems with the source as a whole (missing
path, CSV without a ``cif`` column, archive without CIFs, a binary file) raise `InputError`. `check_source` tells
the first kind of those (a mistyped argument: missing path, bad ``builtin`` spelling) apart from the others (a
file that exists but cannot be read as CIFs), so a builder given several sources can reject one bad file and go
on with the rest.

The second half reads CrystaLLM token files for ``import-tokens`` and dataset loading: it streams
``train.bin`` / ``val.bin`` / ``meta.pkl`` out of a token archive, memory-maps bins, and checks that a ``meta``
vocabulary is exactly ours.
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from engine.crystal.vocab import SG_SUFFIX, STOI, TOKENS, VOCAB_SIZE, meta_dict
from engine.lab.errors import InputError
from engine.lab.safe_pickle import load_pickle

Progress = Callable[[int, int], None]
META_MAX_BYTES = 16 * 2**20
"""Largest ``meta.pkl`` read out of a token archive (upstream's is about 10 kB)."""
READ_CHUNK = 1 << 22  # bytes per read when copying or scanning token files (4 MiB: even, so uint16-aligned)

BUILTIN_DEFAULT_N = 5000
BUILTIN_DEFAULT_SEED = 0
SOURCE_KINDS_HELP = (
    "a folder of .cif files, a .cif file, a .csv with a 'cif' column, a .zip / .tar.gz / .tgz / .tar of CIFs, "
    "or builtin[:N[:SEED]]"
)
_DATA_BLOCK = re.compile(r"^[ \t]*data_", re.IGNORECASE | re.MULTILINE)
_NAME_COLUMNS = ("material_id", "id", "name", "mp_id")


@dataclass
class SourceItem:
    """One CIF to canonicalize, with where it came from."""

    source: str
    """The source as the user gave it (path string or ``builtin:N:SEED``)."""
    name: str
    """Identifies the CIF within its source: relative path, archive member, CSV ``material_id`` or row."""
    text: str | None = None
    """Raw CIF text (None for built-in structures, or when ``error`` is set)."""
    structure: Any = None
    """A pymatgen ``Structure`` (built-in corpus only)."""
    meta: dict = field(default_factory=dict)
    """Extra columns of a CSV row, kept as provenance."""
    error: str | None = None
    """Why this item cannot be used, found while reading; it goes straight to the rejects."""


class SourceScan(NamedTuple):
    """What one source holds: its CIFs, the files it holds that were skipped, and those not in UTF-8."""

    items: list[SourceItem]
    skipped: list[tuple[str, str]]
    """``(name, reason)`` of each file not read: files that are not CIFs (``readme.txt``, macOS ``._x.cif``
    resource forks), links inside an archive, and (when confined) symlinks that lead outside the allowed folders;
    only folders and archives have any."""
    latin1: list[tuple[str, int]] = []
    """``(name, line)`` of each file that was not UTF-8 and was read as Latin-1 (`decode_cif_bytes`), with the
    first line that is not UTF-8."""


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what reading one source may decompress and hold in memory (a zip bomb stops at these)."""

    file_bytes: int = 256 * 2**20
    """Largest single file, in bytes: a file of a folder, an archive member (decompressed) or a ``.cif`` source."""
    source_bytes: int = 2 * 2**30
    """Most bytes one source may yield: an archive's members decompressed, or a ``.csv`` / ``.cif`` file."""
    max_ratio: float = 200.0
    """Largest decompressed / compressed size of an archive (or a zip member); CIF text compresses about 5-10x,
    a bomb of zeros about 1000x."""
    ratio_floor: int = 16 * 2**20
    """The ratio is judged only past this many decompressed bytes (tiny files compress erratically)."""

    @staticmethod
    def mb(n: int) -> str:
        """A byte count as people read it (``50 MB``, ``51 kB``)."""
        return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{max(1, round(n / 2**10)):,} kB"


DEFAULT_LIMITS = ReadLimits()
Allowed = Callable[[Path], bool]
"""Predicate telling whether a file found inside a source may be read (`engine.lab.settings.Settings.is_allowed`)."""
_OUTSIDE = "a symlink that leads outside the folders this lab may read; it was not followed"


def _is_builtin(label: str) -> bool:
    return label == "builtin" or label.startswith("builtin:")


def _exists(label: str) -> bool:
    if "\0" in label:
        raise InputError(f"dataset source {label!r} contains a NUL byte, which no file name can hold; type it again.")
    return Path(label).expanduser().exists()


def check_source(source: str | Path) -> None:
    """Refuse a source argument that names nothing: a path that does not exist, or a misspelt ``builtin:N:SEED``.

    These are mistakes in the argument itself, so a build stops on them before reading anything; whether an
    existing file can be read is `scan_source`'s business.

    Raises:
        InputError: naming the source and the forms a source may take.
    """
    label = str(source)
    if _exists(label):
        return
    if _is_builtin(label):
        parse_builtin(label)
        return
    raise InputError(f"dataset source {label!r} does not exist; give {SOURCE_KINDS_HELP}.")


def read_source(source: str | Path) -> list[SourceItem]:
    """Read every CIF of one source, in a deterministic order (`scan_source` without the skipped names).

    Raises:
        InputError: the source does not exist, has an unsupported type, or holds no CIF at all.
    """
    return scan_source(source).items


def scan_source(source: str | Path, *, allowed: Allowed | None = None,
                limits: ReadLimits = DEFAULT_LIMITS) -> SourceScan:
    """Read every CIF of one source, in a deterministic order, and name the files skipped on the way.

    Args:
        source: see `SOURCE_KINDS_HELP`.
        allowed: when given, a file found inside a folder is read only if its real path (symlinks resolved)
            passes this check; the others are skipped with their reason. The dashboard confines reads this way.
        limits: size and compression-ratio bounds; an archive member over them becomes a reject, an archive
            over them as a whole is refused.

    Raises:
        InputError: the source does not exist, has an unsupported type, holds no CIF at all, or is over limits.
    """
    check_source(source)
    label = str(source)
    path = Path(label).expanduser()
    if not path.exists():
        return SourceScan(_read_builtin(label), [])
    skipped: list[tuple[str, str]] = []
    latin1: list[tuple[str, int]] = []
    if path.is_dir():
        items = _read_folder(path, label, skipped, latin1, allowed, limits)
        kind = "folder"
    else:
        lower = path.name.lower()
        if lower.endswith(".csv"):
            _check_file_size(path, label, limits.source_bytes, limits)
            return SourceScan(_read_csv(path, label, latin1), [], latin1)
        if lower.endswith(".cif"):
            _check_file_size(path, label, limits.source_bytes, limits)
            data = path.read_bytes()
            text, was_latin1 = decode_cif_bytes(data, label)
            items = _split_blocks(text, label, path.name)
            if not items:
                raise InputError(f"{label} has no 'data_' block: it is not a CIF file.")
            return SourceScan(items, [], [(path.name, first_non_utf8_line(data))] if was_latin1 else [])
        if lower.endswith(".zip"):
            items = _read_zip(path, label, skipped, latin1, limits)
            kind = "zip archive"
        elif lower.endswith((".tar.gz", ".tgz", ".tar")):
            items = _read_tar(path, label, skipped, latin1, limits)
            kind = "tar archive"
        else:
            raise InputError(f"dataset source {label!r} has an unsupported type; give {SOURCE_KINDS_HELP}.")
    if not items:
        raise InputError(
            f"the {kind} {label} contains no .cif files. {_token_hint(path, skipped)}"
            f"Give {SOURCE_KINDS_HELP}."
        )
    return SourceScan(items, skipped, latin1)


def _check_file_size(path: Path, label: str, cap: int, limits: ReadLimits) -> None:
    size = path.stat().st_size
    if size > cap:
        raise InputError(f"{label} is {limits.mb(size)}, over the {limits.mb(cap)} a source file may have; split "
                         "it into smaller files.")


def _token_hint(path: Path, skipped: list[tuple[str, str]]) -> str:
    """Point users who pass a CrystaLLM token archive to the right command."""
    names = [p.name for p in path.rglob("*.bin")] if path.is_dir() else [n.rsplit("/", 1)[-1] for n, _ in skipped]
    if "train.bin" in names:
        return "It looks like a token dataset: use `crystallab data import-tokens` for it. "
    return ""


def decode_cif_bytes(data: bytes, label: str) -> tuple[str, bool]:
    """Decode CIF bytes: ``(text, read_as_latin1)``. The lab's one rule for CIF files that are not UTF-8.

    UTF-8 is expected. Other bytes are read as Latin-1 (every byte one character), and the caller warns: older
    CIFs carry Latin-1 author names and comments, while the fields a structure is read from are ASCII in every
    encoding, so nothing structural can be misread. A NUL byte means a binary (or UTF-16) file, which is refused.

    Raises:
        InputError: a binary or UTF-16 file, naming ``label`` and what to do.
    """
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"{label} is UTF-16 text; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8).")
    if b"\x00" in data[:65536]:
        raise InputError(f"{label} is a binary file, not CIF text; give a text .cif file.")
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("latin-1"), True


def first_non_utf8_line(data: bytes) -> int:
    """Line number (from 1) of the first byte sequence that is not UTF-8 (0 when all of it is)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data.count(b"\n", 0, exc.start) + 1
    return 0


def latin1_warning(label: str, line: int) -> str:
    """The one-line warning for a file read as Latin-1, naming the first line that is not UTF-8."""
    return (f"{label} is not UTF-8 (line {line}); it was read as Latin-1. Convert it to UTF-8 "
            "(iconv -f LATIN1 -t UTF-8) if its text is in another encoding.")


def _split_blocks(text: str, source: str, name: str) -> list[SourceItem]:
    """Split a CIF file into one item per ``data_`` block (text before the first block is a header)."""
    starts = [m.start() for m in _DATA_BLOCK.finditer(text)]
    blocks = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    if len(blocks) == 1:
        return [SourceItem(source, name, text=blocks[0])]
    return [SourceItem(source, f"{name}#{i}", text=block) for i, block in enumerate(blocks, 1)]


def _items_from_bytes(data: bytes, source: str, name: str, latin1: list[tuple[str, int]]) -> list[SourceItem]:
    """Items of one CIF file found inside a container; unreadable files become rejects, not errors."""
    try:
        text, was_latin1 = decode_cif_bytes(data, name)
    except InputError as exc:
        return [SourceItem(source, name, error=str(exc))]
    if was_latin1:
        latin1.append((name, first_non_utf8_line(data)))
    items = _split_blocks(text, source, name)
    return items or [SourceItem(source, name, error="no 'data_' block: not a CIF")]


def _skip_reason(name: str) -> str | None:
    """Why a file of a folder or archive is not read as a CIF, or None when it is one."""
    base = name.rsplit("/", 1)[-1]
    # macOS archivers add AppleDouble "._x.cif" resource forks, which are binary noise, not CIFs.
    if base.startswith("._") or "__MACOSX/" in name:
        return "a macOS resource fork, not a CIF"
    if not base.lower().endswith(".cif"):
        return "not a .cif file"
    return None


def _read_folder(path: Path, label: str, skipped: list[tuple[str, str]], latin1: list[tuple[str, int]],
                 allowed: Allowed | None, limits: ReadLimits) -> list[SourceItem]:
    """CIFs of a folder (searched recursively; symlinked folders are not entered); other files go to ``skipped``."""
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    items: list[SourceItem] = []
    for p in files:
        name = p.relative_to(path).as_posix()
        reason = _skip_reason(name)
        real = p.resolve()
        if reason is None and allowed is not None and not allowed(real):
            reason = _OUTSIDE
        if reason is not None:
            skipped.append((name, reason))
            continue
        try:
            size = real.stat().st_size
            if size > limits.file_bytes:
                items.append(SourceItem(label, name, error=f"the file is {limits.mb(size)}, over the "
                                        f"{limits.mb(limits.file_bytes)} one CIF file may have"))
                continue
            data = real.read_bytes()  # the checked real path, not the link (which could be swapped meanwhile)
        except OSError as exc:  # e.g. no read permission: that one file is rejected, the rest still build
            items.append(SourceItem(label, name, error=f"could not be read: {exc.strerror or exc}"))
            continue
        items += _items_from_bytes(data, label, name, latin1)
    return items


class _Budget:
    """Counts what an archive has decompressed so far and stops it at the limits."""

    def __init__(self, label: str, limits: ReadLimits, compressed: Callable[[], int]) -> None:
        self.label, self.limits, self.compressed = label, limits, compressed
        self.total = 0

    def add(self, n: int) -> None:
        """Account ``n`` more decompressed bytes of the archive.

        Raises:
            InputError: the archive as a whole is over the size cap or decompresses suspiciously well.
        """
        self.total += n
        lim = self.limits
        if self.total > lim.source_bytes:
            raise InputError(f"{self.label} decompresses to more than {lim.mb(lim.source_bytes)}, the most one "
                             "source may hold; split it into smaller archives.")
        packed = max(1, self.compressed())
        if self.total > lim.ratio_floor and self.total / packed > lim.max_ratio:
            raise InputError(f"{self.label} expands more than {lim.max_ratio:g}-fold when decompressed "
                             f"({lim.mb(self.total)} from {lim.mb(packed)} so far): it looks like a zip bomb, "
                             "not CIF text; it was not read further.")


def _read_member(fh: Any, budget: _Budget, keep: bool) -> tuple[bytes | None, str | None]:
    """Stream one archive member in chunks: ``(data, None)``, or ``(None, reason)`` when it is over the size cap.

    ``keep=False`` reads through a member that is not used, counting it against the archive's budget (a tar is
    read front to back, so a bomb in a skipped member is caught as it is decompressed, not after).
    """
    lim = budget.limits
    chunks: list[bytes] = []
    n = 0
    over: str | None = None
    while block := fh.read(1 << 20):
        n += len(block)
        budget.add(len(block))
        if over or not keep:
            continue
        if n > lim.file_bytes:
            over = f"it decompresses to more than {lim.mb(lim.file_bytes)}, the most one CIF file may have"
            chunks = []
        else:
            chunks.append(block)
    return (None, over) if over or not keep else (b"".join(chunks), None)


def _zip_member_problem(info: zipfile.ZipInfo, lim: ReadLimits) -> str | None:
    """Why a zip member is not decompressed at all, judged from its header (None: read it).

    zipfile never decompresses more than the size a member declares, so the declared size bounds the work.
    """
    if info.file_size > lim.ratio_floor and info.file_size / max(1, info.compress_size) > lim.max_ratio:
        return (f"it would expand more than {lim.max_ratio:g}-fold ({lim.mb(info.file_size)} from "
                f"{lim.mb(info.compress_size)}): a zip bomb, not CIF text")
    if info.file_size > lim.file_bytes:
        return (f"it decompresses to {lim.mb(info.file_size)}, over the {lim.mb(lim.file_bytes)} one CIF file "
                "may have")
    return None


def _is_zip_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _read_zip(path: Path, label: str, skipped: list[tuple[str, str]], latin1: list[tuple[str, int]],
              limits: ReadLimits) -> list[SourceItem]:
    """CIF members of a zip archive, streamed within ``limits``; other members go to ``skipped``."""
    try:
        with zipfile.ZipFile(path) as zf:
            budget = _Budget(label, limits, lambda: path.stat().st_size)
            items: list[SourceItem] = []
            for info in sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename):
                name = info.filename
                reason = "a symbolic link inside the archive; links are not followed" if _is_zip_symlink(info) \
                    else _skip_reason(name)
                if reason is not None:
                    skipped.append((name, reason))
                    continue
                over = _zip_member_problem(info, limits)
                if over is None:
                    with zf.open(info) as fh:
                        data, over = _read_member(fh, budget, True)
                items += ([SourceItem(label, name, error=over)] if over
                          else _items_from_bytes(data or b"", label, name, latin1))
    except zipfile.BadZipFile as exc:
        raise InputError(f"{label} is not a readable zip archive ({exc}); re-create it or unpack it.") from None
    return items


def _read_tar(path: Path, label: str, skipped: list[tuple[str, str]], latin1: list[tuple[str, int]],
              limits: ReadLimits) -> list[SourceItem]:
    """CIF members of a (compressed) tar archive, streamed in one pass within ``limits``; others go to ``skipped``.

    Members are read in archive order and sorted by name afterwards, so the order does not depend on how the
    archive was made. Links are never followed: a symlink or hard link member is skipped with its reason.
    """
    found: list[tuple[str, list[SourceItem]]] = []
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            budget = _Budget(label, limits, raw.tell)
            for m in tar:
                if m.isdir():
                    continue
                if m.issym() or m.islnk():
                    kind = "symbolic" if m.issym() else "hard"
                    skipped.append((m.name, f"a {kind} link inside the archive (to {m.linkname!r}); links are "
                                            "not followed"))
                    continue
                if not m.isfile():
                    skipped.append((m.name, "not a regular file (a device or pipe entry)"))
                    continue
                reason = _skip_reason(m.name)
                fh = tar.extractfile(m)
                data, over = _read_member(fh, budget, keep=reason is None) if fh else (b"", None)
                if reason is not None:
                    skipped.append((m.name, reason))
                elif over:
                    found.append((m.name, [SourceItem(label, m.name, error=over)]))
                else:
                    found.append((m.name, _items_from_bytes(data or b"", label, m.name, latin1)))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{label} is not a readable tar archive ({exc}); re-create it or unpack it.") from None
    skipped.sort()
    latin1.sort()
    return [item for _, group in sorted(found, key=lambda f: f[0]) for item in group]


def _clean(value: Any) -> Any:
    """CSV cell -> JSON-friendly value (NaN becomes None, numpy scalars become Python scalars)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _read_csv(path: Path, label: str, latin1: list[tuple[str, int]]) -> list[SourceItem]:
    import io

    import pandas as pd

    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise InputError(f"{label} is a binary file, not a CSV; give a text .csv with a 'cif' column.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # the same rule as for CIF files (`decode_cif_bytes`)
        text = data.decode("latin-1")
        latin1.append((path.name, first_non_utf8_line(data)))
    del data
    try:
        df = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{label} is not a readable CSV ({' '.join(str(exc).split())}); check the line it "
                         "names.") from None
    cif_col = next((c for c in df.columns if str(c).strip().lower() == "cif"), None)
    if cif_col is None:
        raise InputError(
            f"{label} has no 'cif' column (columns: {', '.join(map(str, df.columns))}); "
            "give a CSV whose 'cif' column holds one CIF text per row (CDVAE / MP-20 layout)."
        )
    name_col = next((c for c in df.columns if str(c).lower() in _NAME_COLUMNS), None)
    meta_cols = [c for c in df.columns if c != cif_col]
    items: list[SourceItem] = []
    for row_no, row in enumerate(df.itertuples(index=False, name=None)):
        record = dict(zip(df.columns, row))
        name = str(record[name_col]) if name_col is not None and _clean(record[name_col]) is not None \
            else f"row {row_no}"
        meta = {str(c): _clean(record[c]) for c in meta_cols}
        text = record[cif_col]
        if not isinstance(text, str) or not text.strip():
            items.append(SourceItem(label, name, meta=meta, error=f"row {row_no}: empty 'cif' cell"))
        else:
            items.append(SourceItem(label, name, text=text, meta=meta))
    if not items:
        raise InputError(f"{label} has a 'cif' column but no rows.")
    return items


def describe_source(source: str | Path) -> str:
    """How a source is recorded in ``dataset.json``: an absolute path, or ``builtin:N:SEED`` spelled out."""
    label = str(source)
    path = Path(label).expanduser()
    if not path.exists() and _is_builtin(label):
        return "builtin:%d:%d" % parse_builtin(label)
    return str(path.resolve())


def parse_builtin(label: str) -> tuple[int, int]:
    """``builtin[:N[:SEED]]`` -> (N, SEED)."""
    parts = label.split(":")
    try:
        n = int(parts[1]) if len(parts) > 1 and parts[1] else BUILTIN_DEFAULT_N
        seed = int(parts[2]) if len(parts) > 2 and parts[2] else BUILTIN_DEFAULT_SEED
    except ValueError:
        raise InputError(f"{label!r}: write the built-in corpus as builtin, builtin:N or builtin:N:SEED "
                         "with whole numbers.") from None
    if len(parts) > 3 or n < 1:
        raise InputError(f"{label!r}: write the built-in corpus as builtin, builtin:N or builtin:N:SEED, N >= 1.")
    return n, seed


def _read_builtin(label: str) -> list[SourceItem]:
    from engine.data.corpus import generate_structures

    n, seed = parse_builtin(label)
    return [SourceItem(label, str(sid), structure=s) for sid, s in generate_structures(n, seed)]


# ---- CrystaLLM token files -----------------------------------------------------------------------------------


def check_vocab(meta: Any, label: str) -> dict:
    """Validate an upstream ``meta`` dict against our vocabulary; return it in canonical form (`meta_dict`).

    A space-group id may be spelt bare in ``itos`` (``143: 'P6/mmm'``, what upstream writes) or with its suffix
    (``'P6/mmm_sg'``): the ids are what matter. ``stoi``, when present, must be ours exactly.
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("itos"), (dict, list)):
        raise InputError(f"{label} is not a CrystaLLM meta file: expected a dict with 'vocab_size', 'itos' "
                         "and 'stoi'.")
    itos = meta["itos"]
    try:
        theirs = dict(enumerate(itos)) if isinstance(itos, list) else {int(k): v for k, v in itos.items()}
    except (TypeError, ValueError):
        raise InputError(f"{label}: 'itos' keys must be token ids (integers).") from None

    def same(i: int, token: Any) -> bool:
        ours = TOKENS[i] if i < VOCAB_SIZE else None
        return token == ours or (ours is not None and ours.endswith(SG_SUFFIX) and token == ours[: -len(SG_SUFFIX)])

    diffs = [f"id {i}: file {theirs.get(i)!r} vs ours {TOKENS[i] if i < VOCAB_SIZE else None!r}"
             for i in range(max(VOCAB_SIZE, max(theirs, default=0) + 1)) if not same(i, theirs.get(i))]
    if meta.get("vocab_size") != VOCAB_SIZE:
        diffs.insert(0, f"vocab_size {meta.get('vocab_size')!r} vs ours {VOCAB_SIZE}")
    stoi = meta.get("stoi")
    if not diffs and isinstance(stoi, dict) and stoi != STOI:
        diffs.append("'stoi' does not map each token to the id 'itos' gives it")
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise InputError(f"{label}: the vocabulary differs from CrystaLLM's 371 tokens ({shown}). Token ids "
                         "must match exactly; re-tokenize the CIFs with `crystallab data build`.")
    return meta_dict()


def copy_stream(src: Any, dst: Path, on_chunk: Callable[[int], None] | None = None) -> None:
    """Copy a binary stream to ``dst`` in fixed-size chunks (never the whole file in memory)."""
    with open(dst, "wb") as out:
        while block := src.read(READ_CHUNK):
            out.write(block)
            if on_chunk:
                on_chunk(len(block))
        out.flush()
        os.fsync(out.fileno())


def extract_token_archive(archive: Path, dest: Path, progress: Progress | None) -> dict:
    """Stream ``<name>/{train.bin,val.bin,meta.pkl}`` out of a (gzipped) tar in one pass; return the meta."""
    dest.mkdir(parents=True, exist_ok=True)
    total = archive.stat().st_size
    found: dict[str, str] = {}
    meta_bytes = b""
    with open(archive, "rb") as raw:
        report = (lambda _n: progress(min(raw.tell(), total), total)) if progress else None
        try:
            # Stream mode reads the archive once front to back, whatever order its members come in.
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if not member.isfile() or base not in ("train.bin", "val.bin", "meta.pkl"):
                        continue
                    if base in found:
                        raise InputError(f"{archive} holds two {base} files ({found[base]}, {member.name}); "
                                         "give an archive with one token dataset.")
                    found[base] = member.name
                    fh = tar.extractfile(member)
                    if base == "meta.pkl":
                        meta_bytes = fh.read(META_MAX_BYTES + 1)  # upstream's is 10 kB; never read a bomb whole
                        if len(meta_bytes) > META_MAX_BYTES:
                            raise InputError(f"{archive}: {member.name} is over {ReadLimits.mb(META_MAX_BYTES)}; a "
                                             "CrystaLLM meta.pkl holds 371 tokens (about 10 kB). Check the archive.")
                    else:
                        copy_stream(fh, dest / base, report)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InputError(f"{archive} is not a readable tar archive ({exc}).") from None
    missing = [f for f in ("train.bin", "val.bin", "meta.pkl") if f not in found]
    if missing:
        raise InputError(f"{archive} lacks {', '.join(missing)}; a CrystaLLM token archive holds "
                         "<name>/train.bin, <name>/val.bin and <name>/meta.pkl.")
    return check_vocab(load_pickle(meta_bytes, label=f"{archive}:{found['meta.pkl']}"), str(archive))


def read_meta(folder: Path) -> dict:
    """Read and validate a folder's vocabulary, preferring JSON (no pickle involved)."""
    if (folder / "meta.json").exists():
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{folder / 'meta.json'} is not valid JSON ({exc}).") from None
        return check_vocab(meta, str(folder / "meta.json"))
    return check_vocab(load_pickle(folder / "meta.pkl"), str(folder / "meta.pkl"))


def open_bin(path: Path) -> np.ndarray:
    """Memory-map a uint16 token file read-only (an empty file gives an empty array)."""
    size = path.stat().st_size
    if size % 2:
        raise InputError(f"{path} has an odd number of bytes ({size}): not a uint16 token file.")
    if size == 0:
        empty = np.zeros(0, dtype="<u2")
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype="<u2", mode="r")

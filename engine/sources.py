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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from engine.errors import InputError
from engine.safe_pickle import load_pickle
from engine.vocab import SG_SUFFIX, STOI, TOKENS, VOCAB_SIZE, meta_dict

Progress = Callable[[int, int], None]
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
    """What one source holds: its CIFs, and the other files it holds that were skipped."""

    items: list[SourceItem]
    skipped: list[str]
    """Names (relative path or archive member) of files that are not CIFs (``readme.txt``, macOS ``._x.cif``
    resource forks); only folders and archives have any."""


def _is_builtin(label: str) -> bool:
    return label == "builtin" or label.startswith("builtin:")


def check_source(source: str | Path) -> None:
    """Refuse a source argument that names nothing: a path that does not exist, or a misspelt ``builtin:N:SEED``.

    These are mistakes in the argument itself, so a build stops on them before reading anything; whether an
    existing file can be read is `scan_source`'s business.

    Raises:
        InputError: naming the source and the forms a source may take.
    """
    label = str(source)
    if Path(label).expanduser().exists():
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


def scan_source(source: str | Path) -> SourceScan:
    """Read every CIF of one source, in a deterministic order, and name the non-CIF files skipped on the way.

    Raises:
        InputError: the source does not exist, has an unsupported type, or holds no CIF at all.
    """
    check_source(source)
    label = str(source)
    path = Path(label).expanduser()
    if not path.exists():
        return SourceScan(_read_builtin(label), [])
    skipped: list[str] = []
    if path.is_dir():
        items = _read_folder(path, label, skipped)
        kind = "folder"
    else:
        lower = path.name.lower()
        if lower.endswith(".csv"):
            return SourceScan(_read_csv(path, label), [])
        if lower.endswith(".cif"):
            items = _split_blocks(_decode(path.read_bytes(), label), label, path.name)
            if not items:
                raise InputError(f"{label} has no 'data_' block: it is not a CIF file.")
            return SourceScan(items, [])
        if lower.endswith(".zip"):
            items = _read_zip(path, label, skipped)
            kind = "zip archive"
        elif lower.endswith((".tar.gz", ".tgz", ".tar")):
            items = _read_tar(path, label, skipped)
            kind = "tar archive"
        else:
            raise InputError(f"dataset source {label!r} has an unsupported type; give {SOURCE_KINDS_HELP}.")
    if not items:
        raise InputError(
            f"the {kind} {label} contains no .cif files. {_token_hint(path)}"
            f"Give {SOURCE_KINDS_HELP}."
        )
    return SourceScan(items, skipped)


def _token_hint(path: Path) -> str:
    """Point users who pass a CrystaLLM token archive to the right command."""
    names: list[str] = []
    if path.is_dir():
        names = [p.name for p in path.rglob("*.bin")]
    elif path.name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path, "r:*") as tar:
            names = [Path(m.name).name for m in tar.getmembers()]
    if "train.bin" in names:
        return "It looks like a token dataset: use `crystallab data import-tokens` for it. "
    return ""


def _decode(data: bytes, label: str) -> str:
    """Decode CIF bytes; a NUL byte means a binary file, which is refused."""
    if b"\x00" in data[:65536]:
        raise InputError(f"{label} is a binary file, not CIF text; give a text .cif file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Older CIFs carry Latin-1 author names in comments; the structural fields are ASCII either way.
        return data.decode("latin-1")


def _split_blocks(text: str, source: str, name: str) -> list[SourceItem]:
    """Split a CIF file into one item per ``data_`` block (text before the first block is a header)."""
    starts = [m.start() for m in _DATA_BLOCK.finditer(text)]
    blocks = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    if len(blocks) == 1:
        return [SourceItem(source, name, text=blocks[0])]
    return [SourceItem(source, f"{name}#{i}", text=block) for i, block in enumerate(blocks, 1)]


def _items_from_bytes(data: bytes, source: str, name: str) -> list[SourceItem]:
    """Items of one CIF file found inside a container; unreadable files become rejects, not errors."""
    try:
        text = _decode(data, name)
    except InputError as exc:
        return [SourceItem(source, name, error=str(exc))]
    items = _split_blocks(text, source, name)
    return items or [SourceItem(source, name, error="no 'data_' block: not a CIF")]


def _read_folder(path: Path, label: str, skipped: list[str]) -> list[SourceItem]:
    """CIFs of a folder (searched recursively); the names of its other files are appended to ``skipped``."""
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    items: list[SourceItem] = []
    for p in files:
        name = p.relative_to(path).as_posix()
        if not _is_cif_member(name):
            skipped.append(name)
            continue
        try:
            data = p.read_bytes()
        except OSError as exc:  # e.g. no read permission: that one file is rejected, the rest still build
            items.append(SourceItem(label, name, error=f"could not be read: {exc.strerror or exc}"))
            continue
        items += _items_from_bytes(data, label, name)
    return items


def _is_cif_member(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # macOS archivers add AppleDouble "._x.cif" resource forks, which are binary noise, not CIFs.
    return base.lower().endswith(".cif") and not base.startswith("._") and "__MACOSX/" not in name


def _read_zip(path: Path, label: str, skipped: list[str]) -> list[SourceItem]:
    """CIF members of a zip archive; the names of its other files are appended to ``skipped``."""
    try:
        with zipfile.ZipFile(path) as zf:
            files = sorted(i.filename for i in zf.infolist() if not i.is_dir())
            names = [n for n in files if _is_cif_member(n)]
            skipped += [n for n in files if not _is_cif_member(n)]
            items: list[SourceItem] = []
            for name in names:
                items += _items_from_bytes(zf.read(name), label, name)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{label} is not a readable zip archive ({exc}); re-create it or unpack it.") from None
    return items


def _read_tar(path: Path, label: str, skipped: list[str]) -> list[SourceItem]:
    """CIF members of a (compressed) tar archive; the names of its other files are appended to ``skipped``."""
    try:
        with tarfile.open(path, "r:*") as tar:
            files = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            members = [m for m in files if _is_cif_member(m.name)]
            skipped += [m.name for m in files if not _is_cif_member(m.name)]
            items: list[SourceItem] = []
            for m in members:
                fh = tar.extractfile(m)
                items += _items_from_bytes(fh.read() if fh else b"", label, m.name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"{label} is not a readable tar archive ({exc}); re-create it or unpack it.") from None
    return items


def _clean(value: Any) -> Any:
    """CSV cell -> JSON-friendly value (NaN becomes None, numpy scalars become Python scalars)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _read_csv(path: Path, label: str) -> list[SourceItem]:
    import pandas as pd

    with open(path, "rb") as fh:
        head = fh.read(65536)
    if b"\x00" in head:
        raise InputError(f"{label} is a binary file, not a CSV; give a text .csv with a 'cif' column.")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{label} is not a readable CSV ({exc}).") from None
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
    from engine.corpus import generate_structures

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
                        meta_bytes = fh.read()
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

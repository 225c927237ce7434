"""Small file-system helpers shared by every module that writes a run folder.

Writes that a reader may observe mid-way (status, configs, checkpoints, tables) go through a temporary file in
the same folder followed by ``os.replace``, so a crash or kill at any moment leaves either the old or the new
file, never a torn one. Metrics are append-only JSON lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temp file in the same folder, which is fsynced and renamed.

    A crash or kill at any moment leaves either the previous file or the new one, never a torn one; the rename
    itself is made durable by fsyncing the folder (POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(folder: str | os.PathLike, what: str, hint: str) -> Path:
    """Make sure files can be created in ``folder`` (created if missing) before any work is spent on them.

    Probes by creating and removing a temporary file rather than trusting permission bits, which root ignores
    and which say nothing about read-only mounts or full quotas.

    Raises:
        InputError: the folder cannot be created or written; the message names it, the reason and ``hint``.
    """
    from engine.lab.errors import InputError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"{what} {folder} cannot be written ({reason}); {hint}") from None
    return folder


def writable_problem(path: str | os.PathLike) -> str | None:
    """Why a folder could not be created and written at ``path`` (without creating it), or None.

    The nearest existing ancestor is probed as in `check_writable`; nothing is left behind.
    """
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", suffix=".tmp", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{probe_dir} cannot be written ({exc.strerror or type(exc).__name__})"
    return None


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files `atomic_write` leaves when a writer is killed mid-write; return them.

    Only the folder's owner may call this (it holds the folder's lock), so no live writer's temporary is removed.
    """
    removed = []
    now = time.time()
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:
            continue
    return removed


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Read a JSON file; return ``default`` when it does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as a line (flushed and fsynced: metrics survive a kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the complete JSON lines of ``path``; a torn last line (killed writer) is ignored."""
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # partially written final line
            line = line.strip()
            if line:
                yield json.loads(line)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_lines(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()

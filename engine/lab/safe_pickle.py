"""Reading and writing CrystaLLM's pickle files (``meta.pkl``, ``starts.pkl``) without executing code.

Unpickling runs whatever callables a file names, so a ``meta.pkl`` downloaded from anywhere could run code on
load. CrystaLLM's pickles hold only dicts, lists, ints and strs, which the pickle protocol encodes with
dedicated opcodes that never look up a global. Our unpickler therefore allows no global at all: any file that
names one (``os.system``, a numpy array, a custom class) is refused before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from engine.lab.errors import InputError
from engine.lab.fsutil import atomic_write_bytes

# Protocol 4 is readable by every Python CrystaLLM supports (>= 3.4) and handles objects over 4 GB.
PICKLE_PROTOCOL = 4


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global reference (class, function) a pickle asks for."""

    def __init__(self, file: io.BufferedIOBase, label: str) -> None:
        super().__init__(file)
        self._label = label

    def find_class(self, module: str, name: str) -> Any:
        raise InputError(
            f"refusing to load {self._label}: it contains Python objects ({module}.{name}) that would execute "
            "code. Only plain dicts/lists of ints and strings are accepted; regenerate the file from trusted data "
            "(e.g. `crystallab data import-tokens` rebuilds meta.pkl and starts.pkl)."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise InputError(f"refusing to load {self._label}: it references persistent objects ({pid!r}).")


def load_pickle(source: str | os.PathLike | bytes, label: str | None = None) -> Any:
    """Load a pickle made only of builtin containers and scalars.

    Args:
        source: a file path, or the pickle's bytes (e.g. a member read from a tar archive).
        label: how to name the input in error messages; defaults to the path (or "pickle data").

    Returns:
        The unpickled object (dict / list / int / str / float / bool / None / tuple / set / bytes).

    Raises:
        InputError: the file is missing, truncated, not a pickle, or names any Python global.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = label or "pickle data"
    else:
        path = Path(source)
        label = label or str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{label} does not exist; check the path.") from None
        except IsADirectoryError:
            raise InputError(f"{label} is a folder, not a pickle file.") from None
    try:
        return _NoGlobalsUnpickler(io.BytesIO(data), label).load()
    except InputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError) as exc:
        # Malformed or truncated streams surface as any of these depending on where the bytes end.
        raise InputError(f"{label} is not a readable pickle file ({type(exc).__name__}: {exc}).") from None


def dump_pickle(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as a pickle atomically, readable by upstream CrystaLLM's plain ``pickle.load``."""
    return atomic_write_bytes(path, pickle.dumps(obj, protocol=PICKLE_PROTOCOL))

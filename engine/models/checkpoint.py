"""Checkpoints in CrystaLLM's ``ckpt.pt`` layout: atomic save, code-free load, compatibility checks; CLI ``ckpt``.

A checkpoint is a ``torch.save`` dict with CrystaLLM's keys (``model``, ``optimizer``, ``model_args``,
``iter_num``, ``best_val_loss``, ``config``), a ``crystallab`` dict of provenance (vocabulary fingerprint, run,
step, data fingerprint, parent, creation time, version) and any extra resume state (scaler, tracker, rng) as
further top-level keys. Only plain types are stored, so every file is read with ``torch.load(weights_only=True)``:
loading never runs code from the file. CrystaLLM's published checkpoints load as they are.

Saving goes to a temporary file in the same folder, is fsynced, then renamed over the target: a kill at any
moment leaves the previous checkpoint intact. Our checkpoints record a SHA-256 of their weights
(``crystallab.weights_sha256``); loading with checks, and ``ckpt inspect``, verify it and that every weight is
finite, so a file whose bytes were flipped or whose training diverged to NaN is reported instead of sampled.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import __version__
from engine.crystal.vocab import vocab_fingerprint
from engine.lab.errors import CheckpointError, ConfigError
from engine.lab.fsutil import atomic_write, sha256_file
from engine.models.family import DEFAULT_FAMILY
from engine.models.gpt import GPT, VOCAB_SIZE, GPTConfig, state_dict_shapes

UPSTREAM_KEYS = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config")
META_KEY = "crystallab"
_STANDARD_KEYS = frozenset((*UPSTREAM_KEYS, META_KEY))
# Prefixes added by torch.compile and DistributedDataParallel wrappers; the weights underneath are the same.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Causal-mask buffers some nanoGPT versions persist; our attention needs no mask, so they are dropped.
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


@dataclass
class Checkpoint:
    """A checkpoint read from disk, its state dict already cleaned and checked against ``model_args``."""

    model_args: dict[str, Any]
    """CrystaLLM ``model_args``: n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout."""
    state_dict: dict[str, torch.Tensor]
    """Model weights, wrapper prefixes and mask buffers removed; loads strictly into ``GPT(model_config)``."""
    iter_num: int
    """Optimizer steps taken when this checkpoint was written (100000 for CrystaLLM's v1 small model)."""
    best_val_loss: float | None
    """Lowest validation loss seen so far (nats per token), or None when the file has none."""
    config: dict[str, Any]
    """The training configuration that produced it (upstream's or ours)."""
    meta: dict[str, Any]
    """The ``crystallab`` provenance dict; empty for upstream checkpoints."""
    optimizer_state: dict[str, Any] | None
    """AdamW state dict, or None when it was not saved."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other top-level key (resume state such as scaler or tracker)."""
    path: Path | None = None
    """Where it was read from."""
    keys: list[str] = field(default_factory=list)
    """Top-level keys present in the file, in file order."""

    @property
    def model_config(self) -> GPTConfig:
        return GPTConfig.from_model_args(self.model_args)

    @property
    def is_upstream(self) -> bool:
        """True for a checkpoint without crystallab provenance (e.g. CrystaLLM's published ``ckpt.pt``)."""
        return not self.meta


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy values, paths and dates turned into types ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v, where) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    # A programming error in the caller, not a user error: fail before anything is written.
    raise TypeError(f"checkpoint value {where} has type {type(value).__name__}, which cannot be stored as plain data")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under torch.compile / DDP wrappers, so saved keys carry no wrapper prefix."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    iter_num: int,
    best_val_loss: float | torch.Tensor | None,
    config: dict[str, Any],
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint atomically in CrystaLLM's layout plus crystallab provenance.

    Args:
        path: Target file (its folder is created); replaced only once the new file is complete on disk.
        model: A `GPT`, possibly wrapped by ``torch.compile`` or DDP.
        optimizer: Its optimizer; stored as ``optimizer`` (None keeps a slot of None, as upstream allows).
        iter_num: Optimizer steps taken.
        best_val_loss: Lowest validation loss so far (nats per token), or None.
        config: The training configuration (stored as ``config``).
        meta: Provenance: ``run``, ``step``, ``data_fingerprint``, ``parent`` (others are kept too).
            ``vocab_fingerprint``, ``created_at`` and ``version`` are filled in here.
        extra: Further top-level keys for resuming (scaler, tracker, rng state ...).
        weights: What ``model`` stores instead of its whole state dict (a LoRA run: its adapter weights, with
            ``meta["lora"]`` naming the base checkpoint).

    Returns:
        The path written.

    Raises:
        TypeError: ``model`` is not a GPT, or a value is not plain data (numbers, strings, containers,
            tensors; numpy values, paths and dates are converted). Nothing is written.
        ValueError: an ``extra`` key collides with a standard key.
    """
    path = Path(path)
    bare = _unwrap(model)
    clash = sorted(_STANDARD_KEYS & set(extra or {}))
    if clash:
        raise ValueError(f"extra checkpoint keys {clash} would overwrite standard keys")
    model_args = bare.config.to_model_args() if isinstance(bare, GPT) else None
    if model_args is None:
        raise TypeError(f"save_checkpoint needs a GPT model, got {type(bare).__name__}")
    provenance = {"run": None, "step": int(iter_num), "data_fingerprint": None, "parent": None, **meta}
    weights = bare.state_dict() if weights is None else weights
    provenance.update(
        weights_sha256=weights_sha256(weights),
        vocab_fingerprint=vocab_fingerprint(),
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        version=__version__,
    )
    if isinstance(best_val_loss, torch.Tensor):
        best_val_loss = best_val_loss.item()
    payload = {
        "model": weights,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_args": model_args,
        "iter_num": int(iter_num),
        "best_val_loss": None if best_val_loss is None else float(best_val_loss),
        "config": config,
        META_KEY: provenance,
        **(extra or {}),
    }
    payload = {k: _plain(v, k) for k, v in payload.items()}
    _atomic_torch_save(payload, path)
    return path


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


# ----------------------------------------------------------------------------------------------------------------
# Loading


_GLOBAL_RE = re.compile(r"unsupported global:? (?:GLOBAL )?([\w.]+)", re.IGNORECASE)
# Lines of torch's weights_only error that are advice about torch itself, not about the file.
_TORCH_BOILERPLATE = ("weights only load failed", "please file an issue", "check the documentation", "in pytorch 2.6")


def _refuse_code(path: Path, name: str | None) -> CheckpointError:
    what = f" (it names {name})" if name else ""
    return CheckpointError(
        f"{path} contains pickled Python objects{what} that would execute code when loaded; crystallab only loads "
        "weights-only checkpoints (torch.load with weights_only=True), so it refuses this file. If you trust where "
        "it came from, re-save it as plain data once, in a separate Python session: ck = torch.load(PATH, "
        "weights_only=False), turn non-tensor values (numpy numbers, custom classes) into plain Python values, then "
        "torch.save({k: ck[k] for k in ('model', 'model_args', 'iter_num', 'best_val_loss', 'config')}, NEW_PATH) "
        "and use NEW_PATH."
    )


def _torch_reason(exc: Exception) -> str:
    """The line of a torch.load error that says what is wrong with the file (no torch advice, no backticks)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.lower().startswith(_TORCH_BOILERPLATE)]
    reason = (useful or lines or [type(exc).__name__])[0]
    return reason.replace("`", "'")[:200]


def _file_kind(path: Path) -> str:
    """``empty``, ``zip``, ``truncated_zip`` (a zip start without its central directory), ``pickle`` or ``other``."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK"):  # a zip archive; an empty one starts with its end record
        return "zip" if zipfile.is_zipfile(path) else "truncated_zip"
    if head[:1] == b"\x80":  # pickle PROTO opcode: torch.save's legacy (pre-1.6) format
        return "pickle"
    return "other"


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """A `CheckpointError` that says what kind of file ``path`` is and why torch.load refused it."""
    found = _GLOBAL_RE.search(str(exc))
    if isinstance(exc, pickle.UnpicklingError) and found:  # the file names a class/function to call: code
        return _refuse_code(path, found.group(1))
    usage = "pass a .pt file saved by torch.save (CrystaLLM's ckpt.pt or a run's ckpt/last.pt)"
    kind = _file_kind(path)
    if kind == "empty":
        return CheckpointError(f"{path} is empty (0 bytes), not a PyTorch checkpoint; {usage}")
    if kind == "other":
        return CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle, the formats torch.save "
            f"writes; {usage}"
        )
    if kind == "truncated_zip" or (kind == "pickle" and isinstance(exc, EOFError)):
        return CheckpointError(
            f"{path} looks truncated: it starts like a torch.save file but its end is missing "
            f"({'no zip central directory' if kind == 'truncated_zip' else 'the pickle stream stops early'}); "
            "re-copy or re-download it, or wait until the program writing it has finished"
        )
    if kind == "zip":
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
        if not any(n.endswith("data.pkl") for n in names):
            return CheckpointError(
                f"{path} is a zip archive but not a PyTorch checkpoint (it has no data.pkl inside); {usage}"
            )
    return CheckpointError(
        f"{path} is not a PyTorch checkpoint torch can read without running code ({_torch_reason(exc)}); {usage}"
    )


def read_any(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of any checkpoint dict, every failure a `CheckpointError` naming the file."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (a run keeps ckpt/last.pt)")
    if path.is_dir():
        # A training run folder holds its checkpoints in ckpt/: point at them.
        found = sorted(str(p.relative_to(path)) for p in [*path.glob("*.pt"), *path.glob("ckpt/*.pt")])
        hint = f" it holds {', '.join(found)}" if found else " it holds no .pt file (nor ckpt/*.pt)"
        raise CheckpointError(f"{path} is a folder, not a checkpoint file:{hint}; pass the file itself")
    mmap = mmap and zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types (KeyError, RuntimeError, EOFError) for foreign bytes
        raise _unreadable(path, exc) from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict with model and model_args")
    return raw


def read_meta(path: Path) -> dict[str, Any]:
    """The ``crystallab`` provenance dict of a checkpoint file (empty for upstream files), memory-mapped; of a
    checkpoint folder (a Hugging Face run's), its ``crystallab.json``."""
    if Path(path).is_dir():
        f = Path(path) / "crystallab.json"
        try:
            meta = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{f} cannot be read ({exc}); the checkpoint folder is damaged") from None
        return meta if isinstance(meta, dict) else {}
    meta = read_any(Path(path), "cpu", mmap=True).get(META_KEY)
    return dict(meta) if isinstance(meta, dict) else {}


def _read(path: Path, map_location: Any, mmap: bool = False) -> dict[str, Any]:
    """`read_any`, then checked to hold CrystaLLM's ``model`` and ``model_args``."""
    raw = read_any(path, map_location, mmap)
    missing = [k for k in ("model", "model_args") if not isinstance(raw.get(k), dict)]
    if missing:
        raise CheckpointError(
            f"{path} is not a CrystaLLM/crystallab checkpoint: it lacks {' and '.join(missing)} "
            f"(top-level keys: {sorted(map(str, raw))})"
        )
    return raw


def _clean_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if not _MASK_BUFFER.search(key):
            out[key] = tensor
    return out


def vocab_problem(path: Path, model_args: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Why this checkpoint's vocabulary does not match ours, or None when it does.

    Upstream checkpoints carry no fingerprint; they are accepted when ``vocab_size`` is 371 (CrystaLLM's). A
    family that appends ids after the 371 (masked diffusion's ``<mask>``) lists them in ``meta["added_tokens"]``.
    """
    found = meta.get("vocab_fingerprint")
    if found is not None and found != vocab_fingerprint():
        return (
            f"{path} was trained with a different vocabulary (fingerprint {str(found)[:12]}..., ours "
            f"{vocab_fingerprint()[:12]}...): its token ids mean other tokens here; use a checkpoint trained "
            "with the CrystaLLM vocabulary"
        )
    size = model_args.get("vocab_size")
    added = len(meta.get("added_tokens") or ())  # ids a family appends after the base vocabulary (a mask token)
    if size != VOCAB_SIZE + added:
        return (
            f"{path} has vocab_size {size} but the CrystaLLM vocabulary has {VOCAB_SIZE} tokens; this lab can "
            "only use checkpoints trained with CrystaLLM's 371-token vocabulary"
        )
    return None


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (keys sorted; wrapper prefixes ignored)."""
    h = hashlib.sha256()
    for key, tensor in sorted(_clean_state_dict(state).items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_problem(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
    """Why these weights must not be used (corrupted bytes, NaN or infinite values), or None.

    The recorded ``weights_sha256`` (our checkpoints) catches any changed byte of the weights; the finiteness
    check also covers upstream files, which record no digest, and a run whose training diverged.
    """
    recorded = meta.get("weights_sha256")
    if recorded is not None and recorded != weights_sha256(state):
        return (f"{path} is corrupted: its weights do not match the SHA-256 recorded when it was saved; use "
                "another checkpoint (a run keeps ckpt/last.pt and ckpt/best.pt) or copy the file again")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return (f"{path} holds NaN or infinite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                "the training that wrote it diverged or the file is damaged: use an earlier checkpoint")
    return None


def _shape_problem(path: Path, model_args: dict[str, Any], state: dict[str, torch.Tensor]) -> str | None:
    """Why the weights cannot load strictly into the GPT that ``model_args`` describe, or None."""
    try:
        config = GPTConfig.from_model_args(model_args)
    except ConfigError as exc:
        return f"{path} has unusable model_args: {exc}"
    expected = state_dict_shapes(config)
    args = (
        f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
        f"block_size={config.block_size}, bias={config.bias}"
    )
    for key, shape in expected.items():
        if key not in state:
            return f"{path} lacks weight {key}, which model_args ({args}) require; the file is incomplete"
        if tuple(state[key].shape) != shape:
            return (
                f"{path}: {key} has shape {tuple(state[key].shape)} but model_args ({args}) imply {shape}; "
                "the weights and model_args disagree: re-save the checkpoint with the model_args it was trained with"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        return (
            f"{path} holds weights this model does not have ({', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''}); it was saved from a different architecture"
        )
    return None


def _structure_problem(path: Path, model_args: dict[str, Any], state: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> str | None:
    """`_shape_problem` for a whole model; for a LoRA adapter checkpoint (``meta["lora"]``), that it holds only
    adapter weights and names its base (the adapter's fit is checked when it is applied to the base)."""
    lora = meta.get("lora")
    if not lora:
        return _shape_problem(path, model_args, state)
    base = lora.get("base") if isinstance(lora, dict) else None
    if not isinstance(base, dict) or not base.get("path") or not base.get("sha256"):
        return f"{path} is a LoRA adapter checkpoint without the path and sha256 of its base; it cannot be used"
    foreign = sorted(k for k in state if ".lora_" not in k)
    if foreign:
        return f"{path} is a LoRA adapter checkpoint but holds non-adapter weights ({', '.join(foreign[:3])})"
    return None


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, check: bool = True, mmap: bool = False
) -> Checkpoint:
    """Read a checkpoint without executing code and check it fits our vocabulary and its own ``model_args``.

    Args:
        path: A ``.pt`` file (CrystaLLM's ``ckpt.pt`` or ours).
        map_location: Where tensors are placed, as for ``torch.load``.
        check: Check vocabulary and tensor shapes (``checkpoint_info`` turns this off to report problems).
        mmap: Memory-map the file instead of reading it: tensors are paged in when touched, so optimizer
            state that is never used costs no memory. Only for files nobody rewrites in place (ours are
            replaced by rename, which is safe).

    Raises:
        CheckpointError: missing or unreadable file, pickled code, missing ``model``/``model_args``, a foreign
            vocabulary, weights whose shapes disagree with ``model_args``, or corrupted / non-finite weights.
    """
    path = Path(path)
    raw = _read(path, map_location, mmap=mmap)
    return _to_checkpoint(path, raw, check)


def _to_checkpoint(path: Path, raw: dict[str, Any], check: bool) -> Checkpoint:
    model_args = dict(raw["model_args"])
    meta = dict(raw.get(META_KEY) or {})
    state = _clean_state_dict(raw["model"])
    if check:
        problem = (vocab_problem(path, model_args, meta) or _structure_problem(path, model_args, state, meta)
                   or weights_problem(path, state, meta))
        if problem:
            raise CheckpointError(problem)
    best = raw.get("best_val_loss")
    if isinstance(best, torch.Tensor):  # upstream stores the loss tensor itself
        best = best.item()
    return Checkpoint(
        model_args=model_args,
        state_dict=state,
        iter_num=int(raw.get("iter_num") or 0),
        best_val_loss=None if best is None else float(best),
        config=dict(raw.get("config") or {}),
        meta=meta,
        optimizer_state=raw.get("optimizer"),
        extra={k: v for k, v in raw.items() if k not in _STANDARD_KEYS},
        path=path,
        keys=[str(k) for k in raw],
    )


def cli_checkpoint_path(arg: str | os.PathLike) -> Path:
    """A ``--ckpt`` argument as the sampling commands read it: as given when it exists (or is absolute), else
    relative to the runs root (``train/RUN/ckpt/best.pt``)."""
    from engine.lab.settings import get_settings

    path = Path(arg).expanduser()
    if not path.is_absolute() and not path.exists():
        path = get_settings().runs_dir / path
    return path


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Checkpoint]:
    """Build the `GPT` a checkpoint describes, load its weights strictly, and return it in eval mode.

    Args:
        path: Checkpoint file.
        device: Where the model goes.
        dtype: Parameter dtype (e.g. ``torch.bfloat16`` for inference); None keeps the stored one.

    Raises:
        CheckpointError: as `load_checkpoint`.
    """
    # Memory-mapped: of a CrystaLLM small ckpt.pt (311 MB) only the ~100 MB of weights are ever read.
    ckpt = load_checkpoint(path, mmap=True)
    require_gpt(ckpt, Path(path))
    if ckpt.meta.get("lora"):  # adapter weights only: load the recorded base, check its sha256, apply the adapter
        from engine.models.lora_checkpoint import build_adapted

        model = build_adapted(ckpt)
    else:
        model = GPT(ckpt.model_config)
        model.load_state_dict(ckpt.state_dict, strict=True)
    ckpt.state_dict = {}  # the weights live in the model now; do not hold a second copy
    model.to(device=device, dtype=dtype)
    return model.eval(), ckpt


def require_gpt(ckpt: Checkpoint, path: Path) -> None:
    """Refuse a checkpoint of another model family (e.g. masked diffusion) where a CrystaLLM GPT is needed.

    Raises:
        CheckpointError: one line naming the file and its family.
    """
    family = ckpt.meta.get("family")
    if family not in (None, DEFAULT_FAMILY):
        raise CheckpointError(f"{path} is a {family} checkpoint, not a CrystaLLM GPT one: use a GPT checkpoint "
                              "here, or a command that loads any family (crystallab sample --ckpt)")


# ----------------------------------------------------------------------------------------------------------------
# Information for the dashboard and sample provenance

_SHA_CACHE: dict[tuple[str, int, int, int], str] = {}


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file, hashed once per (path, inode, mtime, size) in this process.

    The inode is part of the key because `save_checkpoint` replaces files by rename, which gives every new
    version a new inode even when it lands within the file system's mtime resolution.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(p)
    return _SHA_CACHE[key]


_WEIGHTS_CACHE: dict[tuple[str, int, int, int], str | None] = {}


def _cached_weights_problem(path: Path, ckpt: Checkpoint) -> str | None:
    """`weights_problem`, computed once per file version in this process (the dashboard lists checkpoints often)."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _WEIGHTS_CACHE:
        _WEIGHTS_CACHE[key] = weights_problem(path, ckpt.state_dict, ckpt.meta)
    return _WEIGHTS_CACHE[key]


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint: identity, size, step, shape, vocabulary check and provenance.

    Incompatible checkpoints are still described (``vocab_ok`` False, ``problem`` says why); unreadable files
    raise `CheckpointError`.
    """
    path = Path(path).resolve()
    raw = _read(path, "cpu", mmap=True)  # memory-mapped: describing a 300 MB file reads little of it
    ckpt = _to_checkpoint(path, raw, check=False)
    vocab = vocab_problem(path, ckpt.model_args, ckpt.meta)
    problem = (vocab or _structure_problem(path, ckpt.model_args, ckpt.state_dict, ckpt.meta)
               or _cached_weights_problem(path, ckpt))
    # lm_head.weight is the tied wte.weight, so it is not counted twice
    n_params = sum(t.numel() for k, t in ckpt.state_dict.items() if k != "lm_head.weight")
    return {
        "path": str(path),
        "sha256": checkpoint_sha256(path),
        "size_bytes": path.stat().st_size,
        "step": ckpt.iter_num,
        "best_val_loss": ckpt.best_val_loss,
        "n_params": n_params,
        "model_args": _plain(ckpt.model_args, "model_args"),
        "vocab_ok": vocab is None,
        "problem": problem,
        "upstream": ckpt.is_upstream,
        "has_optimizer": ckpt.optimizer_state is not None,
        "weights_sha256": ckpt.meta.get("weights_sha256"),
        "run": ckpt.meta.get("run"),
        "parent": ckpt.meta.get("parent"),
        "data_fingerprint": ckpt.meta.get("data_fingerprint"),
        "created_at": ckpt.meta.get("created_at"),
        "version": ckpt.meta.get("version"),
        "lora": ckpt.meta.get("lora"),
    }


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _cmd_inspect(args: argparse.Namespace) -> int:
    from engine.models.family import get_family, load_family_model, peek_family

    card = get_family(peek_family(args.path)).checkpoint_card(Path(args.path))
    info = {**card["info"], "problem": card["problem"]}
    if card["problem"] is None:  # a usable file: the loaded model describes itself too (read without running code)
        info = {**load_family_model(args.path, "cpu").describe(), **info}
    print(json.dumps(info, indent=2, default=str))
    if info["problem"]:
        print(f"error: {info['problem']}", file=sys.stderr)
        return 2
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab ckpt inspect PATH`` and ``crystallab ckpt merge ADAPTER --out PATH``."""
    ckpt = subparsers.add_parser("ckpt", help="inspect checkpoints")
    sub = ckpt.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    p_inspect = sub.add_parser("inspect", help="print a checkpoint's identity, shape and provenance as JSON")
    p_inspect.add_argument("path", help="checkpoint file (.pt)")
    p_inspect.set_defaults(func=_cmd_inspect)
    from engine.models.lora_checkpoint import add_merge_cli

    add_merge_cli(sub)

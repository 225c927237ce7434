"""Logit distillation as a training objective (``objective: distill``): a small GPT learns from a teacher's logits.

Per token (Hinton), with teacher logits ``z_t``, student logits ``z_s`` and temperature ``T``::

    forward:  L_KD = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
    reverse:  L_KD = T^2 * KL(softmax(z_s / T) || softmax(z_t / T))      (MiniLLM-style, mode seeking)
    total     = kd_alpha * CE(z_s, data) + (1 - kd_alpha) * L_KD

both averaged over the positions that have a target (``y != -1``). ``kd_alpha = 1`` is plain next-token training,
``kd_alpha = 0`` pure distillation. Evaluation batches (``train=False``) return the plain data cross-entropy, so a
distilled run's validation curve and ``best.pt`` are judged on the real validation data, exactly as its
undistilled baseline's.

Where the teacher's logits come from:

- **GPU (or ``kd_topk: 0``)**: the teacher runs on the fly on each batch, full logits.
- **CPU with ``kd_topk: K > 0``**: a disk cache of the teacher's top-K logits per position (`TopKCache`), one file
  per training window, keyed by the window's token ids; the cache folder is keyed by the teacher's sha256, the
  dataset fingerprint, the window length and K (``<runs>/cache/distill/<key>/`` unless ``kd_cache_dir``). A window
  seen again (the next epoch, a resumed run, a second student of the same teacher) is not recomputed.
  *Top-K renormalisation*: the teacher distribution is approximated by the softmax of its K largest logits / T,
  renormalised over those K tokens (the rest get probability 0). Forward KL then sums over the K tokens against
  the student's full log-softmax / T; reverse KL (which needs the teacher's probability wherever the student puts
  mass) renormalises the student over the same K tokens too. K = 16 of 371 keeps > 99.9 % of the mass of a
  trained CrystaLLM teacher in practice; the cache stores raw logits (float16), so T may change between runs.

Families: teacher and student must expose next-token logits over one vocabulary
(`engine.models.family.FamilyModel.has_token_logits`); the student is built as the GPT of ``preset`` /
``n_layer`` / ``n_head`` / ``n_embd``, as a scratch run, or from ``init_ckpt`` when fine-tuning.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.lab.errors import CheckpointError, ConfigError
from engine.models.gpt import VOCAB_SIZE
from engine.train.objectives import Objective, build_gpt

KD_KINDS = ("forward", "reverse")


# ----------------------------------------------------------------------------------------------------------------
# Losses


def _masked_mean(per_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_pos`` (B, T) over positions where ``mask`` (B, T) is true (0 when none is)."""
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 2.0,
            kind: str = "forward", mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL`` between teacher and student at temperature ``T``, mean over positions (nats).

    Args:
        student_logits: (B, T, V) student logits (gradients flow through them).
        teacher_logits: (B, T, V) teacher logits (treated as constants).
        temperature: Softmax temperature T > 0; the T^2 factor keeps gradient sizes comparable across T.
        kind: ``forward`` KL(teacher || student) or ``reverse`` KL(student || teacher).
        mask: (B, T) bool, positions that count (default all).
    """
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)  # (B, T, V)
    if kind == "forward":
        per_pos = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    elif kind == "reverse":
        per_pos = (log_s.exp() * (log_s - log_t)).sum(-1)  # (B, T)
    else:
        raise ConfigError(f"kd_kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    if mask is None:
        mask = torch.ones(per_pos.shape, dtype=torch.bool, device=per_pos.device)
    return t * t * _masked_mean(per_pos, mask)


def kd_loss_topk(student_logits: torch.Tensor, top_values: torch.Tensor, top_index: torch.Tensor, *,
                 temperature: float = 2.0, kind: str = "forward", mask: torch.Tensor | None = None) -> torch.Tensor:
    """`kd_loss` against a teacher known only by its top-K logits (see the module docstring: renormalisation).

    Args:
        student_logits: (B, T, V).
        top_values: (B, T, K) the teacher's K largest logits.
        top_index: (B, T, K) their token ids.
    """
    t = float(temperature)
    log_t = F.log_softmax(top_values.float() / t, dim=-1)  # (B, T, K) renormalised over the K tokens
    z_s = student_logits.float() / t  # (B, T, V)
    if kind == "forward":
        log_s = F.log_softmax(z_s, dim=-1).gather(-1, top_index)  # (B, T, K) student's full log-softmax at the K
        per_pos = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    elif kind == "reverse":
        log_s = F.log_softmax(z_s.gather(-1, top_index), dim=-1)  # (B, T, K) student renormalised over the K
        per_pos = (log_s.exp() * (log_s - log_t)).sum(-1)  # (B, T)
    else:
        raise ConfigError(f"kd_kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    if mask is None:
        mask = torch.ones(per_pos.shape, dtype=torch.bool, device=per_pos.device)
    return t * t * _masked_mean(per_pos, mask)


def total_loss(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * CE + (1 - alpha) * L_KD`` (``L_KD`` already carries its T^2)."""
    return alpha * ce + (1.0 - alpha) * kd


# ----------------------------------------------------------------------------------------------------------------
# Teacher checks (config time) and the top-K cache


def teacher_problem(path: str | os.PathLike, student_vocab: int = VOCAB_SIZE) -> str | None:
    """Why ``path`` cannot teach a student of ``student_vocab`` tokens (one line), or None when it can.

    Checks, without building a model: the file loads as a checkpoint, its family exposes next-token logits, and
    its vocabulary has ``student_vocab`` tokens.
    """
    from engine.models.checkpoint import read_any
    from engine.models.family import get_family, peek_family

    path = Path(path)
    try:
        family = peek_family(path)
        cls = get_family(family)
        raw = read_any(path, "cpu", mmap=True)
    except CheckpointError as exc:
        return f"teacher_ckpt cannot be loaded: {exc}"
    if not cls.has_token_logits():
        return (f"teacher_ckpt {path} is a {family} model, which gives no next-token logits: distillation is not "
                "supported for that family; choose a GPT (crystallm-gpt) teacher")
    vocab = (raw.get("model_args") or {}).get("vocab_size", VOCAB_SIZE)
    if int(vocab) != int(student_vocab):
        return (f"teacher_ckpt {path} has a {vocab}-token vocabulary but the student has {student_vocab}: teacher "
                "and student vocabularies differ; distil from a teacher trained with the CrystaLLM vocabulary")
    return None


def check_distill_config(config: Any, source: str = "config") -> None:
    """`engine.train.config.validate`'s distillation part: one-line `ConfigError` on a bad key or teacher."""
    c = config
    if c.objective != "distill":
        if c.teacher_ckpt is not None:
            raise ConfigError(f"{source}: teacher_ckpt is only read with objective: distill; remove it or set "
                              "objective: distill")
        return
    if not 0.0 <= c.kd_alpha <= 1.0:
        raise ConfigError(f"{source}: kd_alpha must be in [0, 1] (weight of the data cross-entropy), got {c.kd_alpha}")
    if c.kd_temperature <= 0:
        raise ConfigError(f"{source}: kd_temperature must be positive (1-2 suits small LMs), got {c.kd_temperature}")
    if c.kd_kind not in KD_KINDS:
        raise ConfigError(f"{source}: kd_kind must be one of {', '.join(KD_KINDS)}, got {c.kd_kind!r}")
    if c.kd_topk < 0 or c.kd_topk > VOCAB_SIZE:
        raise ConfigError(f"{source}: kd_topk must be 0 (no cache) to {VOCAB_SIZE}, got {c.kd_topk}")
    if c.teacher_ckpt is None:
        raise ConfigError(f"{source}: objective: distill needs teacher_ckpt (the checkpoint to learn from, e.g. "
                          "train/demo_cpu/ckpt/best.pt)")
    if c.init_from == "resume":
        return  # the teacher was checked when the run started; build() checks it again
    from engine.train.config import resolve_ckpt_path

    problem = teacher_problem(resolve_ckpt_path(c.teacher_ckpt))
    if problem:
        raise ConfigError(f"{source}: {problem}")
    if c.init_from == "finetune" and c.init_ckpt is not None:
        from engine.models.family import get_family, peek_family

        try:
            family = peek_family(resolve_ckpt_path(c.init_ckpt))
        except CheckpointError:
            return  # the fine-tune loader reports an unreadable init_ckpt in its own words
        if not get_family(family).has_token_logits():
            raise ConfigError(f"{source}: init_ckpt is a {family} model: distilling into that family is not "
                              "supported; start the student from a GPT checkpoint or from scratch")


class TopKCache:
    """The teacher's top-K logits per position of each training window, on disk, keyed by the window's tokens.

    One ``.npz`` per window (``values`` float16 (T, K), ``index`` int16 (T, K)) under ``folder/ab/<hash>.npz``,
    written atomically. ``hits`` / ``misses`` count windows served from disk / computed by the teacher.
    """

    def __init__(self, folder: Path, k: int) -> None:
        self.folder, self.k = Path(folder), int(k)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def _path(self, row: np.ndarray) -> Path:
        key = hashlib.blake2b(row.astype(np.int64).tobytes(), digest_size=16).hexdigest()
        return self.folder / key[:2] / f"{key}.npz"

    def lookup(self, x: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (B, T, K) float32, index (B, T, K) int64) for windows ``x`` (B, T); missing rows are computed
        with ``teacher(x_missing) -> (b, T, V)`` logits in one batch and stored."""
        rows = x.cpu().numpy()
        paths = [self._path(r) for r in rows]
        values = np.zeros((*rows.shape, self.k), dtype=np.float32)
        index = np.zeros((*rows.shape, self.k), dtype=np.int64)
        missing = []
        for i, p in enumerate(paths):
            try:
                with np.load(p) as f:
                    values[i], index[i] = f["values"], f["index"]
                self.hits += 1
            except (FileNotFoundError, OSError, KeyError, ValueError):
                missing.append(i)  # absent, or a file a killed writer left unreadable: recompute
        if missing:
            self.misses += len(missing)
            logits = teacher(x[missing])  # (b, T, V)
            top = torch.topk(logits.float(), self.k, dim=-1)
            v = top.values.to(torch.float16).cpu().numpy()  # (b, T, K)
            ix = top.indices.to(torch.int16).cpu().numpy()  # (b, T, K)
            for j, i in enumerate(missing):
                values[i], index[i] = v[j].astype(np.float32), ix[j]
                self._save(paths[i], v[j], ix[j])
        dev = x.device
        return torch.from_numpy(values).to(dev), torch.from_numpy(index).to(dev)

    @staticmethod
    def _save(path: Path, values: np.ndarray, index: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, values=values, index=index)
        os.replace(tmp, path)


def cache_key(teacher_sha: str, data_fingerprint: str, window: int, k: int) -> str:
    """Name of a cache folder: teacher + dataset + window plan + K (any change gives a new folder)."""
    return f"t{teacher_sha[:16]}-d{data_fingerprint[:16]}-w{window}-k{k}"


# ----------------------------------------------------------------------------------------------------------------
# The objective


class DistillObjective(Objective):
    """Next-token training of a GPT student plus the teacher's logits (see the module docstring)."""

    name = "distill"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.teacher: Any = None
        self.cache: TopKCache | None = None
        self.teacher_path: Path | None = None
        self.teacher_sha: str | None = None
        self.data_fingerprint: str | None = None
        self.use_cache = False
        self.teacher_calls = 0
        """Batches the teacher actually ran on (cache misses included); tests and logs read it."""

    def build(self, config: Any, ckpt: Any | None, info: Callable[..., None]) -> torch.nn.Module:
        from engine.data.datasets import resolve_dataset_dir
        from engine.data.tokens import load_token_dataset
        from engine.models.checkpoint import checkpoint_sha256
        from engine.models.family import load_family_model
        from engine.train.config import resolve_ckpt_path
        from engine.train.setup import resolve_device

        self.config = config
        path = resolve_ckpt_path(config.teacher_ckpt)
        problem = teacher_problem(path)
        if problem:
            raise ConfigError(problem)
        device = resolve_device(config)
        self.teacher = load_family_model(path, device)
        self.teacher_path, self.teacher_sha = path, checkpoint_sha256(path)
        self.use_cache = device.type == "cpu" and config.kd_topk > 0
        self.data_fingerprint = load_token_dataset(resolve_dataset_dir(config.dataset)).fingerprint
        student = build_gpt(config, ckpt, info)
        t_params = int(self.teacher.describe().get("n_params") or 0)
        info("distilling from %s (%s parameters, %s KL, T %.2g, alpha %.2g, %s)", path, f"{t_params:,}",
             config.kd_kind, config.kd_temperature, config.kd_alpha,
             f"top-{config.kd_topk} cache on disk" if self.use_cache else "teacher logits on the fly")
        return student

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher_calls += 1
        block = int(self.teacher.describe().get("block_size") or x.shape[1])
        if x.shape[1] > block:
            raise ConfigError(f"training windows of {x.shape[1]} tokens exceed the teacher's context of {block}; "
                              f"set block_size to at most {block}")
        return self.teacher.token_logits(x).to(x.device)  # (B, T, V)

    def _cache_for(self, window: int) -> TopKCache:
        if self.cache is None:
            from engine.lab.settings import get_settings

            c = self.config
            key = cache_key(self.teacher_sha or "", self.data_fingerprint or "", window, c.kd_topk)
            root = (Path(c.kd_cache_dir).expanduser() if c.kd_cache_dir
                    else get_settings().runs_dir / "cache" / "distill")
            self.cache = TopKCache(root / key, c.kd_topk)
        return self.cache

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, step: int, train: bool
             ) -> torch.Tensor:
        logits, ce = model(x, y)  # (B, T, V), scalar
        if not train:
            return ce  # validation is judged on the real data alone, as the baseline is
        c, mask = self.config, y != -1  # (B, T)
        if c.kd_alpha >= 1.0:
            return ce
        with torch.no_grad():
            if self.use_cache:
                values, index = self._cache_for(x.shape[1]).lookup(x, self._teacher_logits)  # (B, T, K) x2
            else:
                teacher = self._teacher_logits(x)  # (B, T, V)
        if self.use_cache:
            kd = kd_loss_topk(logits, values, index, temperature=c.kd_temperature, kind=c.kd_kind, mask=mask)
        else:
            kd = kd_loss(logits, teacher, temperature=c.kd_temperature, kind=c.kd_kind, mask=mask)
        return total_loss(ce, kd, c.kd_alpha)

    def checkpoint_fields(self) -> dict[str, Any]:
        c = self.config
        return {"distill": {"teacher": str(self.teacher_path), "teacher_sha256": self.teacher_sha,
                            "kd_kind": c.kd_kind, "kd_temperature": c.kd_temperature, "kd_alpha": c.kd_alpha,
                            "kd_topk": c.kd_topk if self.use_cache else 0,
                            "cache": str(self.cache.folder) if self.cache else None}}

    def describe(self) -> str:
        c = self.config
        return f"distill ({c.kd_kind} KL, T {c.kd_temperature:g}, alpha {c.kd_alpha:g}) from {c.teacher_ckpt}"


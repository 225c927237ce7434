"""Preparing a training run: the dataset, the checkpoint to start from, and the run folder.

Resolves where a run writes (a new folder, or the one it resumes) and takes it for this process (`engine.lab.runs`
ownership, cleaning what a killed writer left), checks that a resume or fine-tune can go on exactly (same batch
identity keys, same token data, the checkpoint's shape), and answers ``crystallab train --check`` (`check_config`)
without training or writing anything. The training loop itself is `engine.train.trainer`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.lab.errors import ConfigError, InputError
from engine.lab.fsutil import check_writable, remove_stale_temporaries, sha256_file, writable_problem
from engine.lab.jobs import describe_holder, folder_holder
from engine.lab.runs import RunFolder
from engine.lab.settings import get_settings
from engine.models.checkpoint import load_checkpoint
from engine.models.gpt import GPTConfig
from engine.train.batches import plan_context
from engine.train.config import (
    TrainConfig,
    resolve_ckpt_path,
    resolve_run_dir,
)
from engine.train.objectives import objective_for
from engine.train.setup import (
    RESUME_IDENTITY_KEYS,
    Dist,
    check_resources,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger("engine.train.trainer")  # the trainer's logger: these lines reach its log.txt


def _process_start_time() -> float:
    """When this process started, in seconds since the epoch (Linux ``/proc``; elsewhere: when this module loaded)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


_PROCESS_STARTED = _process_start_time()  # a STOP file older than this was left by an earlier process


def open_dataset(name: str, dist: Dist) -> Any:
    """Open the token dataset; the built-in corpus is built on first use (as `crystallab data corpus`)."""
    from engine.data.datasets import build_dataset, resolve_dataset_dir
    from engine.data.tokens import load_token_dataset

    path = resolve_dataset_dir(name)
    if name == "builtin" and not path.exists() and dist.is_main:
        log.info("building the built-in corpus dataset in %s (first use)", path)
        build_dataset(["builtin"], path, dedup=False)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return load_token_dataset(path)


def resolve_sources(config: TrainConfig, run_dir: str | Path | None,
                     dist: Dist) -> tuple[TrainConfig, RunFolder | None, Any, dict | None]:
    """(resolved config, run folder, source checkpoint, parent record); only rank 0 touches the folder."""
    if dist.is_main:
        config, run, ckpt, parent = _prepare(config, run_dir)
    else:
        run, parent = None, None
    if dist.world_size > 1:
        box = [config]
        torch.distributed.broadcast_object_list(box, src=0)
        config = box[0]
        if not dist.is_main:
            if config.init_from == "resume":
                objective = objective_for(config)
                ckpt = objective.load_resume(objective.last_checkpoint(Path(config.out_dir or ".") / "ckpt"))
            elif config.init_from == "finetune":
                ckpt = load_checkpoint(resolve_ckpt_path(config.init_ckpt or "."))
            else:
                ckpt = None
    return config, run, ckpt, parent


def _prepare(config: TrainConfig, run_dir: str | Path | None, *,
             create: bool = True) -> tuple[TrainConfig, RunFolder, Any, dict | None]:
    """Rank 0: resolve the run folder, the source checkpoint and the model shape.

    Args:
        create: Create the new run folder; false (``--check``) only checks that it could be created. A new run
            without ``run_dir`` / ``out_dir`` then gets a placeholder ``<runs>/train/<time>-<name>`` path.
    """
    if config.init_from == "resume":
        run = RunFolder(resolve_run_dir(run_dir or config.out_dir, existing=True))  # type: ignore[arg-type]
        last = objective_for(config).last_checkpoint(run.ckpt_dir)
        if not last.exists():
            raise ConfigError(f"cannot resume {run.path}: it has no ckpt/{last.name} (the run stopped before its "
                              "first checkpoint); start a new run instead (delete this folder or choose another "
                              "--run-dir)")
        _own(run, create)
        try:
            return _prepare_resume(config, run, last, create)
        except BaseException:
            run.release()
            raise
    ckpt = parent = None
    if config.init_from == "finetune":
        src = resolve_ckpt_path(config.init_ckpt)  # type: ignore[arg-type]
        ckpt = load_checkpoint(src, mmap=True)  # only the weights are read: the source's AdamW state stays on disk
        config = _finetune_shape(config, ckpt, src)
        parent = {"path": str(src), "sha256": sha256_file(src), "step": int(ckpt.iter_num),
                  "run": (getattr(ckpt, "meta", None) or {}).get("run")}
    target = run_dir or config.out_dir
    if target is not None:
        run = RunFolder(resolve_run_dir(target))
        _check_new_run_dir(run.path, target)
        if create:
            try:
                run.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot create the run folder {run.path} ({exc.strerror}); choose another "
                                 "--run-dir / out_dir") from None
        elif (problem := writable_problem(run.path)) is not None:
            raise InputError(f"cannot create the run folder {run.path}: {problem}; choose another --run-dir / out_dir")
    elif create:
        try:
            run = RunFolder.create(config.name, root=get_settings().train_dir)
        except OSError as exc:
            raise InputError(f"cannot create a run folder under {get_settings().train_dir} ({exc.strerror}); "
                             "choose a writable --run-dir / out_dir") from None
    else:
        run = RunFolder(get_settings().train_dir / f"<YYYYmmdd-HHMMSS>-{config.name}")
        if (problem := writable_problem(run.path.parent)) is not None:
            raise InputError(f"cannot create a run folder under {run.path.parent}: {problem}; choose a writable "
                             "--run-dir / out_dir")
        return config, run, ckpt, parent
    _own(run, create)
    return replace(config, out_dir=str(run.path)), run, ckpt, parent


def _own(run: RunFolder, create: bool) -> None:
    """Take the run folder for this process, clean what a killed writer left, and check checkpoints can be saved.

    With ``create`` false (``--check``) nothing is taken or written: a folder held by a live process is refused
    all the same, and ``ckpt/`` is probed without being created.

    Raises:
        InputError: another live process trains in the folder (named), or ``ckpt/`` cannot be written.
    """
    hint = "choose a writable --run-dir / out_dir, or fix the folder's permissions"
    if not create:
        holder = folder_holder(run.path)
        if holder is not None:
            raise InputError(f"run folder {run.path} is in use by {describe_holder(holder)}; wait for that run to "
                             "finish or stop it")
        if run.path.exists() and (problem := writable_problem(run.ckpt_dir)) is not None:
            raise InputError(f"checkpoints cannot be saved: {problem}; {hint}")
        return
    lock = run.acquire()
    try:
        if lock.previous and lock.previous.get("pid") != os.getpid():
            log.info("took over %s from %s, which is no longer running", run.path, describe_holder(lock.previous))
        for tmp in remove_stale_temporaries(run.ckpt_dir) + remove_stale_temporaries(run.path):
            log.info("removed %s, left by a process killed while writing it", tmp)
        check_writable(run.ckpt_dir, "the checkpoint folder", hint)
    except BaseException:
        run.release()
        raise


def _prepare_resume(config: TrainConfig, run: RunFolder, last: Path,
                    create: bool) -> tuple[TrainConfig, RunFolder, Any, dict | None]:
    """The resume half of `_prepare`, once the run folder is owned."""
    saved = run.config()
    changed = [k for k in RESUME_IDENTITY_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        raise ConfigError(
            f"cannot resume {run.path} with different {', '.join(changed)} "
            f"(the run has {', '.join(f'{k}={saved[k]!r}' for k in changed)}): its batches would not line up. "
            "Fine-tune from its ckpt/last.pt instead"
        )
    ckpt = objective_for(config).load_resume(last, mmap=not create)
    if int(ckpt.iter_num) >= config.max_iters:
        raise ConfigError(f"{run.path} already reached step {ckpt.iter_num}; raise max_iters to train further "
                          f"(e.g. --set max_iters={int(ckpt.iter_num) * 2})")
    parent = {"path": str(last), "sha256": getattr(ckpt, "sha256", None) or sha256_file(last),
              "step": int(ckpt.iter_num)}
    return replace(config, out_dir=str(run.path)), run, ckpt, parent


def _finetune_shape(config: TrainConfig, ckpt: Any, src: Path) -> TrainConfig:
    """A fine-tune keeps the checkpoint's shape and may crop, never extend, its context.

    Raises:
        ConfigError: the config names another shape, or a ``block_size`` above the checkpoint's (in tokens).
    """
    shape = GPTConfig.from_model_args(ckpt.model_args)
    wrong = [k for k in ("n_layer", "n_head", "n_embd") if getattr(config, k) not in (None, getattr(shape, k))]
    if wrong:
        raise ConfigError(
            f"{src} has {', '.join(f'{k}={getattr(shape, k)}' for k in wrong)}; a fine-tune keeps the "
            f"checkpoint's shape, so remove {', '.join(wrong)} from the config"
        )
    if config.block_size is not None and config.block_size > shape.block_size:
        raise ConfigError(f"block_size={config.block_size} exceeds the context of {src} ({shape.block_size} tokens); "
                          f"a fine-tune can keep or crop it, not extend it: choose 8 to {shape.block_size}")
    return replace(config, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, bias=shape.bias,
                   block_size=config.block_size or shape.block_size)


def _check_new_run_dir(path: Path, typed: str | Path) -> None:
    """Refuse a new run's folder that is a file, lies under a file, or already holds a run."""
    named = f"run folder {typed}" + (f" ({path})" if Path(typed) != path else "")
    if path.exists() and not path.is_dir():
        raise InputError(f"{named} is a file, not a folder; choose another --run-dir / out_dir")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{named} lies under {parent}, which is a file; choose another --run-dir / out_dir")
            break
    if (path / "config.yaml").exists():
        if (path / "ckpt" / "last.pt").exists():
            raise ConfigError(f"{path} already holds a run; choose another out_dir, or continue it with "
                              f"`crystallab train --resume {path}`")
        raise ConfigError(f"{path} already holds a run that stopped before its first checkpoint; delete that "
                          "folder to start it again, or choose another out_dir")


def check_resume_data(config: TrainConfig, ckpt: Any, ds: Any) -> None:
    """A resumed run must read the tokens it started with, or its batches would not line up."""
    recorded = (getattr(ckpt, "meta", None) or {}).get("data_fingerprint")
    if recorded and recorded != ds.fingerprint:
        raise ConfigError(f"the dataset {ds.path} changed since {config.out_dir} started (its token "
                          "fingerprint differs), so the run cannot continue exactly; fine-tune from its "
                          "ckpt/last.pt instead")


def clear_stale_stop(run: RunFolder) -> None:
    """Remove a ``STOP`` left by an earlier, killed process; keep one written for this run while it started.

    The dashboard's stop button may write ``STOP`` while the run is still starting; that request must hold.
    """
    try:
        stale = run.stop_path.stat().st_mtime < _PROCESS_STARTED
    except FileNotFoundError:
        return
    if stale:
        run.clear_stop()


def check_config(config: TrainConfig, run_dir: str | Path | None = None) -> tuple[TrainConfig, list[str]]:
    """What `train` would refuse, found without training or writing anything (``crystallab train --check``).

    Opens the dataset (exists, vocabulary, token ids) and the checkpoint to start from (readable with
    ``weights_only``, same vocabulary, weights that match its shape, its context in tokens), checks the run
    folder and the device, and resolves the model shape and context the run would use.

    Returns:
        (the config the run would write to ``config.yaml``, notes for the user: dataset, start, folder, device).

    Raises:
        ConfigError, CheckpointError, InputError: as `train` would at its start.
    """
    from engine.data.datasets import resolve_dataset_dir
    from engine.data.tokens import load_token_dataset

    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    notes: list[str] = []
    ds_path = resolve_dataset_dir(config.dataset)
    ds = None
    if config.dataset == "builtin" and not ds_path.exists():
        notes.append(f"dataset: {ds_path} is not built yet; the run builds the built-in corpus first (minutes, once)")
    else:
        ds = load_token_dataset(ds_path)
        notes.append(f"dataset: {ds.path} ({len(ds.train):,} training and {len(ds.val):,} validation tokens)")
    config, run, ckpt, parent = _prepare(config, run_dir, create=False)
    if parent is not None:
        notes.append(f"starts from: {parent['path']} (step {parent['step']})")
    if ds is not None:
        if config.init_from == "resume":
            check_resume_data(config, ckpt, ds)
        plan = plan_context(config.block_size, len(ds.train), len(ds.val),
                            can_lower_model=config.init_from == "scratch")
        config = replace(config, block_size=plan.model_block_size)
        if plan.message:
            notes.append(f"context: {plan.message}")
    notes.append(f"run folder: {run.path}" + ("" if config.init_from == "resume" else " (new)"))
    notes.append(f"device: {device} ({dtype})")
    notes.append(check_resources(config, device, dtype))
    return config, notes

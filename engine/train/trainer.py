"""Training runs: scratch, fine-tune and resume, with checkpoints and records a user can trust; CLI ``train``.

Modes (``init_from``):

- ``scratch``: a new model shaped by ``preset`` / ``n_layer`` ... .
- ``finetune``: the weights of ``init_ckpt`` (ours or CrystaLLM's ``ckpt.pt``), a fresh optimizer, step 0, its own
  warmup + cosine schedule; the source checkpoint is only read. A smaller ``block_size`` crops the position table.
  Continued pretraining on a token subset (the seeds' "mix10000") is a fine-tune with ``max_iters`` = the budget.
- ``resume``: continue an interrupted run in its own folder: weights, optimizer, loss scaler, early-stopping state
  and schedule position come from ``ckpt/last.pt``; batches and dropout are drawn from ``(seed, step)``, so the
  resumed losses are those the uninterrupted run would have had.

Every evaluation (and the end, and a stop) writes ``ckpt/last.pt``; a validation improvement also makes it
``ckpt/best.pt``. Checkpoints are written atomically (temporary file + rename), so a kill at any moment leaves a
loadable ``last.pt``. A ``STOP`` file in the run folder, SIGINT or SIGTERM make the trainer finish its step, save
and exit with state ``stopped``; before the first step (opening the data, building the model, the step-0
evaluation) they end the run at once, also as ``stopped``, and the status says whether a checkpoint exists.
An exception leaves state ``failed`` with the error, and the last good checkpoint.
A dataset too small for the context is trained with shorter windows (`engine.train.batches.plan_context`); the run's
log and ``status.json`` say so.
Opening the dataset and the checkpoint to start from, taking the run folder and ``--check`` are
`engine.train.preparation`.

Multi-GPU, same config, one process per GPU (rank 0 writes the run folder)::

    torchrun --standalone --nproc_per_node=4 -m engine train configs/crystallm_v1_small.yaml

``gradient_accumulation_steps`` counts micro-batches over all GPUs, so the effective batch does not change with
the number of GPUs (it must be a multiple of it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.lab.errors import ConfigError, CrystallabError
from engine.lab.runs import RunFolder
from engine.train.batches import ContextPlan, derive_seed, plan_context
from engine.train.config import (
    TrainConfig,
    dump_config,
    field_docs,
    load_config,
)
from engine.train.objectives import objective_for
from engine.train.preparation import check_config, check_resume_data, clear_stale_stop, open_dataset, resolve_sources
from engine.train.setup import (
    Dist,
    SignalStop,
    StopFlag,
    StopRequested,
    Tracker,
    apply_freezing,
    check_resources,
    lr_at,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger("engine.train.trainer")


def train(
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    progress: bool = True,
    stop_event: StopFlag | None = None,
) -> Path:
    """Train as ``config`` says and return the run folder.

    Args:
        config: A validated config (`engine.train.config.load_config`).
        run_dir: Run folder to create (or to resume); default ``out_dir`` or a new ``runs/train/<time>-<name>``.
        progress: Show a tqdm progress bar (loss, learning rate, ETA) on stderr.
        stop_event: Anything with ``is_set()`` (e.g. ``threading.Event``); checked every step, like ``STOP``.

    Raises:
        ConfigError: the config, dataset or checkpoint cannot be used together (nothing is trained).
        CheckpointError: ``init_ckpt`` cannot be loaded.
        InputError: the dataset folder or the run folder cannot be used.
        StopRequested: SIGINT / SIGTERM arrived before the run folder existed (nothing was written). A stop
            after that returns normally with state ``stopped``.
    """
    dist = Dist.from_env()
    # Signals are caught from the start: a stop while the data opens, the model builds or the step-0 evaluation
    # runs (minutes on a large model) must end as "stopped", not kill the process under a "running" status.
    with SignalStop(immediate=True) as signals:
        if dist.world_size > 1 and not torch.distributed.is_initialized():
            use_nccl = torch.cuda.is_available() and config.device != "cpu"
            torch.distributed.init_process_group(backend="nccl" if use_nccl else "gloo")
        session = _Session(config, run_dir, dist, stop_event, progress, signals)
        try:
            return session.run()
        finally:
            session.close()


class _Session:
    """One training process: sources, model, optimizer, samplers and the run folder it reports to."""

    def __init__(self, config: TrainConfig, run_dir: str | Path | None, dist: Dist, stop_event: StopFlag | None,
                 progress: bool, signals: SignalStop) -> None:
        self.dist, self.main, self.stop_event, self.progress = dist, dist.is_main, stop_event, progress
        self.signals, self.phase = signals, "setup"
        self.device = resolve_device(config, dist)
        self.dtype = resolve_dtype(config, self.device)
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before any collective: NCCL uses the current device
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores (~1e-3 relative)
            torch.backends.cudnn.allow_tf32 = True
        if config.gradient_accumulation_steps % dist.world_size:
            raise ConfigError(
                f"gradient_accumulation_steps ({config.gradient_accumulation_steps}) must be a multiple of the "
                f"number of processes ({dist.world_size}) so the effective batch stays the same"
            )
        self.accum = config.gradient_accumulation_steps // dist.world_size
        self.ds = open_dataset(config.dataset, dist)
        self.handlers: list[logging.Handler] = []
        self.run_folder = None
        if self.main and config.init_from == "scratch":
            check_resources(config, self.device, self.dtype)  # before a folder is made; the context only shrinks
        # Rank 0 resolves everything and creates the folder; the other ranks get the resolved config from it.
        config, self.run_folder, self.ckpt, self.parent = resolve_sources(config, run_dir, dist)
        try:
            self.resuming = config.init_from == "resume"
            if self.resuming and self.main:
                check_resume_data(config, self.ckpt, self.ds)
            self.plan: ContextPlan = plan_context(config.block_size, len(self.ds.train), len(self.ds.val),
                                                  can_lower_model=config.init_from == "scratch")
            self.config = replace(config, block_size=self.plan.model_block_size)
            if self.main:
                check_resources(self.config, self.device, self.dtype)
                self.handlers = _attach_log(self.run_folder)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for h in self.handlers:
            log.removeHandler(h)
            h.close()
        if self.run_folder is not None:
            self.run_folder.release()

    # --- setup ---
    def _build(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)  # weight init
        self.objective = objective_for(c)
        self.model = self.objective.build(c, self.ckpt, self._info)
        self._info("%s; %s non-embedding parameters", apply_freezing(self.model, c), f"{self.model.num_params():,}")
        self.model.to(self.device)
        self.optimizer = self.model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2),
                                                         self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.tracker = Tracker(c.early_stopping_patience, c.early_stopping_min_delta)
        self.start_step = 0
        if self.resuming:
            self.optimizer.load_state_dict(self.ckpt.optimizer_state)
            extra = self.ckpt.extra or {}
            if extra.get("scaler"):
                self.scaler.load_state_dict(extra["scaler"])
            if extra.get("tracker"):
                self.tracker.load_state_dict(extra["tracker"])
            self.start_step = int(self.ckpt.iter_num)
        self.ckpt = None  # the weights live in the model now; drop the checkpoint's copy
        self.fwd = torch.compile(self.model) if c.compile else self.model
        self.step_model = self.fwd
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_model = DDP(self.fwd, device_ids=ids)
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.dtype))
                         if self.dtype != "float32" else nullcontext())

        starts = self.ds.train_starts if c.starts_only else None
        sampler = self.objective.sampler
        self.train_sampler = sampler(self.ds, "train", self.plan.train_window, c.batch_size, c.seed, starts)
        self.eval_samplers = {"train": self.train_sampler}
        if self.plan.val_window:
            self.eval_samplers["val"] = sampler(self.ds, "val", self.plan.val_window, c.batch_size, c.seed,
                                                self.ds.val_starts if c.starts_only else None)
        self.tokens_per_step = c.batch_size * self.plan.train_window * c.gradient_accumulation_steps
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # --- pieces of the loop ---
    def _info(self, msg: str, *args: Any) -> None:
        if self.main:
            log.info(msg, *args)

    @torch.no_grad()
    def estimate(self) -> dict[str, float]:
        """Mean loss per split over ``eval_iters`` fixed batches (the same windows at every evaluation)."""
        self.fwd.eval()
        out = {}
        for split, sampler in self.eval_samplers.items():
            losses = []
            for k in range(self.config.eval_iters):
                if self.signals.immediate:
                    self._stop_during_setup()  # the step-0 evaluation of a large model can take minutes
                x, y = sampler.batch("eval", split, k, device=self.device)
                with self.autocast:
                    losses.append(self.objective.loss(self.fwd, x, y, step=k, train=False).float())
            out[split] = torch.stack(losses).mean().item()
        self.fwd.train()
        return out

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step; returns (mean micro-batch loss, gradient norm before clipping, lr), on device."""
        c = self.config
        lr = lr_at(step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(derive_seed(c.seed, "dropout", step, self.dist.rank))  # dropout is a function of step
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.train_sampler.batch("train", step, micro, self.dist.rank, device=self.device)  # (B, T)
            last = micro == self.accum - 1
            sync = self.step_model.no_sync() if self.dist.world_size > 1 and not last else nullcontext()
            with sync, self.autocast:
                loss = self.objective.loss(self.step_model, x, y, step=step, train=True) / self.accum  # the mean over micro-batches, not their sum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, lr

    def save(self, name: str, step: int) -> Path:
        meta = {"run": self.run_folder.name, "step": step, "data_fingerprint": self.ds.fingerprint,
                "parent": self.parent, **self.objective.checkpoint_fields()}
        extra = {"mode": self.config.init_from, "tracker": self.tracker.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        return self.objective.save(self.run_folder.ckpt_dir, name, model=self.model, optimizer=self.optimizer,
                                   step=step, best_val_loss=self.tracker.best if math.isfinite(self.tracker.best)
                                   else None, config=self.config.to_dict(), meta=meta, extra=extra)

    def _stop_during_setup(self) -> None:
        """Raise `StopRequested` for a signal caught in a status write, or a ``STOP`` file written during setup.

        ``stop_event`` is left to the loop (checked once per step). With several processes only signals count
        here: rank 0 alone reads the ``STOP`` file, and leaving alone would hang the others in a collective.
        """
        self.signals.raise_if_set()
        if self.main and self.dist.world_size == 1 and self.run_folder.stop_requested():
            raise StopRequested("a STOP request")

    def stop_requested(self, signals: SignalStop) -> bool:
        flag = signals.flag or bool(self.stop_event and self.stop_event.is_set())
        flag = flag or (self.main and self.run_folder.stop_requested())
        return bool(self._all_ranks_max(int(flag)))

    def _all_ranks_max(self, value: int) -> int:
        if self.dist.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def evaluate_and_save(self, step: int, lr: float) -> bool:
        """Evaluate, write last.pt (and best.pt on improvement), update status; return True to stop early."""
        if not self.main:
            return bool(self._all_ranks_max(0))
        run, c = self.run_folder, self.config
        losses = self.estimate()
        improved, early, warning = False, False, ""
        if "val" in losses:
            improved, early, warning = self.tracker.update(step, losses["train"], losses["val"])
            run.log_metrics(step=step, split="val", loss=losses["val"], loss_kind=self.objective.loss_kind,
                            train_loss=losses["train"], lr=lr,
                            elapsed_s=time.time() - self.started)
        last = self.save("last", step)
        fields: dict[str, Any] = {"step": step, "last_ckpt": str(last), "last_ckpt_step": step,
                                  "warning": warning or None}
        best = last.with_name("best" + last.suffix)  # best.pt, or the best/ folder of an HF run
        if improved:
            _link_best(last, best)
            fields.update(best_ckpt=str(best), best_val_loss=self.tracker.best, best_step=step)
        run.write_status(**fields)
        val = f", val {losses['val']:.4f}" if "val" in losses else ""
        log.info("step %d: train %.4f%s%s%s", step, losses["train"], val, _kind_note(self.objective.loss_kind),
                 f" (best so far: {best.name})" if improved else "")
        if warning:
            log.warning("%s", warning)
        if early:
            self.message = (f"early stopping at step {step}: validation loss did not improve by more than "
                            f"{c.early_stopping_min_delta} in {c.early_stopping_patience} evaluations "
                            f"(best {self.tracker.best:.4f} at step {self.tracker.best_step})")
            log.info("%s", self.message)
        return bool(self._all_ranks_max(int(early)))

    # --- the run ---
    def run(self) -> Path:
        self.started = time.time()
        run, c = self.run_folder, self.config
        if self.main:
            with self.signals.deferred():  # the first status is written whole before a stop can be recorded in it
                if not self.resuming:
                    run.write_config(dump_config(c))
                run.write_env(str(self.device), dtype=self.dtype, world_size=self.dist.world_size)
                clear_stale_stop(run)
                run.write_status(state="running", step=None, max_steps=c.max_iters, pid=os.getpid(),
                                 host=socket.gethostname(), device=str(self.device), error=None, warning=None,
                                 message=self.plan.message or f"{c.init_from} run started")
                log.info("%s run in %s on %s (%s)", c.init_from, run.path, self.device, self.dtype)
                if self.plan.message:
                    log.warning("%s", self.plan.message)
        try:
            self._stop_during_setup()
            self.phase = "the model build"
            self._build()
            self._stop_during_setup()
            if self.main:
                run.write_status(step=self.start_step)
            self._loop()
        except BaseException as exc:
            if self.main:
                with self.signals.deferred():
                    self._record_end(exc)
            if isinstance(exc, StopRequested):
                return run.path if run is not None else Path(c.out_dir)  # type: ignore[arg-type]
            raise
        return run.path if run is not None else Path(c.out_dir)  # type: ignore[arg-type]

    def _record_end(self, exc: BaseException) -> None:
        """Rank 0: write the final status and log line of a run that stopped or failed by exception."""
        run = self.run_folder
        if not isinstance(exc, KeyboardInterrupt):
            error = str(exc) if isinstance(exc, CrystallabError) else f"{type(exc).__name__}: {exc}"
            run.write_status(state="failed", error=error, message=f"training failed: {error}")
            log.error("training failed: %s", error)
            return
        if isinstance(exc, StopRequested):
            what = f"stopped on request ({exc.reason}) during {self.phase}"
        else:
            what = "interrupted mid-step (a second Ctrl-C)"
        last = next(iter(sorted(run.ckpt_dir.glob("last*"))), None)  # last.pt, or a folder (HF runs)
        if last is not None:
            step = run.read_status().get("last_ckpt_step")
            kept = (f"ckpt/{last.name}{f' (step {step})' if step is not None else ''} is kept; continue with "
                    f"`crystallab train --resume {run.path}`")
        else:
            kept = (f"no checkpoint was written yet, so nothing was saved; to start again, delete {run.path} or "
                    "choose another --run-dir")
        run.clear_stop()
        run.write_status(state="stopped", error=None, message=f"{what}; {kept}")
        log.warning("%s; %s", what, kept)

    def _loop(self) -> None:
        c, run = self.config, self.run_folder
        step = self.start_step
        self.message = f"finished {c.max_iters} steps"
        if self.main and self.resuming:
            run.log_metrics(event="resume", step=step)
            log.info("resuming at step %d of %d", step, c.max_iters)
        if self.main and not self.resuming and "val" in self.eval_samplers:
            self.phase = "the step-0 evaluation"
            losses = self.estimate()  # the starting point: for a fine-tune, the source model's losses
            run.log_metrics(step=0, split="val", loss=losses["val"], loss_kind=self.objective.loss_kind,
                            train_loss=losses["train"], lr=0.0,
                            elapsed_s=time.time() - self.started)
            log.info("step 0: train %.4f, val %.4f%s", losses["train"], losses["val"],
                     _kind_note(self.objective.loss_kind))
            self._stop_during_setup()
        self.phase = "training"
        with self.signals.deferred():  # from here a stop finishes its step, saves ckpt/last.pt and exits
            self._train_steps(step)
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def _train_steps(self, step: int) -> None:
        """Steps from ``step`` to ``max_iters`` (or a stop), then the final checkpoint and status."""
        from tqdm import tqdm

        c, run = self.config, self.run_folder
        saved_at = step if self.resuming else None
        state = "completed"
        bar = tqdm(total=c.max_iters, initial=step, disable=not (self.progress and self.main), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        t_log, tokens = time.perf_counter(), 0
        while step < c.max_iters:
            loss_sum, grad_norm, lr = self.train_step(step)
            step += 1
            tokens += self.tokens_per_step
            bar.update(1)
            if step % c.log_interval == 0 or step == c.max_iters:
                if self.dist.world_size > 1:
                    torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
                loss = loss_sum.item()
                if not math.isfinite(loss):
                    raise ConfigError(f"the training loss became {loss} at step {step}; lower learning_rate "
                                      "or use dtype bfloat16 / float32")
                if self.main:
                    run.log_metrics(step=step, split="train", loss=loss, loss_kind=self.objective.loss_kind, lr=lr,
                                    tokens_per_s=tokens / (time.perf_counter() - t_log),
                                    grad_norm=float(grad_norm), elapsed_s=time.time() - self.started)
                    run.write_status(step=step)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                t_log, tokens = time.perf_counter(), 0
            stop_now = self.stop_requested(self.signals)
            if step % c.eval_interval == 0 or step == c.max_iters:
                saved_at = step
                if self.evaluate_and_save(step, lr):
                    break
                t_log, tokens = time.perf_counter(), 0  # tokens/s measures training, not evaluation
            if stop_now:
                state, self.message = "stopped", f"stopped on request at step {step}"
                self._info("%s", self.message)
                break
        bar.close()
        if self.main:
            if saved_at != step:
                last = self.save("last", step)
                run.write_status(last_ckpt=str(last), last_ckpt_step=step)
            run.clear_stop()
            note = f"; {self.plan.message}" if self.plan.message else ""
            run.write_status(state=state, step=step, message=self.message + note)
            log.info("%s; checkpoints in %s", self.message, run.ckpt_dir)


# ----------------------------------------------------------------------------------------------------------------
# Run log and best checkpoint


def _attach_log(run: RunFolder | None) -> list[logging.Handler]:
    """Log to the run's ``log.txt`` and to stderr (above the progress bar)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if run is not None:
        handlers.append(logging.FileHandler(run.log_path, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handlers


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _kind_note(loss_kind: str) -> str:
    """What a logged loss is, when it is not the plain NLL (nats/token)."""
    return "" if loss_kind == "nll" else f" ({loss_kind}: nats/token, an upper bound on the NLL, not a perplexity)"


def _link_best(last: Path, best: Path) -> None:
    """Make ``best.pt`` the checkpoint just written as ``last.pt``, atomically and without writing it twice.

    A hard link keeps these bytes when ``last.pt`` is later replaced by a rename; filesystems without hard links
    get a copy. Either way ``best.pt`` appears by an atomic rename. A checkpoint folder (HF runs) is copied and
    swapped in by renames (the old ``best`` is removed after the new one is in place).
    """
    tmp = best.parent / f".{best.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    if last.is_dir():
        shutil.copytree(last, tmp)
        old = best.parent / f".{best.name}.{os.getpid()}.{uuid.uuid4().hex}.old.tmp"
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, best)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _cmd_train(args: argparse.Namespace) -> int:
    if args.keys:
        for key, doc in field_docs().items():
            print(f"{key:28s} {doc}")
        return 0
    overrides = list(args.set or [])
    if args.resume:
        overrides = ["init_from=resume", f"out_dir={args.resume}", *overrides]
    if args.run_dir:
        overrides.append(f"out_dir={args.run_dir}")
    if args.config is None and not args.resume:
        raise ConfigError("give a config file (see configs/) or --resume RUN_DIR")
    config = load_config(args.config, overrides)
    if args.check:
        config, notes = check_config(config)
        print(dump_config(config), end="")
        print("".join(f"# {note}\n" for note in notes), end="")
        return 0
    try:
        path = train(config, progress=not args.no_progress)
    except StopRequested as stop:
        print(f"stopped on request ({stop.reason}) before the run folder was written; nothing was saved",
              file=sys.stderr)
        return 130
    if not Dist.from_env().is_main:
        return 0
    status = RunFolder(path).read_status()
    print(f"{status.get('state')}: {status.get('message')}\nrun folder: {path}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab train``."""
    p = subparsers.add_parser(
        "train",
        help="train a model (scratch, fine-tune or resume)",
        description="Train from a YAML config (CrystaLLM key names). Multi-GPU: "
                    "torchrun --standalone --nproc_per_node=N -m engine train CONFIG.yaml",
    )
    p.add_argument("config", nargs="?", type=Path, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key (repeatable); the value is read as YAML: compile=false, learning_rate=3e-4")
    p.add_argument("--run-dir", help="run folder to write: a bare name is <runs>/train/NAME, a path with a folder "
                   "part is taken from the current folder (default <runs>/train/<time>-<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its ckpt/last.pt: its "
                   "folder (runs/train/RUN from the checkout, or an absolute path) or its name (RUN)")
    p.add_argument("--check", action="store_true", help="validate without training: open the dataset and the "
                   "checkpoint to start from, check the run folder, print the resolved config")
    p.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

"""Training runs on CPU with tiny models: loss falls, fine-tune and resume behave, kills and stops are safe."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.tokens import load_token_dataset
from engine.lab.errors import ConfigError, CrystallabError
from engine.lab.fsutil import sha256_file
from engine.lab.runs import RunFolder
from engine.lab.settings import get_settings
from engine.models.checkpoint import load_checkpoint, save_checkpoint
from engine.models.gpt import GPT, GPTConfig
from engine.train.batches import WindowSampler, plan_context
from engine.train.config import load_config
from engine.train.setup import Tracker, lr_at
from engine.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
# A model small enough that a step takes milliseconds on one CPU core.
TINY = ["n_layer=1", "n_head=2", "n_embd=32", "dropout=0.0", "batch_size=4", "eval_iters=2", "warmup_iters=2",
        "learning_rate=3e-3", "device=cpu", "dtype=float32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _cfg(data: Path, *more: str):
    return load_config(None, [f"dataset={data}", *TINY, *more])


def _losses(run: Path, split: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunFolder(run).metrics() if r.get("split") == split}


class StopAfter:
    """A stop flag that trips on its n-th check (the trainer checks once per step)."""

    def __init__(self, n: int, action=None) -> None:
        self.n, self.calls, self.action = n, 0, action

    def is_set(self) -> bool:
        self.calls += 1
        if self.calls == self.n and self.action:
            self.action()
            return False
        return self.calls >= self.n and self.action is None


def test_loss_goes_down_on_a_tiny_corpus(nacl10):
    run = train(_cfg(nacl10, "block_size=64", "max_iters=40", "eval_interval=20", "log_interval=5"),
                progress=False)
    losses = _losses(run)
    assert losses[5] > 3.0  # near ln(371) = 5.9 at the start
    assert losses[40] < 0.6 * losses[5], losses
    status = RunFolder(run).read_status()
    assert status["state"] == "completed" and status["step"] == 40
    ckpt = load_checkpoint(run / "ckpt" / "last.pt")
    assert ckpt.iter_num == 40
    assert ckpt.meta["data_fingerprint"] == load_token_dataset(nacl10).fingerprint
    assert ckpt.meta["run"] == run.name and ckpt.meta["parent"] is None
    assert (run / "ckpt" / "best.pt").exists() and (run / "config.yaml").exists() and (run / "env.json").exists()
    rec = [r for r in RunFolder(run).metrics() if r.get("split") == "train"][-1]
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "elapsed_s"} <= set(rec)
    assert "step 40" in (run / "log.txt").read_text()


def test_ten_nacl_cifs_train_with_the_default_block_size(nacl10):
    cfg = _cfg(nacl10, "max_iters=4", "eval_interval=2", "batch_size=2")
    assert cfg.block_size == 1024  # the default (CrystaLLM small's context)
    run = train(cfg, progress=False)
    status = RunFolder(run).read_status()
    assert status["state"] == "completed"
    assert "validation windows" in status["message"]  # the single validation CIF is shorter than the context
    assert _losses(run, "val"), "validation still runs on the short split"


def test_a_split_shorter_than_the_context_lowers_a_new_models_context(nacl10):
    n_train = len(load_token_dataset(nacl10).train)
    run = train(_cfg(nacl10, f"block_size={n_train + 500}", "max_iters=2", "eval_interval=2", "batch_size=1"),
                progress=False)
    ckpt = load_checkpoint(run / "ckpt" / "last.pt")
    assert ckpt.model_args["block_size"] == n_train - 1
    assert "lowered" in RunFolder(run).read_status()["message"]
    assert RunFolder(run).config()["block_size"] == n_train - 1


def test_plan_context_keeps_trained_positions_when_fine_tuning():
    plan = plan_context(1024, 700, 0, can_lower_model=False)
    assert (plan.model_block_size, plan.train_window, plan.val_window) == (1024, 699, 0)
    assert "best.pt" in plan.message
    assert plan_context(256, 10_000, 5_000, can_lower_model=True).message == ""


def _source_checkpoint(path: Path, block_size: int = 128) -> Path:
    """A CrystaLLM-like checkpoint: 100,000 iterations done, with optimizer state."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    save_checkpoint(path, model=model, optimizer=opt, iter_num=100_000, best_val_loss=0.5, config={}, meta={},
                    extra={})
    return path


def test_finetune_reads_the_source_only_starts_at_step_0_and_freezes(nacl10, tmp_path):
    src = _source_checkpoint(tmp_path / "pretrained" / "ckpt.pt")
    before = sha256_file(src)
    cfg = load_config(None, [f"dataset={nacl10}", "init_from=finetune", f"init_ckpt={src}", "block_size=64",
                             "train_last_n_layers=1", "max_iters=6", "eval_interval=3", "log_interval=1",
                             "warmup_iters=3", "learning_rate=1e-3", "batch_size=2", "eval_iters=1",
                             "device=cpu"])
    run = train(cfg, progress=False)
    assert sha256_file(src) == before, "the source checkpoint must never be written"
    losses = _losses(run)
    assert min(losses) == 1 and max(losses) == 6
    lrs = {r["step"]: r["lr"] for r in RunFolder(run).metrics() if r.get("split") == "train"}
    assert lrs[1] == pytest.approx(1e-3 / 4)  # fresh warmup, not the source's min_lr
    out = load_checkpoint(run / "ckpt" / "last.pt")
    assert out.iter_num == 6 and out.model_args["block_size"] == 64
    assert out.meta["parent"]["sha256"] == before and out.meta["parent"]["step"] == 100_000
    old = load_checkpoint(src).state_dict
    assert torch.equal(out.state_dict["transformer.h.0.attn.c_attn.weight"], old["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(out.state_dict["transformer.wte.weight"], old["transformer.wte.weight"])
    assert not torch.equal(out.state_dict["transformer.h.1.attn.c_attn.weight"],
                           old["transformer.h.1.attn.c_attn.weight"])


def test_finetune_refuses_a_shape_change_and_a_longer_context(nacl10, tmp_path):
    src = _source_checkpoint(tmp_path / "ckpt.pt")
    base = [f"dataset={nacl10}", "init_from=finetune", f"init_ckpt={src}", "device=cpu"]
    with pytest.raises(ConfigError, match="n_layer"):
        train(load_config(None, [*base, "n_layer=4"]), progress=False)
    with pytest.raises(ConfigError, match="block_size"):
        train(load_config(None, [*base, "block_size=512"]), progress=False)
    with pytest.raises(CrystallabError):
        train(load_config(None, [*base[:2], f"init_ckpt={tmp_path / 'missing.pt'}"]), progress=False)


def test_resume_reproduces_the_uninterrupted_losses(nacl10, tmp_path):
    common = ["block_size=32", "max_iters=10", "eval_interval=4", "log_interval=1", "dropout=0.1"]
    full = train(_cfg(nacl10, *common), run_dir=tmp_path / "full", progress=False)
    part = train(_cfg(nacl10, *common), run_dir=tmp_path / "part", progress=False, stop_event=StopAfter(6))
    status = RunFolder(part).read_status()
    assert status["state"] == "stopped" and status["last_ckpt_step"] == 6
    assert load_checkpoint(part / "ckpt" / "last.pt").iter_num == 6
    resumed = train(load_config(None, ["init_from=resume", f"out_dir={part}"]), progress=False)
    assert resumed == part
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 11)), "one continuous curve"
    for step in range(7, 11):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    assert RunFolder(part).read_status()["state"] == "completed"
    with pytest.raises(ConfigError, match="seed"):
        train(load_config(None, ["init_from=resume", f"out_dir={part}", "seed=1", "max_iters=20"]), progress=False)


def test_a_stop_file_saves_and_exits_cleanly(nacl10, tmp_path):
    run = tmp_path / "run"
    flag = StopAfter(3, action=lambda: RunFolder(run).request_stop())
    train(_cfg(nacl10, "block_size=32", "max_iters=50", "eval_interval=20"), run_dir=run, progress=False,
          stop_event=flag)
    status = RunFolder(run).read_status()
    assert status["state"] == "stopped" and status["step"] == 3
    assert load_checkpoint(run / "ckpt" / "last.pt").iter_num == 3
    assert not (run / "STOP").exists()


def test_an_error_marks_the_run_failed_and_keeps_the_last_checkpoint(nacl10, tmp_path):
    def boom():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        train(_cfg(nacl10, "block_size=32", "max_iters=50", "eval_interval=2"), run_dir=tmp_path / "r",
              progress=False, stop_event=StopAfter(5, action=boom))
    status = RunFolder(tmp_path / "r").read_status()
    assert status["state"] == "failed" and "disk on fire" in status["error"]
    assert load_checkpoint(tmp_path / "r" / "ckpt" / "last.pt").iter_num == 4


def test_gradient_accumulation_averages_the_micro_batch_losses(nacl10):
    run = train(_cfg(nacl10, "block_size=32", "max_iters=1", "warmup_iters=0", "gradient_accumulation_steps=4", "log_interval=1"),
                progress=False)
    assert _losses(run)[1] == pytest.approx(math.log(371), abs=0.5)  # upstream summed: ~4 x 5.9


def test_a_taken_run_folder_and_a_missing_dataset_are_refused(nacl10, tmp_path):
    args = ["block_size=32", "max_iters=1", "warmup_iters=0"]
    train(_cfg(nacl10, *args), run_dir=tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(nacl10, *args), run_dir=tmp_path / "r", progress=False)
    with pytest.raises(CrystallabError, match="dataset"):
        train(_cfg(tmp_path / "nothing", *args), progress=False)


def test_schedule_warmup_cosine_and_floor():
    cfg = load_config(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_iters=10", "max_iters=110"])
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)


def test_tracker_early_stopping_and_overfitting_warning():
    t = Tracker(patience=2, min_delta=0.01)
    assert t.update(100, 1.0, 2.0) == (True, False, "")
    improved, stop, warning = t.update(200, 0.5, 2.5)  # train falls, val rises: the seeds' NaCl-10 run
    assert not improved and not stop and "overfitting" in warning
    assert t.update(300, 0.2, 2.005)[1], "two evaluations without improvement stop the run"
    assert t.best_step == 100


def test_windows_are_a_function_of_seed_and_step():
    data = np.arange(1000, dtype=np.uint16)
    s = WindowSampler(data, window=16, batch_size=4, seed=3, starts=np.array([0, 100, 990]))
    x, y = s.batch("train", 5, 0, 0)
    assert torch.equal(x, s.batch("train", 5, 0, 0)[0]) and not torch.equal(x, s.batch("train", 6, 0, 0)[0])
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert set(x[:, 0].tolist()) <= {0, 100}  # 990 leaves no room for a full window


CHILD = textwrap.dedent(
    """
    import os, sys, time
    real_replace = os.replace
    saves = []

    def replace_then_hang(src, dst):
        if str(dst).endswith("last.pt"):
            saves.append(dst)
            if len(saves) == 2 and sys.argv[2] == "kill":
                print("SAVING", flush=True)
                time.sleep(120)  # the temporary file is complete, the rename has not happened: killed here
        return real_replace(src, dst)

    os.replace = replace_then_hang
    import torch
    torch.set_num_threads(1)
    from engine.train.config import load_config
    from engine.train.trainer import train
    args = [f"dataset={sys.argv[3]}", "n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=2",
            "eval_iters=1", "warmup_iters=2", "device=cpu", "max_iters=100000", "eval_interval=3", "log_interval=1"]
    print("READY", flush=True)
    train(load_config(None, args), run_dir=sys.argv[1], progress=False)
    """
)


def _child(tmp_path: Path, mode: str, data: Path) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run), mode, str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    return proc, run


def test_a_process_killed_mid_save_leaves_a_loadable_last_checkpoint(nacl10, tmp_path):
    proc, run = _child(tmp_path, "kill", nacl10)
    try:
        for line in proc.stdout:
            if line.strip() == "SAVING":
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    leftovers = [p for p in (run / "ckpt").iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the kill must have happened mid-save: " + proc.stderr.read()[-2000:]
    ckpt = load_checkpoint(run / "ckpt" / "last.pt")
    assert ckpt.iter_num == 3  # the previous save, intact
    assert RunFolder(run).read_status()["state"] == "died"


def test_sigint_saves_and_exits_cleanly(nacl10, tmp_path):
    proc, run = _child(tmp_path, "sigint", nacl10)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(r.get("step", 0) >= 4 for r in RunFolder(run).metrics()):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    status = RunFolder(run).read_status()
    assert status["state"] == "stopped"
    assert load_checkpoint(run / "ckpt" / "last.pt").iter_num == status["step"] >= 4
    assert os.path.exists(run / "log.txt")


def test_cli_trains_and_check_prints_the_resolved_config(nacl10, tmp_path, capsys):
    from engine.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {nacl10}\nn_layer: 1\nn_head: 2\nn_embd: 32\ncompile: true\nmax_iters: 2\n"
                   "warmup_iters: 0\nbatch_size: 2\neval_iters: 1\ndevice: cpu\n")
    assert main(["train", str(cfg), "--set", "compile=false", "--set", "block_size=32", "--check"]) == 0
    out = capsys.readouterr().out
    assert "compile: false" in out and "block_size: 32" in out
    assert main(["train", str(cfg), "--set", "compile=false", "--set", "block_size=32", "--no-progress",
                 "--run-dir", str(tmp_path / "run")]) == 0
    assert "completed" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "ckpt" / "last.pt").iter_num == 2
    assert main(["train", str(cfg), "--set", "n_embd=33"]) == 2  # readable error, exit status 2
    assert "divisible" in capsys.readouterr().err


EARLY_CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    from engine.train import trainer
    from engine.cli import main

    config, run, phase = sys.argv[1:4]
    build, estimate, open_dataset = trainer._Session._build, trainer._Session.estimate, trainer.open_dataset

    def slow(name, real):
        def wrapper(*args, **kwargs):
            if phase == name:
                print(name.upper(), flush=True)
                time.sleep(120)  # the parent's signal lands here
            return real(*args, **kwargs)
        return wrapper

    trainer._Session._build = slow("build", build)
    trainer.open_dataset = slow("data", open_dataset)

    def announce(self):
        if phase == "eval":
            print("EVAL", flush=True)  # eval_iters is huge: the step-0 evaluation is still running when signalled
        return estimate(self)

    trainer._Session.estimate = announce
    sys.exit(main(["train", config, "--run-dir", run, "--no-progress"]))
    """
)


@pytest.mark.parametrize("phase, sig", [("status", signal.SIGTERM), ("data", signal.SIGTERM),
                                        ("build", signal.SIGTERM), ("eval", signal.SIGINT)])
def test_a_stop_before_the_first_step_ends_as_stopped(nacl10, tmp_path, phase, sig):
    script, cfg, run = tmp_path / "child.py", tmp_path / "c.yaml", tmp_path / "run"
    script.write_text(EARLY_CHILD)
    cfg.write_text(f"dataset: {nacl10}\nn_layer: 1\nn_head: 2\nn_embd: 32\nblock_size: 32\nbatch_size: 2\n"
                   f"eval_iters: {10**4 if phase == 'eval' else 1}\nwarmup_iters: 0\nmax_iters: 5\ndevice: cpu\n")
    proc = subprocess.Popen([sys.executable, str(script), str(cfg), str(run), phase], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        if phase == "status":
            deadline = time.time() + 120
            while time.time() < deadline and not (run / "status.json").exists():
                time.sleep(0.01)
        else:
            assert proc.stdout.readline().strip() == phase.upper(), proc.stderr.read()[-2000:]
            time.sleep(0.5 if phase == "eval" else 0.1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    if phase == "data":  # before the run folder exists: nothing to record, and the CLI says so
        assert rc == 130 and "nothing was saved" in err and not (run / "status.json").exists(), err[-2000:]
        return
    assert rc == 0, err[-2000:]
    status = RunFolder(run).read_status()
    assert status["state"] == "stopped", status
    assert f"stopped on request ({sig.name})" in status["message"] and "no checkpoint" in status["message"]
    if phase == "eval":
        assert "step-0 evaluation" in status["message"]
    assert f"stopped on request ({sig.name})" in (run / "log.txt").read_text()
    assert not (run / "ckpt" / "last.pt").exists()


class _NotATensor:
    """Pickled into a checkpoint, it makes the file unreadable with ``weights_only=True`` (as a code-running one)."""


def test_check_refuses_what_the_run_would_refuse_without_writing(nacl10, tmp_path, capsys):
    from engine.cli import main

    src = _source_checkpoint(tmp_path / "src.pt", block_size=128)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "model_args": {}, "payload": _NotATensor()}, unsafe)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\nwarmup_iters: 0\n")
    finetune = [f"dataset={nacl10}", "init_from=finetune"]
    cases = [
        ([f"dataset={tmp_path / 'nothing'}", *TINY], "nothing"),
        ([*finetune, f"init_ckpt={unsafe}"], "unsafe.pt"),
        ([*finetune, f"init_ckpt={src}", "block_size=1024"], "choose 8 to 128"),
        ([f"dataset={nacl10}", *TINY, f"out_dir={a_file}"], "is a file"),
        ([f"dataset={nacl10}", *TINY, f"out_dir={a_file / 'run'}"], "which is a file"),
    ]

    def check(overrides: list[str]) -> int:
        return main(["train", str(cfg), "--check", *(x for o in overrides for x in ("--set", o))])

    for overrides, words in cases:
        assert check(overrides) == 2, overrides
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert check([*finetune, f"init_ckpt={src}", "block_size=64", f"out_dir={tmp_path / 'ft'}"]) == 0
    out = capsys.readouterr().out
    assert "n_layer: 2" in out and "block_size: 64" in out and f"# starts from: {src}" in out
    assert not (tmp_path / "ft").exists(), "--check writes nothing"


def test_a_run_dir_that_is_a_file_is_a_one_line_error(nacl10, tmp_path, capsys):
    from engine.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {nacl10}\nn_layer: 1\nn_head: 2\nn_embd: 32\nblock_size: 32\nmax_iters: 1\n"
                   "warmup_iters: 0\ndevice: cpu\n")
    (tmp_path / "taken.cif").write_text("data_x\n")
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "taken.cif"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run folder") and "is a file" in err and "Traceback" not in err


def test_cli_resumes_by_the_readme_path_a_bare_name_or_an_absolute_path(nacl10, tmp_path, monkeypatch, capsys):
    from engine.cli import main

    runs = get_settings().runs_dir
    part = train(_cfg(nacl10, "block_size=32", "max_iters=4", "eval_interval=2"), run_dir="part", progress=False,
                 stop_event=StopAfter(2))
    assert part == runs / "train" / "part" and load_checkpoint(part / "ckpt" / "last.pt").iter_num == 2
    monkeypatch.chdir(runs.parent)  # the checkout: runs/train/RUN as the README types it
    for typed in (f"{runs.name}/train/part", "part", str(part)):
        assert main(["train", "--resume", typed, "--check"]) == 0, capsys.readouterr().err
        assert f"out_dir: {part}" in capsys.readouterr().out
    assert main(["train", "--resume", f"{runs.name}/train/part", "--no-progress"]) == 0
    assert "completed" in capsys.readouterr().out
    assert load_checkpoint(part / "ckpt" / "last.pt").iter_num == 4


def _hold_in_child(folder: Path) -> subprocess.Popen:
    """Another live process owning ``folder`` (as a second trainer would), until it is killed."""
    code = ("import sys, time; from engine.lab.jobs import hold_folder; hold_folder(sys.argv[1], 'run folder'); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_is_owned_by_one_live_process_and_stale_temporaries_are_cleaned(nacl10, tmp_path, capsys):
    from engine.cli import main

    run = train(_cfg(nacl10, "block_size=32", "max_iters=2", "eval_interval=2"), run_dir=tmp_path / "r",
                progress=False)
    capsys.readouterr()
    holder = _hold_in_child(run)
    try:
        for extra in ([], ["--check"]):
            assert main(["train", "--resume", str(run), "--set", "max_iters=4", "--no-progress", *extra]) == 2
            err = capsys.readouterr().err
            assert f"is in use by process {holder.pid} on " in err and err.count("\n") == 1, err
    finally:
        holder.kill()
        holder.wait()
    assert load_checkpoint(run / "ckpt" / "last.pt").iter_num == 2, "the refused resume trained nothing"
    torn = run / "ckpt" / ".last.pt.12345.tmp"  # what a kill during a checkpoint write leaves
    torn.write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(run), "--set", "max_iters=4", "--no-progress"]) == 0  # the lock is stale
    assert load_checkpoint(run / "ckpt" / "last.pt").iter_num == 4
    assert not torn.exists()


def test_check_and_train_refuse_what_the_machine_cannot_hold_or_finish(nacl10, tmp_path, capsys):
    from engine.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {nacl10}\ndevice: cpu\nwarmup_iters: 0\nmax_iters: 10\n")
    cases = [
        (["n_layer=64", "n_embd=65536", "n_head=1024", "block_size=32"], r"this run needs about [\d,.]+ GB"),
        (["batch_size=1000000000"], "batch_size=1,000,000,000 exceeds 16,384"),
        (["gradient_accumulation_steps=1000000000"], "gradient_accumulation_steps=1,000,000,000 exceeds"),
        (["eval_iters=1000000000"], "eval_iters=1,000,000,000 exceeds"),
        (["batch_size=16384", "gradient_accumulation_steps=4096", "block_size=32"], "tokens per optimizer step"),
        (["batch_size=16384", "eval_iters=10000", "block_size=32"], "tokens per evaluation"),
    ]
    import re

    for overrides, words in cases:
        for extra in (["--check"], ["--no-progress", "--run-dir", str(tmp_path / "r")]):
            argv = ["train", str(cfg), *extra, *(x for o in overrides for x in ("--set", o))]
            assert main(argv) == 2, overrides
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and re.search(words, err), err
    assert not (tmp_path / "r" / "ckpt").exists()
    assert main(["train", str(cfg), "--check", "--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32"]) == 0
    assert re.search(r"# memory: about [\d.]+ GB: .* M parameters .* GB free on cpu", capsys.readouterr().out)


def test_unwritable_run_folders_are_refused_before_any_step(nacl10, tmp_path, monkeypatch, capsys):
    import tempfile

    from engine.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {nacl10}\nn_layer: 1\nn_head: 2\nn_embd: 32\nblock_size: 32\nmax_iters: 2\n"
                   "warmup_iters: 0\neval_interval: 2\nbatch_size: 2\neval_iters: 1\ndevice: cpu\n")
    # /sys refuses new files even to root, as a read-only mount does: --check must not call it "(new)".
    assert main(["train", str(cfg), "--check", "--run-dir", "/sys/crystallab-test-run"]) == 2
    assert "cannot create the run folder /sys/crystallab-test-run" in capsys.readouterr().err
    run = tmp_path / "r"
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    real = tempfile.mkstemp

    def read_only_ckpt(*args, dir=None, **kwargs):  # what the OS answers in a read-only ckpt/ (root included)
        if dir is not None and Path(dir) == run / "ckpt":
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_ckpt)
    steps_before = len(RunFolder(run).metrics(raw=True))
    for extra in (["--check"], ["--no-progress"]):
        assert main(["train", "--resume", str(run), "--set", "max_iters=4", *extra]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'ckpt'}" in err and "Permission denied" in err and err.count("\n") == 1, err
    assert len(RunFolder(run).metrics(raw=True)) == steps_before, "nothing was trained before the refusal"

"""Train page: launch a training run (scratch, fine-tune or resume) as a detached job, then watch it live:
loss curves, learning rate, throughput, ETA, device memory, the run's log, and a stop button."""

from __future__ import annotations

import os
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from engine.app import dashboard
from engine.lab import jobs
from engine.lab.errors import InputError
from engine.lab.runs import RunFolder
from engine.lab.settings import REPO_ROOT
from engine.train.config import load_config, preset_measured
from pages import common

st.title("Train")
s = common.settings()
PRESETS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if not p.name.startswith("sweep_"))

def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"


def _expected_duration(preset: Path, steps: int) -> str:
    """What the preset's header measured, said for this machine's kind of device and its load now."""
    measured = preset_measured(preset)
    device = common.device_summary()["device"]
    if measured is None:
        return "No measured duration in this preset's header."
    if measured["device"] != device:
        return (f"Measured on {measured['device'].upper()} only ({measured['text']}); no figure for this "
                f"machine's {device.upper()}.")
    per_step = measured["seconds"] / measured["steps"]
    text = f"Expected on this machine's kind of device: about {_eta(per_step * steps)} for {steps:,} steps " \
           f"({measured['text']})."
    if device == "cpu":
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            text += (f" The load now is {load:.1f} on {cores} cores: expect up to {load / cores:.1f}x longer "
                     "(the ETA below measures it once the run starts).")
    return text


# --- launch --------------------------------------------------------------------------------------------------
with st.expander("Launch a run", expanded=not common.train_runs()):
    mode = st.radio("Start from", ["scratch", "finetune", "resume"], horizontal=True, key="train_mode",
                    captions=["a new model", "a checkpoint's weights, fresh optimizer", "an interrupted run"])
    if mode == "resume":
        # ckpt/last.pt, or the ckpt/last/ folder of a Hugging Face run
        resumable = [r for r in common.train_runs() if any((r / "ckpt" / n).exists() for n in ("last.pt", "last"))
                     and RunFolder(r).read_status().get("state") in ("stopped", "died", "failed")]
        if not resumable:
            st.info("No stopped, failed or died run with a checkpoint to resume.")
        else:
            run = common.pick_path("Run to resume", resumable, key="train_resume_run")
            st.caption(RunFolder(run).read_status().get("message", ""))
            if st.button("Resume", key="train_resume_go", icon=":material/play_arrow:"):
                with common.user_errors():
                    common.launch(["train", "--resume", str(run), "--no-progress"], "train", run.name,
                                  target=run, replace_finished=True)
                    st.session_state["train_watch"] = str(run)
    else:
        if not PRESETS:
            st.error(f"No presets found in {REPO_ROOT / 'configs'}.")
            st.stop()
        # The last preset this session chose (the selectbox forgets it while resume mode hides it), else tiny_cpu.
        last = st.session_state.get("_train_form_preset")
        default = next((i for i, p in enumerate(PRESETS) if str(p) == last),
                       next((i for i, p in enumerate(PRESETS) if p.stem == "tiny_cpu"), 0))
        preset = st.selectbox("Preset", PRESETS, index=default, format_func=lambda p: p.stem, key="train_preset")
        with common.user_errors():
            base = load_config(preset)
        st.caption(_expected_duration(preset, base.max_iters))
        init_ckpt = None
        if mode == "finetune":
            init_ckpt = common.pick_path("Checkpoint to fine-tune", common.checkpoints(), key="train_ckpt",
                                         allow_custom=True, help="A run's checkpoint, or any path such as "
                                                                 "CrystaLLM's crystallm_v1_small/ckpt.pt",
                                         empty="No checkpoint under runs/train/ yet: give the path of one below "
                                               "(e.g. CrystaLLM's crystallm_v1_small/ckpt.pt), or train from "
                                               "scratch.")
        names = [p.name for p in common.datasets()]
        if base.dataset not in names:
            names.insert(0, base.dataset)
        # The form shows the chosen preset's values: choosing another preset loads its values into every field
        # (a widget's `value=` only counts on its first render, so the preset's values go through session state).
        # Streamlit drops the state of widgets a run does not draw (the form is hidden in resume mode), so a
        # missing key is refilled from the preset too.
        changed = st.session_state.get("_train_form_preset") != str(preset)
        st.session_state["_train_form_preset"] = str(preset)
        defaults = {
            "train_name": base.name, "train_dataset": base.dataset,
            "train_device": base.device if base.device in ("auto", "cpu", "cuda") else "auto",
            "train_steps": base.max_iters, "train_lr": float(base.learning_rate), "train_batch": base.batch_size,
            "train_block": base.block_size or 1024, "train_warmup": base.warmup_iters,
            "train_eval": base.eval_interval, "train_dropout": float(base.dropout), "train_seed": base.seed,
        }
        for key, value in defaults.items():
            if changed or key not in st.session_state:
                st.session_state[key] = value
        with st.form("train_form"):
            c1, c2, c3 = st.columns(3)
            name = c1.text_input("Run name", key="train_name",
                                 help="Folder under runs/train/; two launches with one name start one run")
            dataset = c2.selectbox("Dataset", names, key="train_dataset")
            device = c3.selectbox("Device", ["auto", "cpu", "cuda"], key="train_device")
            c1, c2, c3, c4 = st.columns(4)
            max_iters = c1.number_input("Steps", 1, 10**7, key="train_steps")
            lr = c2.number_input("Learning rate", 1e-7, 1.0, step=1e-4, format="%.2e", key="train_lr",
                                 help="Peak learning rate after warmup; cosine decay to min_lr afterwards")
            batch = c3.number_input("Batch size", 1, 4096, key="train_batch", help="Sequences per step")
            block = c4.number_input("Context (tokens)", 8, 8192, key="train_block")
            c1, c2, c3, c4 = st.columns(4)
            warmup = c1.number_input("Warmup steps", 0, 10**7, key="train_warmup")
            eval_every = c2.number_input("Evaluate every (steps)", 1, 10**7, key="train_eval")
            dropout = c3.number_input("Dropout", 0.0, 0.9, step=0.05, key="train_dropout")
            seed = c4.number_input("Seed", 0, 2**31 - 1, key="train_seed")
            go_ = st.form_submit_button("Launch", icon=":material/rocket_launch:", key="train_launch")
        if go_:
            with common.user_errors():
                name = jobs.check_name(name, "run name")
                run_dir = s.train_dir / name
                job_dir = common.jobs_root("train") / name
                if run_dir.exists() and not (job_dir / jobs.JOB_FILE).exists():
                    raise InputError(f"run {name!r} already exists in {run_dir}; choose another name or resume it")
                overrides = [f"dataset={dataset}", f"init_from={mode}", f"device={device}",
                             f"max_iters={int(max_iters)}", f"learning_rate={lr}", f"batch_size={int(batch)}",
                             f"block_size={int(block)}", f"warmup_iters={int(warmup)}",
                             f"eval_interval={int(eval_every)}", f"dropout={dropout}", f"seed={int(seed)}",
                             f"name={name}"]
                if init_ckpt is not None:
                    overrides.append(f"init_ckpt={init_ckpt}")
                from engine.train.preparation import check_config  # torch: loaded on launch, not with the page

                # Refuse here what the run would refuse in the background (as `train --check`: data, checkpoint,
                # folder, memory against the device's free memory, loop bounds).
                check_config(load_config(preset, overrides), run_dir)
                argv = ["train", str(preset), "--run-dir", str(run_dir), "--no-progress"]
                for o in overrides:
                    argv += ["--set", o]
                common.launch(argv, "train", name, target=run_dir)
                st.session_state["train_watch"] = str(run_dir)

# --- watch ---------------------------------------------------------------------------------------------------
runs = common.train_runs()
watch = st.session_state.get("train_watch")
pending_job = common.jobs_root("train") / Path(watch).name if watch else None
if watch and Path(watch) not in runs and (pending_job / jobs.JOB_FILE).exists():
    # Just launched: the trainer has not written status.json yet (imports, data, model). Show the job, and switch
    # to the run's live view as soon as its folder appears (or show why the job ended).
    @st.fragment(run_every=common.POLL_S)
    def _pending() -> None:
        common.following_note("train")
        state = common.job_panel(pending_job, key="train_pending")
        if (Path(watch) / "status.json").exists() or state["state"] != "running":
            st.rerun(scope="app")

    _pending()
    if not runs:
        st.stop()
if not runs:
    st.info("No training run yet: launch one above (the tiny_cpu preset trains on CPU in about a minute).")
    st.stop()
if watch and Path(watch) in runs:
    common.follow("train_run", Path(watch))
run_dir = st.selectbox("Run", runs, format_func=lambda p: p.name, key="train_run")
job_dir = common.jobs_root("train") / run_dir.name


def _panel() -> str:
    status = RunFolder(run_dir).read_status()
    prog = dashboard.training_progress(run_dir)
    state = status.get("state", "pending")
    # Two rows of four: seven metrics in one row are cut off ("com…") on a 1280-pixel screen.
    c = st.columns(4)
    c[0].metric("State", state)
    c[1].metric("Step", f"{prog['step']:,} / {prog['max_steps']:,}")
    c[2].metric("Train loss", f"{prog['train_loss']:.4f}" if prog["train_loss"] is not None else "-")
    c[3].metric("Best val loss", f"{prog['best_val_loss']:.4f}" if prog["best_val_loss"] is not None else "-")
    c = st.columns(4)
    c[0].metric("Learning rate", f"{prog['lr']:.2e}" if prog["lr"] is not None else "-")
    c[1].metric("Tokens/s", f"{prog['tokens_per_s']:,.0f}" if prog["tokens_per_s"] else "-")
    c[2].metric("ETA", _eta(prog["eta_s"]))
    st.progress(prog["fraction"])
    gpus = dashboard.gpu_memory()
    mem = " | ".join(f"GPU{g['index']} {g['used_gb']:.1f}/{g['total_gb']:.0f} GiB" for g in gpus or [])
    st.caption(f"Device: {prog['device'] or '-'}" + (f" | memory (all processes): {mem}" if mem else "")
               + (f" | {status.get('message')}" if status.get("message") else ""))
    if state in ("failed", "died"):
        st.error(status.get("error") or status.get("message") or f"the run {state}", icon=":material/error:")
    if status.get("warning"):
        st.warning(status["warning"], icon=":material/warning:")

    df = dashboard.metrics_frame(run_dir)
    left, right = st.columns(2)
    fig = go.Figure()
    train_part, val_part = df[df["split"] == "train"], df[df["split"] == "val"].dropna(subset=["loss"])
    if len(train_part):
        fig.add_trace(go.Scatter(x=train_part["step"], y=train_part["loss"], name="train", mode="lines"))
    if len(val_part):
        # Evaluations are points: two of them (steps 0 and 350) joined by a line read as a trend that was never
        # measured, so a line joins them only once there are three; the best so far is a step line.
        fig.add_trace(go.Scatter(x=val_part["step"], y=val_part["loss"], name="val",
                                 mode="lines+markers" if len(val_part) >= 3 else "markers",
                                 line={"dash": "dot"}, marker={"size": 9, "symbol": "diamond"}))
        fig.add_trace(go.Scatter(x=val_part["step"], y=val_part["loss"].cummin(), name="best val so far",
                                 mode="lines", line={"shape": "hv", "width": 1}))
    fig.update_layout(title="Loss (nats/token)", xaxis_title="step", height=320, margin={"t": 40})
    left.plotly_chart(fig, key="train_loss_chart")
    train = df[df["split"] == "train"]
    fig = go.Figure(go.Scatter(x=train["step"], y=train["lr"], mode="lines", name="lr"))
    fig.update_layout(title="Learning rate", xaxis_title="step", height=320, margin={"t": 40})
    right.plotly_chart(fig, key="train_lr_chart")

    if state == "running":
        if st.button("Stop", key="train_stop", icon=":material/stop:",
                     help="The trainer finishes its step, saves ckpt/last.pt and exits"):
            if (job_dir / jobs.JOB_FILE).exists():
                jobs.request_stop(job_dir)
            else:  # started from the command line: the STOP file is the whole protocol
                RunFolder(run_dir).request_stop()
            st.toast("Stop requested")
    log = (run_dir / "log.txt").read_text(errors="replace").splitlines()[-20:] if (run_dir / "log.txt").exists() \
        else jobs.tail_log(job_dir, 20).splitlines()
    with st.expander("Log", expanded=state in ("failed", "died")):
        st.code("\n".join(log) or "(empty)", language=None)
    if (job_dir / jobs.JOB_FILE).exists() and state != "running":
        js = jobs.job_state(job_dir)
        if js["state"] in ("failed", "died") and state not in ("failed", "died"):
            st.error(js["message"], icon=":material/error:")
    return state


def _active() -> bool:
    """The run is training, or its job is (a resumed run still says "stopped" until the trainer starts)."""
    if RunFolder(run_dir).read_status().get("state") == "running":
        return True
    return (job_dir / jobs.JOB_FILE).exists() and jobs.job_state(job_dir)["state"] == "running"


if _active():
    @st.fragment(run_every=common.POLL_S)
    def _live() -> None:
        common.following_note("train")
        _panel()
        if not _active():
            st.rerun(scope="app")

    _live()
else:
    _panel()

"""Pieces shared by the dashboard pages: error display, run-folder pickers, the job panel and the 3D view.

Only Streamlit glue lives here; every computation is an engine call. Pages list what exists by reading the run
folders on each rerun (cheap directory scans), so work launched from another tab, or before a server restart,
shows up without any in-memory state.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import streamlit as st

from engine.lab import jobs
from engine.lab.errors import CrystallabError
from engine.lab.settings import Settings, get_settings


def _leave_pages_folder_mode() -> None:
    """Route a first request for ``/sample`` (etc.) through ``app.py``'s navigation.

    Streamlit decides lazily whether an app uses the legacy ``pages/`` folder: until ``st.navigation`` has run
    once in the server process, a URL naming a page runs ``pages/<page>.py`` directly, without ``app.py`` (no
    shared sidebar, a navigation listing every file). When a page finds itself run that way, it switches the
    process to ``st.navigation`` mode and reruns, which then goes through ``app.py``.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a future Streamlit without the legacy mode
        return
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        st.rerun()


_leave_pages_folder_mode()

POLL_S = 2.0
"""Seconds between refreshes of live views (job state, loss curves)."""


def settings() -> Settings:
    return get_settings()


@contextmanager
def user_errors(stop: bool = True) -> Iterator[None]:
    """Show a user's mistake as a readable message instead of a traceback (and stop the page if ``stop``)."""
    try:
        yield
    except CrystallabError as exc:
        st.error(str(exc), icon=":material/error:")
        if stop:
            st.stop()
    except FileNotFoundError as exc:
        st.error(f"not found: {exc.filename or exc}", icon=":material/error:")
        if stop:
            st.stop()


def rel(path: Path) -> str:
    """A path as shown to the user: relative to the runs root when inside it."""
    try:
        return str(Path(path).relative_to(settings().runs_dir))
    except ValueError:
        return str(path)


@st.cache_resource(show_spinner=False)
def device_summary() -> dict:
    """What the server computes on (torch is imported once per server process)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "name": props.name, "memory_gb": props.total_memory / 2**30,
                "count": torch.cuda.device_count()}
    return {"device": "cpu", "name": f"{os.cpu_count()} CPU cores", "memory_gb": None, "count": 0}


def sidebar() -> None:
    """Shared sidebar: where runs live, the compute device, running jobs."""
    s = settings()
    with st.sidebar:
        st.caption("Runs root")
        st.code(str(s.runs_dir), language=None)
        dev = device_summary()
        label = f"{dev['device']}: {dev['name']}"
        if dev["memory_gb"]:
            label += f" ({dev['memory_gb']:.0f} GiB)"
        st.caption(f"Device: {label}")
        _running_jobs()


@st.fragment(run_every=5)
def _running_jobs() -> None:
    """The jobs running now; refreshed on its own every 5 s, so it does not go stale between page runs."""
    running = [d for d in all_jobs() if jobs.job_state(d)["state"] == "running"]
    if running:
        st.caption("Running: " + ", ".join(f"{d.parent.name}/{d.name}" for d in running))


# --- what exists under the runs root -------------------------------------------------------------------------

def jobs_root(kind: str) -> Path:
    """Folder holding the job folders of one kind (``runs/jobs/<kind>/<name>/``)."""
    return settings().runs_dir / "jobs" / kind


def all_jobs() -> list[Path]:
    root = settings().runs_dir / "jobs"
    if not root.is_dir():
        return []
    return [d for kind in sorted(root.iterdir()) if kind.is_dir() for d in jobs.list_jobs(kind)]


def _dirs(root: Path, marker: str) -> list[Path]:
    """Folders under ``root`` holding ``marker``; a symlink leading outside the allowed folders is not followed."""
    if not root.is_dir():
        return []
    s = settings()
    found = [p for p in root.iterdir() if p.is_dir() and (p / marker).exists() and s.is_allowed(p / marker)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def datasets() -> list[Path]:
    """Token datasets (folders with ``train.bin``), newest first."""
    return _dirs(settings().datasets_dir, "train.bin")


def train_runs() -> list[Path]:
    """Training run folders (with ``status.json``), newest first."""
    return _dirs(settings().train_dir, "status.json")


def checkpoints() -> list[Path]:
    """Every checkpoint of every training run, newest run first (``best`` before ``last``): ``*.pt`` files and
    checkpoint folders (a Hugging Face run's ``best/``, holding ``crystallab.json``)."""
    out = []
    s = settings()
    for run in _dirs(s.train_dir, "ckpt"):
        found = [*(run / "ckpt").glob("*.pt"), *(p.parent for p in (run / "ckpt").glob("[!.]*/crystallab.json"))]
        out += sorted((p for p in found if s.is_allowed(p)), key=lambda p: (p.stem != "best", p.name))
    return out


def sample_sets() -> list[Path]:
    """Sample sets (folders with ``config.json``) under ``runs/samples/``, newest first."""
    return _dirs(settings().samples_dir, "config.json")


def sweeps() -> list[Path]:
    """Sweep folders (with ``sweep.yaml``), newest first."""
    return _dirs(settings().sweeps_dir, "sweep.yaml")


def csp_runs() -> list[Path]:
    """Structure-prediction benchmark runs (folders with ``config.json``) under ``runs/csp/``, newest first."""
    return _dirs(settings().csp_dir, "config.json")


def follow(key: str, value: object) -> None:
    """Select ``value`` in the widget ``key`` once (e.g. the output of a job that just finished), leaving the
    user free to choose something else afterwards."""
    marker = f"_followed_{key}"
    if st.session_state.get(marker) != str(value):
        st.session_state[marker] = str(value)
        st.session_state[key] = value


def pick_path(label: str, options: list[Path], *, key: str, help: str | None = None,
              allow_custom: bool = False, empty: str | None = None, stop: bool = True,
              default: str | None = None) -> Path | None:
    """A selectbox over discovered folders/files, optionally with a typed path checked by the settings.

    ``empty`` is said when nothing was discovered (before the typed-path box, when ``allow_custom``). Returns None
    when there is nothing to choose; while a typed path is still empty it stops the page (``stop``) or returns
    None (``stop=False``, for pages that show results below the picker). ``default`` (a path as `rel` shows it)
    is preselected in a new session when it is among the options.
    """
    choices = [rel(p) for p in options]
    custom = "other path..."
    if not options and empty:
        st.info(empty, icon=":material/info:")
    if allow_custom:
        choices.append(custom)
    if not choices:
        return None
    index = choices.index(default) if default in choices else 0
    choice = st.selectbox(label, choices, index=index, key=key, help=help)
    if choice == custom:
        typed = st.text_input("Path on the server", key=f"{key}_path",
                              help="Absolute, or relative to the runs root; its folder must be allowed "
                                   "(CRYSTALLAB_DATA_DIRS).")
        if not typed.strip():
            if stop:
                st.stop()
            return None
        with user_errors():
            return settings().resolve_user_path(typed.strip())
    return options[choices.index(choice)]


# --- jobs ----------------------------------------------------------------------------------------------------

_STATE_ICONS = {"running": ":material/progress_activity:", "finished": ":material/check_circle:",
                "stopped": ":material/stop_circle:", "failed": ":material/error:", "died": ":material/error:"}


def launch(argv: list[str], kind: str, name: str, target: Path, replace_finished: bool = False) -> dict:
    """Start a detached job (or re-attach to the one already running under this name) and follow it.

    Re-attaching is said by :func:`following_note` while that job runs (not by a message that outlives it).
    """
    job_dir = jobs_root(kind) / name
    record = jobs.launch_job(argv, job_dir, kind=kind, target=target, replace_finished=replace_finished)
    st.session_state[f"job_{kind}"] = str(job_dir)
    st.session_state[f"_following_{kind}"] = (
        [str(job_dir), f"{kind} job {name!r} was already running (started {record['started_at']}); following it"]
        if record["reused"] else None)
    return record


def following_note(kind: str) -> None:
    """Say that the launch re-attached to a running job, for as long as that job runs (call it where the job's
    live panel refreshes, so the note goes with the run)."""
    note = st.session_state.get(f"_following_{kind}")
    if not note:
        return
    if jobs.job_state(Path(note[0]))["state"] != "running":
        st.session_state[f"_following_{kind}"] = None
        return
    st.info(note[1], icon=":material/sync:")


def _request(argv: list[str]) -> list[str]:
    """A job's command line without its output folder: what was asked for, whatever the result is called."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        else:
            out.append(a)
    return out


def identical_job(kind: str, argv: list[str]) -> tuple[Path, dict] | None:
    """A running or finished job of ``kind`` that was asked exactly ``argv`` (apart from ``--out``), if any.

    Two identical requests (same checkpoint, prompt, knobs and seed) make identical results, so the page follows
    the first instead of starting the second (a double press of Enter or of the button).
    """
    wanted = _request([str(a) for a in argv])
    for job_dir in jobs.list_jobs(jobs_root(kind)):
        state = jobs.job_state(job_dir)
        if state["state"] in ("running", "finished") and _request(state.get("argv") or []) == wanted:
            return job_dir, state
    return None


def current_job(kind: str) -> Path | None:
    """The job of this kind this session launched, else the newest one still running (re-attach on reload)."""
    chosen = st.session_state.get(f"job_{kind}")
    if chosen:
        return Path(chosen)
    for d in jobs.list_jobs(jobs_root(kind)):
        if jobs.job_state(d)["state"] == "running":
            return d
    return None


def live_job(job_dir: Path, *, key: str, stoppable: bool = True) -> dict:
    """A job panel that refreshes itself while the job runs, then reruns the page once when it ends."""
    state = jobs.job_state(job_dir)
    if state["state"] != "running":
        return job_panel(job_dir, key=key, stoppable=stoppable)

    @st.fragment(run_every=POLL_S)
    def _watch() -> None:
        following_note(job_dir.parent.name)
        if job_panel(job_dir, key=key, stoppable=stoppable)["state"] != "running":
            st.rerun(scope="app")  # outputs of the finished job appear on the page

    _watch()
    return state


def job_panel(job_dir: Path, *, key: str, stoppable: bool = True, log_lines: int = 15) -> dict:
    """State, log tail and stop button of one job; returns its state."""
    state = jobs.job_state(job_dir)
    icon = _STATE_ICONS.get(state["state"], ":material/help:")
    show = {"running": st.info, "finished": st.success, "stopped": st.warning}.get(state["state"], st.error)
    show(f"{job_dir.name}: {state['message']}", icon=icon)
    if state["state"] == "running" and stoppable:
        if st.button("Stop", key=f"{key}_stop", icon=":material/stop:"):
            jobs.request_stop(job_dir, grace_s=jobs.DEFAULT_GRACE_S)
            st.toast("Stop requested: the job saves and exits at its next step")
    log = jobs.tail_log(job_dir, log_lines)
    if log:
        with st.expander("Log", expanded=state["state"] in ("failed", "died")):
            st.code(log, language=None)
    return state


# --- structures ----------------------------------------------------------------------------------------------

@st.cache_data(show_spinner=False, max_entries=32)
def _view_html(structure_json: str, style: str, supercell: tuple, show_cell: bool, labels: bool,
               polyhedra: bool, beyond: bool, height: int) -> str:
    # Cached so a rerun sends the same HTML and the browser keeps the view (and the user's rotation).
    from pymatgen.core import Structure

    from engine.app import viewer

    return viewer.structure_view_html(Structure.from_str(structure_json, fmt="json"), style=style,
                                      supercell=supercell, show_cell=show_cell, labels=labels, polyhedra=polyhedra,
                                      bonded_outside=beyond, width="100%", height=height)


def structure_view(structure, *, key: str, height: int = 560) -> None:
    """Interactive 3D view with style / repeat / polyhedra / label controls, or a plotly fallback saying why.

    Atoms on cell faces, edges and corners are drawn at every image in the box, and the sticks are the bonds of
    the Structure page's bond table (``engine.app.viewer.view_geometry``)."""
    from engine.app import viewer

    c1, c2 = st.columns([1, 1])
    style = c1.radio("Style", ["ball-and-stick", "space-filling"], horizontal=True, key=f"{key}_style")
    rep = c2.select_slider("Supercell", ["1x1x1", "2x2x2", "3x3x3", "2x1x1", "2x2x1"], key=f"{key}_rep")
    c1, c2, c3, c4 = st.columns(4)
    show_cell = c1.checkbox("Cell", value=True, key=f"{key}_cell")
    polyhedra = c2.checkbox("Polyhedra", value=False, key=f"{key}_poly",
                            help="Coordination polyhedra around cations with 4 to 8 neighbours")
    beyond = c3.checkbox("Neighbours outside", value=False, key=f"{key}_beyond",
                         help="Also draw the atoms outside the cell that a bond of an atom inside reaches")
    labels = c4.checkbox("Labels", value=False, key=f"{key}_labels")
    supercell = tuple(int(n) for n in rep.split("x"))
    reason = viewer.asset_status()
    if reason is None:
        html = _view_html(structure.to_json(), style, supercell, show_cell, labels, polyhedra, beyond, height)
        st.iframe(html, height=height + 10)
        legend = " &nbsp; ".join(f"<span style='color:{color}'>&#9679;</span> {symbol}"
                                 for symbol, color in viewer.element_colors(structure).items())
        st.markdown(legend, unsafe_allow_html=True)  # which colour is which element (Jmol colours)
    else:
        st.warning(f"3D viewer unavailable: {reason}. Showing a simple plot instead.",
                   icon=":material/warning:")
        st.plotly_chart(viewer.fallback_figure(structure, supercell), key=f"{key}_fallback")

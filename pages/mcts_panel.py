"""Scored decoding on the Sample page (issue 17): a form that launches ``crystallab mcts`` as a detached job for the
page's checkpoint and prompt, its progress, and the search's best-so-far curve drawn live from
``best_so_far.csv`` (re-attached after a reload like every other job). The engine does the work
(`engine.sample.mcts`, `engine.evaluate.scorers`); the best crystals land as an ordinary sample set in ``OUT/best``,
which the Sample page's browser below lists with the others.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from engine.crystal.prompts import build_prompts
from engine.lab import jobs
from engine.lab.errors import ConfigError, InputError
from engine.sample.mcts_tree import SELECTORS, MCTSConfig
from pages import common, stability_panels

KIND = "mcts"
SCORERS = ("ehull", "energy", "random", "module:function")


def curve_chart(out_dir: Path, *, key: str) -> None:
    """The best score found so far against the simulation index (lower is better), as written so far."""
    from engine.sample.mcts import read_curve

    rows = read_curve(out_dir)
    if not rows:
        st.caption("Waiting for the first simulation...")
        return
    scored = [r for r in rows if r["best_score"] is not None]
    if scored:
        fig = go.Figure(go.Scatter(x=[r["simulation"] for r in scored], y=[r["best_score"] for r in scored],
                                   mode="lines+markers", line_shape="hv", name="best so far"))
        fig.update_layout(height=300, margin=dict(t=30, b=10), title="Best score so far (lower is better)",
                          xaxis_title="simulation", yaxis_title="score")
        st.plotly_chart(fig, key=key)
    last = rows[-1]
    best = f"best {last['best_score']:.4g}" if last["best_score"] is not None else "no valid crystal scored yet"
    st.caption(f"{int(last['simulation'])} simulations, {int(last['n_texts'])} completed texts, "
               f"{int(last['n_valid'])} valid, {int(last['n_distinct'])} distinct crystals, "
               f"{int(last['n_scorer_calls'])} scorer calls; {best}")


def _running(job: Path, key: str) -> None:
    state = jobs.job_state(job)
    target = Path(state.get("target") or job)

    @st.fragment(run_every=common.POLL_S)
    def _watch() -> None:
        common.following_note(KIND)
        now = jobs.job_state(job)
        if now["state"] != "running":
            st.rerun(scope="app")
        done = jobs.progress(job)
        st.progress(done[0] / done[1] if done and done[1] else 0.0,
                    text=f"Searching {job.name}: " + (f"{done[0]}/{done[1]} simulations" if done
                                                      else "loading the model and scorer..."))
        curve_chart(target, key=f"{key}_curve_live")
        if st.button("Stop", key=f"{key}_stop", icon=":material/stop:"):
            jobs.request_stop(job, grace_s=0)

    _watch()


def search(ckpt: Path, formula: str | None, z: int | None, sg: str | None, *, key: str) -> None:
    """The scored-decoding form for the page's checkpoint and prompt, or the running search with its live curve."""
    job = common.current_job(KIND)
    if job is None:  # a new session: the latest search, finished or not, with its curve
        job = next(iter(jobs.list_jobs(common.jobs_root(KIND))), None)
    if job is not None and jobs.job_state(job)["state"] == "running":
        _running(job, key)
        return
    if job is not None:
        state = jobs.job_state(job)
        if state["state"] in ("failed", "died"):
            common.job_panel(job, key=f"{key}_job")
        elif state.get("target"):
            best = Path(state["target"]) / "best"
            st.markdown(f"Last search **{job.name}**: " + (f"its best crystals are the sample set `{common.rel(best)}`"
                        " below." if best.is_dir() else "it found no valid crystal, so it has no best set."))
            curve_chart(Path(state["target"]), key=f"{key}_curve")
    d = MCTSConfig()
    with st.form(f"{key}_form", enter_to_submit=False):
        st.caption("Monte Carlo tree search over the model's tokens; every completed valid CIF is scored once per "
                   "distinct crystal, lower scores are better. A scorer `module.path:function` takes a pymatgen "
                   "Structure and returns a float.")
        c1, c2, c3 = st.columns(3)
        scorer = c1.selectbox("Scorer", SCORERS, key=f"{key}_scorer")
        hulls = stability_panels.hulls()
        hull = c2.selectbox("Hull (for ehull)", hulls or ["(none built)"], key=f"{key}_hull")
        custom = c3.text_input("Your scorer (module.path:function)", key=f"{key}_custom")
        c1, c2, c3, c4 = st.columns(4)
        sims = c1.number_input("Simulations", 1, 100_000, 50, key=f"{key}_sims")
        rollouts = c2.number_input("Rollouts per simulation", 1, 256, d.rollouts, key=f"{key}_rollouts")
        selector = c3.selectbox("Selector", SELECTORS, key=f"{key}_selector")
        c = c4.number_input("Exploration c", 0.01, 100.0, d.c, key=f"{key}_c")
        c1, c2, c3, c4 = st.columns(4)
        width = c1.number_input("Tree width", 1, 100, d.tree_width, key=f"{key}_width")
        temperature = c2.number_input("Rollout temperature", 0.0, 10.0, 1.0, 0.05, key=f"{key}_temp")
        max_tokens = c3.number_input("Rollout max new tokens", 16, 20_000, 3000, key=f"{key}_max_tokens")
        seed = c4.number_input("Search seed", 0, 2**31 - 1, d.seed, key=f"{key}_seed")
        default_name = f"mcts-{formula or 'unconditional'}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        name = st.text_input("Search name", value=default_name, key=f"{key}_name")
        go_ = st.form_submit_button("Search", icon=":material/account_tree:", key=f"{key}_go")
    if not go_:
        return
    with common.user_errors():
        name = jobs.check_name(name, "search name")
        out = common.settings().samples_dir / name
        if out.exists():
            raise InputError(f"{name!r} already exists; choose another search name")
        if len(build_prompts(formula, z=z, spacegroup=sg)) != 1:
            raise InputError("a search needs one cell: set Z (not 0), or give a cell composition such as Na4Cl4")
        spec = custom.strip() if scorer == "module:function" else scorer
        if not spec:
            raise ConfigError("give your scorer as module.path:function, or choose a built-in scorer")
        argv = ["mcts", "--ckpt", str(ckpt), "--scorer", spec, "--simulations", str(int(sims)),
                "--rollouts", str(int(rollouts)), "--selector", selector, "--c", str(float(c)),
                "--tree-width", str(int(width)), "--temperature", str(float(temperature)),
                "--max-new-tokens", str(int(max_tokens)), "--seed", str(int(seed)), "--out", str(out)]
        if spec == "ehull":
            if not hulls:
                raise InputError("no hull yet: build one with `crystallab hull build`, or choose the energy scorer")
            argv += ["--hull", hull]
        if formula:
            argv += ["--prompt", formula.strip()]
        if z:
            argv += ["--z", str(z)]
        if sg:
            argv += ["--sg", sg]
        common.launch(argv, KIND, name, target=out)
        st.session_state["sample_view"] = str(out / "best")
        st.rerun()

"""Dashboard responsiveness: time to first render of every page, and of the Sample page on a 1,000-sample set.

Renders run through ``streamlit.testing.v1.AppTest`` (the script run of a page, without a browser) against a
runs root: by default the tiny lab of the dashboard tests (``tests/app/lab.py``: dataset, trained checkpoint,
evaluated sample set, sweep), built once under ``<runs>/bench/dashboard-lab``; ``--runs`` points at another.
A synthetic 1,000-sample set (the lab's evaluated samples repeated, with their evaluation rows) is added to time
the sample table, gallery and zip download on a set of realistic size.

Timings, each page rendered in a new Python process:

- ``cold_s``: the page's first render in that process (imports of torch, pymatgen, plotly ... included), an
  upper bound for the first visit after a server start;
- ``warm_s``: a second render in a fresh AppTest with Streamlit's caches cleared: a first visit to the page on a
  server that already imported everything;
- the Sample page, both ways, on the lab's small set and on the synthetic 1,000-sample set.

    uv run python bench/dashboard.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from engine.lab.fsutil import atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402
from engine.lab.settings import REPO_ROOT, get_settings  # noqa: E402

APP = REPO_ROOT / "app.py"


def page_files() -> list[str]:
    """The dashboard's page scripts, relative to the repo."""
    return sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "pages").glob("*.py")
                  if p.name not in ("common.py", "__init__.py"))


def build_lab(base: Path) -> Path:
    """The dashboard tests' tiny lab under ``base`` (reused when complete); returns its runs root."""
    spec = importlib.util.spec_from_file_location("crystallab_test_lab", REPO_ROOT / "tests" / "app" / "lab.py")
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    return lab.make_lab(base, get_settings().cache_dir)


def smallest_evaluated_set(runs: Path) -> Path:
    """An evaluated sample set under ``runs/samples`` (fewest samples first), to replicate."""
    from engine.app.dashboard import find_sample_sets

    sets = [s for s in find_sample_sets(runs / "samples") if (s / "eval.csv").is_file()]
    if not sets:
        raise SystemExit(f"{runs / 'samples'} holds no evaluated sample set to build the synthetic set from")
    return min(sets, key=lambda s: sum(1 for _ in read_jsonl(s / "samples.jsonl")))


def make_synthetic_set(source: Path, out: Path, n: int) -> Path:
    """A sample set of ``n`` samples: ``source``'s samples (files, records, evaluation rows) repeated in turn."""
    import pandas as pd

    if out.exists():
        shutil.rmtree(out)
    (out / "raw").mkdir(parents=True)
    (out / "processed").mkdir()
    records = list(read_jsonl(source / "samples.jsonl"))
    ev = pd.read_csv(source / "eval.csv")
    ev_by_name = {Path(f).stem: row for f, (_, row) in zip(ev["file"], ev.iterrows())}
    width = max(4, len(str(n - 1)))
    lines, rows = [], []
    for i in range(n):
        rec = dict(records[i % len(records)])
        src_name = rec["name"]
        rec.update(index=i, name=f"{i:0{width}d}")
        shutil.copyfile(source / "raw" / f"{src_name}.txt", out / "raw" / f"{rec['name']}.txt")
        cif = source / "processed" / f"{src_name}.cif"
        if cif.exists():
            shutil.copyfile(cif, out / "processed" / f"{rec['name']}.cif")
        lines.append(json.dumps(rec, sort_keys=True))
        if src_name in ev_by_name:
            rows.append({**ev_by_name[src_name].to_dict(), "file": f"{rec['name']}.txt"})
    atomic_write_text(out / "samples.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(out / "eval.csv", pd.DataFrame(rows, columns=ev.columns).to_csv(index=False))
    for name in ("eval_summary.json",):
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    config = json.loads((source / "config.json").read_text())
    config["sampling"] = {**config.get("sampling", {}), "n": n}
    atomic_write_json(out / "config.json", config)
    return out


def _quiet_streamlit() -> None:
    """Silence Streamlit's bare-mode warnings (clearing caches outside a server run logs one per call)."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("streamlit"):
            logging.getLogger(name).setLevel(logging.ERROR)


def render(page: str, timeout_s: float, view: str | None = None) -> dict[str, Any]:
    """Seconds of one render of ``page`` in a fresh AppTest with Streamlit's caches cleared, and what it showed.

    Args:
        page: Page script relative to the repo (``pages/sample.py``).
        timeout_s: Most seconds the render may take.
        view: A sample set the Sample page should show (its ``sample_view`` session key).
    """
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    _quiet_streamlit()
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(APP), default_timeout=timeout_s)
    if view:
        at.session_state["sample_view"] = view
    at.switch_page(page)  # before the first run: the page is opened directly, as by its URL
    with benchlib.Timer() as timer:
        at.run()
    errors = [str(e.value)[:200] for e in at.exception]
    shown = {m.label: m.value for m in at.metric}
    return {"seconds": timer.seconds, "elements": len(list(at.main)), "samples_shown": shown.get("Samples"),
            "error": errors[0] if errors else None}


def render_in_fresh_process(page: str, runs: Path, timeout_s: float, view: Path | None = None) -> dict[str, Any]:
    """First render of ``page`` in a new Python process (``cold``: imports included), then a second one in a
    fresh AppTest with caches cleared (``warm``: what a page costs on a running server)."""
    argv = [sys.executable, __file__, "--render", page, "--runs", str(runs), "--timeout", str(timeout_s)]
    if view is not None:
        argv += ["--view", str(view)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3 * timeout_s)
    if done.returncode != 0:
        raise SystemExit(f"rendering {page} failed:\n{done.stderr[-3000:]}")
    cold, warm = json.loads(done.stdout.strip().splitlines()[-1])
    return {"page": page, "cold_s": cold["seconds"], "warm_s": warm["seconds"], "elements": warm["elements"],
            "samples_shown": warm["samples_shown"], "error": cold["error"] or warm["error"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=None,
                        help="runs root to render (default: the tests' tiny lab, built once under <runs>/bench)")
    parser.add_argument("--n-samples", type=int, default=1000, help="size of the synthetic sample set (default 1000)")
    parser.add_argument("--pages", default=None, help="comma-separated page scripts to time (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="most seconds one render may take")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default <runs>/bench/dashboard.json)")
    parser.add_argument("--render", default=None, help=argparse.SUPPRESS)  # child process: render one page
    parser.add_argument("--view", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.render:
        os.environ["CRYSTALLAB_RUNS"] = str(args.runs)
        print(json.dumps([render(args.render, args.timeout, args.view) for _ in range(2)]))
        return 0

    out = (args.out or benchlib.default_out("dashboard")).expanduser().resolve()
    runs = args.runs.expanduser().resolve() if args.runs else build_lab(out.parent / "dashboard-lab")
    os.environ["CRYSTALLAB_RUNS"] = str(runs)  # the lab's own folder is an allowed one (find_sample_sets checks)
    info = benchlib.machine_info("cpu")
    rows = []
    pages = [p.strip() for p in args.pages.split(",")] if args.pages else page_files()
    for page in pages:
        rows.append(render_in_fresh_process(page, runs, args.timeout))
        print(f"  {page}: cold {rows[-1]['cold_s']:.2f} s, warm {rows[-1]['warm_s']:.2f} s", flush=True)
    small = smallest_evaluated_set(runs)
    # Made after the page renders (it would be the newest set, which pages show by default) and removed after.
    big = make_synthetic_set(small, runs / "samples" / f"bench-synthetic-{args.n_samples}", args.n_samples)
    try:
        sample_rows = []
        for label, set_dir in (("lab sample set", small), (f"synthetic {args.n_samples}-sample set", big)):
            row = render_in_fresh_process("pages/sample.py", runs, args.timeout, view=set_dir)
            sample_rows.append({**row, "set": label, "n": sum(1 for _ in read_jsonl(set_dir / "samples.jsonl"))})
    finally:
        shutil.rmtree(big, ignore_errors=True)

    benchlib.print_table(rows, ["page", "cold_s", "warm_s", "elements", "error"],
                         title=f"first render per page ({runs})")
    benchlib.print_table(sample_rows, ["set", "n", "samples_shown", "cold_s", "warm_s", "elements", "error"],
                         title="Sample page")
    benchlib.write_result(out, {"benchmark": "dashboard", "machine": benchlib.finish(info), "runs": str(runs),
                                "pages": rows, "sample_page": sample_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

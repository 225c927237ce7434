"""`crystallab dashboard`: start the Streamlit lab bound to localhost, with the 3D viewer asset in place.

The server listens on 127.0.0.1 unless told otherwise (reach it from a laptop with
``ssh -L 8501:127.0.0.1:8501 server``), runs headless and sends no usage statistics. Before starting, the
3Dmol.js asset is fetched from the npm registry into the cache if it is missing ("first start"), so viewing
structures later never needs the internet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from engine.app.viewer import asset_status, ensure_3dmol_js
from engine.lab.fsutil import read_json, read_jsonl
from engine.lab.settings import REPO_ROOT, get_settings

APP_PATH = REPO_ROOT / "app.py"


def streamlit_command(port: int = 8501, address: str = "127.0.0.1", base_url_path: str = "") -> list[str]:
    """The ``streamlit run`` command line that serves the lab.

    Args:
        port: TCP port.
        address: interface to bind; keep 127.0.0.1 unless the machine's network is trusted.
        base_url_path: serve under this path prefix (e.g. ``lab`` behind a reverse proxy at /lab/).
    """
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP_PATH),
        "--server.port", str(port),
        "--server.address", address,
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]
    if base_url_path.strip("/"):
        cmd += ["--server.baseUrlPath", base_url_path.strip("/")]
    return cmd


def metrics_frame(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A training run's ``metrics.jsonl`` as a table (one row per record; empty with the usual columns)."""
    cols = ["step", "split", "loss", "lr", "tokens_per_s", "grad_norm", "elapsed_s", "time"]
    df = pd.DataFrame(list(read_jsonl(Path(run_dir) / "metrics.jsonl")))
    for c in cols:
        if c not in df.columns:
            df[c] = pd.Series(dtype="float64")
    return df


def training_progress(run_dir: str | os.PathLike) -> dict:
    """Where a training run stands: step of max, fraction done, ETA (s), throughput and latest losses.

    The ETA extrapolates the wall time per step since the run (or its resume) started; it is None before the
    first training record or once the run is not running.
    """
    status = read_json(Path(run_dir) / "status.json", {}) or {}
    df = metrics_frame(run_dir)
    train = df[df["split"] == "train"]
    val = df[df["split"] == "val"]
    step, max_steps = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    out = {
        "state": status.get("state", "pending"),
        "step": step,
        "max_steps": max_steps,
        "fraction": min(1.0, step / max_steps) if max_steps else 0.0,
        "train_loss": float(train["loss"].iloc[-1]) if len(train) else None,
        "val_loss": float(val["loss"].iloc[-1]) if len(val) else None,
        # The best validation loss so far, from the evaluations themselves: status.json only records it when a
        # checkpoint is saved, which left "-" on screen for a whole run whose step 0 was evaluated.
        "best_val_loss": min([float(v) for v in val["loss"].dropna()]
                             + ([float(status["best_val_loss"])] if status.get("best_val_loss") is not None
                                else []), default=None),
        "lr": float(train["lr"].iloc[-1]) if len(train) else None,
        "tokens_per_s": float(train["tokens_per_s"].iloc[-1]) if len(train) else None,
        "device": status.get("device"),
        "eta_s": None,
    }
    if out["state"] == "running" and len(train) and max_steps > step:
        out["eta_s"] = _eta_s(df, step, max_steps)
    return out


def _eta_s(df: pd.DataFrame, step: int, max_steps: int) -> float | None:
    """Seconds left, from the wall time per step measured since the latest (re)start, evaluations included.

    ``elapsed_s`` restarts from 0 on resume, so only the records after its last drop count. With two or more
    training records, their wall time per step (which includes the evaluations between them, and whatever
    else loads the machine) is extrapolated; with only the first, the time it took to reach it, which also
    holds the start-up and the step-0 evaluation, so the first estimate errs long rather than short.
    """
    recs = df.dropna(subset=["elapsed_s"])
    if recs.empty:
        return None
    elapsed = recs["elapsed_s"].to_numpy(float)
    restart = int(max((i for i in range(1, len(elapsed)) if elapsed[i] < elapsed[i - 1]), default=0))
    train = recs.iloc[restart:]
    train = train[train["split"] == "train"]
    if len(train) >= 2:
        d_step = train["step"].iloc[-1] - train["step"].iloc[0]
        d_time = recs["elapsed_s"].iloc[-1] - train["elapsed_s"].iloc[0]  # up to the newest record of any kind
        if d_step > 0 and d_time > 0:
            return float(d_time / d_step * (max_steps - step))
    if len(train) == 1 and train["step"].iloc[0] > 0 and train["elapsed_s"].iloc[0] > 0:
        first_step = int(train["step"].iloc[0])
        return float(train["elapsed_s"].iloc[0] / first_step * (max_steps - step))
    return None


def gpu_memory() -> list[dict] | None:
    """Used and total memory (GiB) of each NVIDIA GPU, all processes together; None without ``nvidia-smi``.

    Queried through ``nvidia-smi`` so the dashboard itself never opens a CUDA context on the GPU it reports.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        idx, name, used, total = (x.strip() for x in line.split(","))
        gpus.append({"index": int(idx), "name": name, "used_gb": float(used) / 1024,
                     "total_gb": float(total) / 1024})
    return gpus


def model_card(path: str | os.PathLike) -> dict:
    """What the Sample page shows about a checkpoint before sampling, for any model family, without loading it.

    Returns:
        ``family``, ``knobs`` (the family's `engine.models.family.Knob` tuple), ``problem`` (why it cannot be
        used, or None) and ``caption`` (one line: step, parameters, context, best validation loss).

    Raises:
        CheckpointError: the file cannot be read as a checkpoint.
    """
    from engine.models.family import get_family, peek_family

    family = peek_family(path)
    cls = get_family(family)
    card = cls.checkpoint_card(Path(path))
    return {"family": family, "knobs": cls.knobs, "problem": card["problem"], "caption": card["caption"]}


def find_sample_sets(root: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Sample-set folders (holding ``config.json`` and ``samples.jsonl``) under ``root``, newest first.

    A formula sampled for several Z is a folder of sets (``z1/``, ``z2/`` ...), and a sweep holds one set per
    cell, hence the search a few levels deep. A symlink that leads outside the lab's allowed folders (the runs
    root and ``CRYSTALLAB_DATA_DIRS``) is not followed.
    """
    root = Path(root)
    found: list[Path] = []
    allowed = get_settings().is_allowed

    def walk(folder: Path, level: int) -> None:
        if (folder / "samples.jsonl").is_file() and (folder / "config.json").is_file():
            found.append(folder)
            return
        if level == 0:
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and allowed(child):
                walk(child, level - 1)

    if root.is_dir():
        walk(root, depth)
    return sorted(found, key=lambda p: (p / "config.json").stat().st_mtime, reverse=True)


def sample_table(set_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per sample of a set: generation record joined with its evaluation row and a ``badge``.

    ``badge`` is ``valid`` (all CrystaLLM checks pass), ``invalid`` (parsed, some check fails), ``unparsable``
    (no structure could be read) or ``not evaluated``.
    """
    set_dir = Path(set_dir)
    gen = pd.DataFrame(list(read_jsonl(set_dir / "samples.jsonl")))
    if gen.empty:
        return pd.DataFrame(columns=["index", "name", "badge"])
    eval_path = set_dir / "eval.csv"
    if eval_path.is_file():
        ev = pd.read_csv(eval_path)
        # eval.csv names each row by its raw file (0003.txt); the evaluation's columns win over the generation
        # record's (its detected space group rather than the stated one).
        ev["name"] = [Path(f).stem for f in ev["file"]] if "file" in ev.columns else gen["name"][: len(ev)]
        gen = gen.drop(columns=[c for c in ev.columns if c in gen.columns and c != "name"])
        df = gen.merge(ev, on="name", how="left")
    else:
        df = gen
    if "is_valid" in df.columns:
        parsed = df["parse_ok"].fillna(False).astype(bool) if "parse_ok" in df.columns else df["postprocess_ok"]
        valid = df["is_valid"].fillna(False).astype(bool)
        df["badge"] = ["valid" if v else ("invalid" if p else "unparsable") for v, p in zip(valid, parsed)]
    else:
        df["badge"] = ["not evaluated" if ok else "unparsable" for ok in df["postprocess_ok"]]
    return df


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def sample_reason(row: dict | pd.Series) -> str | None:
    """Why a sample of :func:`sample_table` is not valid, in a few words a card can show; None when valid.

    Unparsable: the evaluation's failure reason and detail, else the post-processing reason. Invalid: each
    CrystaLLM check that failed (formula, multiplicities, bond lengths, space group) or the sanity reason
    (e.g. an absurd volume per atom).
    """
    badge = row.get("badge")
    if badge in ("valid", "not evaluated"):
        return None
    if badge == "unparsable":
        reason = _text(row.get("failure_reason")) or _text(row.get("postprocess_reason")) or "could not be read"
        detail = _text(row.get("failure_detail")) or _text(row.get("postprocess_error"))
        return reason.replace("_", " ") + (f": {detail}" if detail else "")
    if _text(row.get("failure_reason")):
        detail = _text(row.get("failure_detail"))
        return row["failure_reason"].replace("_", " ") + (f": {detail}" if detail else "")
    failed = []
    if row.get("formula_consistent") is False or row.get("formula_consistent") == 0:
        failed.append("formula inconsistent with its stated formula")
    if row.get("multiplicity_consistent") is False or row.get("multiplicity_consistent") == 0:
        failed.append("site multiplicities inconsistent")
    score = row.get("bond_length_score")
    if score is None or (isinstance(score, float) and pd.isna(score)):
        failed.append("bond lengths not scored")
    elif float(score) < 1.0:
        failed.append(f"bond lengths: {float(score):.0%} reasonable (needs 100%)")
    if row.get("space_group_consistent") is False or row.get("space_group_consistent") == 0:
        failed.append(f"space group: states {row.get('stated_spacegroup')}, is {row.get('spacegroup')}")
    return "; ".join(failed) or "a validity check failed"


def sample_set_zip(set_dir: str | os.PathLike) -> bytes:
    """A zip of a sample set: its processed CIFs, raw texts, config and evaluation files.

    Only files inside the lab's allowed folders go in: a symlink leading elsewhere is left out.
    """
    import io
    import zipfile

    set_dir = Path(set_dir)
    allowed = get_settings().is_allowed
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for sub in ("processed", "raw"):
            for f in sorted((set_dir / sub).glob("*")):
                if f.is_file() and allowed(f):
                    zf.write(f, f"{set_dir.name}/{sub}/{f.name}")
        for name in ("config.json", "samples.jsonl", "eval.csv", "eval_summary.json"):
            if (set_dir / name).is_file() and allowed(set_dir / name):
                zf.write(set_dir / name, f"{set_dir.name}/{name}")
    return buf.getvalue()


def extend_data_dirs(dirs: list[str] | None) -> None:
    """Add ``--data-dir`` folders to ``CRYSTALLAB_DATA_DIRS`` (this process, hence the Streamlit server it
    becomes), so the dashboard may read files from them.

    Raises:
        InputError: a folder does not exist.
    """
    from engine.lab.errors import InputError

    extra = []
    for d in dirs or []:
        path = Path(d).expanduser().resolve()
        if not path.is_dir():
            raise InputError(f"--data-dir {d}: no such folder; give an existing folder the dashboard may read from")
        extra.append(str(path))
    if extra:
        current = [p for p in os.environ.get("CRYSTALLAB_DATA_DIRS", "").split(os.pathsep) if p.strip()]
        os.environ["CRYSTALLAB_DATA_DIRS"] = os.pathsep.join(dict.fromkeys(current + extra))



def address_warning(address: str) -> str | None:
    """A warning when ``address`` makes the lab reachable from other machines (None for loopback addresses)."""
    import ipaddress

    if address.strip().lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(address.strip().strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: whatever it resolves to, it is not obviously this machine only
        pass
    return (f"--address {address} serves the lab beyond this machine: anyone who can reach it can use the lab "
            "(read and write its runs, start jobs) with no login. Prefer 127.0.0.1 and an SSH tunnel "
            "(ssh -L 8501:127.0.0.1:8501 server), or put it behind an authenticating proxy.")


def _run(args: argparse.Namespace) -> int:
    extend_data_dirs(args.data_dir)
    if (warning := address_warning(args.address)) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    if ensure_3dmol_js(download=not args.offline) is None:
        print(f"warning: {asset_status()}; 3D views will fall back to a simple plot", file=sys.stderr)
    settings = get_settings()
    if settings.data_dirs:
        print(f"crystallab dashboard: may also read {', '.join(map(str, settings.data_dirs))}", file=sys.stderr)
    print(f"crystallab dashboard: runs in {settings.runs_dir}; open http://{args.address}:{args.port}/"
          f"{args.base_url_path.strip('/')}", file=sys.stderr)
    cmd = streamlit_command(args.port, args.address, args.base_url_path)
    # Streamlit reads .streamlit/config.toml from the working directory: serve from the checkout.
    os.chdir(REPO_ROOT)
    os.execv(cmd[0], cmd)  # replace this process so Ctrl-C and service managers talk to Streamlit directly
    return 0  # not reached


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dashboard", help="start the Streamlit lab (127.0.0.1:8501 by default)")
    p.add_argument("--port", type=int, default=8501, help="TCP port (default 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; use an SSH tunnel to reach it remotely)")
    p.add_argument("--base-url-path", default="", help="serve under this URL path, e.g. 'lab' for /lab/")
    p.add_argument("--data-dir", action="append", metavar="DIR",
                   help="a folder the dashboard may read user files from (repeatable; added to "
                        "CRYSTALLAB_DATA_DIRS), e.g. ../shared/data for the structure-prediction targets")
    p.add_argument("--offline", action="store_true",
                   help="do not try to fetch 3Dmol.js from the npm registry if it is not cached")
    p.set_defaults(func=_run)

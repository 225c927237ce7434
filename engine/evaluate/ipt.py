"""The IPT probe (Gruver et al., ICLR 2024): how much a model's perplexity depends on where the atoms sit.

A crystal does not change when all its atoms move by the same fractional translation g, but its text does. For a
held-out structure s and random translations g_1..g_k,

    IPT(s) = mean_i PPL(t_gi(s)) - min_i PPL(t_gi(s)),

with PPL the model's perplexity of the structure's text, regenerated after each translation in the family's own
text format (`FamilyModel.structure_text`; canonical CIF for CrystaLLM's GPT). A translation-invariant model scores
0; the paper finds that augmentation and model size lower IPT. Any family that scores sequences can be probed:
only `FamilyModel.sequence_log_likelihood` is used. Translations are drawn from ``(seed, structure index)``, so
every checkpoint of one probe sees the same translated structures and a rerun gives the same numbers.

CLI: ``crystallab ipt --ckpt A.pt [--ckpt B.pt] --structures test.csv --translations 10 --n 50 --seed 0 --out DIR``
writes ``DIR/ipt.csv`` (one row per checkpoint and structure) and ``DIR/ipt_summary.json`` (per checkpoint); the
Compare page lists the summaries found under ``<runs>/ipt/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.lab.errors import InputError

SUMMARY = "ipt_summary.json"
ROWS = "ipt.csv"


@dataclass(frozen=True)
class IptRow:
    """One structure under one model. Perplexities are per token (exp of mean negative log-likelihood)."""

    checkpoint: str
    structure_id: str
    formula: str
    n_sites: int
    ppl_original: float
    """Perplexity of the untranslated structure's text."""
    ppl_mean: float
    """Mean perplexity over the translations."""
    ppl_min: float
    ppl_max: float
    ipt: float
    """``ppl_mean - ppl_min`` (>= 0; 0 for a translation-invariant model)."""


def load_structures(source: str | Path, n: int, seed: int) -> tuple[list[tuple[str, Any]], list[dict[str, str]]]:
    """Up to ``n`` structures from a CSV with a ``cif`` column (MP-20 style) or a folder of ``.cif`` files.

    Which ``n`` is a seeded choice (sorted back into file order), so a probe is repeatable. Returns
    ``([(id, Structure)], [{"id", "reason"} for entries that did not parse])``.

    Raises:
        InputError: the source is missing, a CSV without a ``cif`` column, or a folder without ``.cif`` files.
    """
    import pandas as pd
    from pymatgen.core import Structure

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.cif"))
        if not files:
            raise InputError(f"--structures {path} holds no .cif files; pass a folder of CIFs or a CSV with a cif column")
        entries = [(f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files]
    elif path.is_file():
        df = pd.read_csv(path)
        if "cif" not in df.columns:
            raise InputError(f"--structures {path} has no 'cif' column (columns: {', '.join(map(str, df.columns))}); "
                             "pass a CSV such as MP-20's test.csv or a folder of .cif files")
        ids = df["material_id"] if "material_id" in df.columns else pd.Series(range(len(df))).astype(str)
        entries = list(zip(ids.astype(str), df["cif"].astype(str)))
    else:
        raise InputError(f"--structures {path} does not exist; pass a CSV with a cif column or a folder of .cif files")
    if n < len(entries):
        keep = np.sort(np.random.default_rng(seed).choice(len(entries), size=n, replace=False))
        entries = [entries[i] for i in keep]
    out, skipped = [], []
    for sid, text in entries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pymatgen warns about rounding in many published CIFs
                out.append((sid, Structure.from_str(text, fmt="cif")))
        except (ValueError, KeyError, IndexError, AssertionError) as exc:
            skipped.append({"id": sid, "reason": f"unparseable CIF: {str(exc).splitlines()[0][:160]}"})
    return out, skipped


def translations_for(seed: int, index: int, k: int) -> np.ndarray:
    """The ``k`` fractional translations (k, 3) of structure ``index`` in a probe seeded ``seed``."""
    return np.random.default_rng([seed, index]).random((k, 3))


def probe_model(model: Any, label: str, structures: list[tuple[str, Any]], translations: int, seed: int,
                progress: Callable[[int, int], None] | None = None, texts_cache: dict | None = None
                ) -> tuple[list[IptRow], list[dict[str, str]]]:
    """IPT of every structure under one `FamilyModel`; structures its format cannot write are skipped (reason).

    ``texts_cache`` (one dict shared by the checkpoints of a probe) keeps the translated texts per text format, so
    checkpoints of one family do not symmetrize the same structures again.
    """
    from engine.crystal.canonical import translated

    rows, skipped = [], []
    cache = {} if texts_cache is None else texts_cache
    for i, (sid, s) in enumerate(structures):
        key = (model.text_format, i)
        if key not in cache:
            try:
                cache[key] = [model.structure_text(s)] + [model.structure_text(translated(s, g))
                                                          for g in translations_for(seed, i, translations)]
            except InputError as exc:
                cache[key] = str(exc)
        texts = cache[key]
        if isinstance(texts, str):
            skipped.append({"id": sid, "reason": texts})
            continue
        ppl = [score.perplexity for score in model.sequence_log_likelihood(texts)]
        moved = np.array(ppl[1:])  # (translations,)
        rows.append(IptRow(label, sid, s.composition.reduced_formula, len(s), ppl[0], float(moved.mean()),
                           float(moved.min()), float(moved.max()), float(moved.mean() - moved.min())))
        if progress:
            progress(i + 1, len(structures))
    return rows, skipped


def summarize(rows: list[IptRow]) -> dict[str, Any]:
    """Mean, median and spread of IPT and perplexity over a checkpoint's structures (NaN when none scored)."""
    ipt = np.array([r.ipt for r in rows], dtype=float)
    ppl = np.array([r.ppl_mean for r in rows], dtype=float)
    nan = math.nan
    return {"n_structures": len(rows), "ipt_mean": float(ipt.mean()) if len(ipt) else nan,
            "ipt_median": float(np.median(ipt)) if len(ipt) else nan,
            "ipt_std": float(ipt.std(ddof=1)) if len(ipt) > 1 else nan,
            "ppl_mean": float(ppl.mean()) if len(ppl) else nan}


def checkpoint_label(path: Path) -> str:
    """``<run>-<best|last>`` for a run's checkpoint (``.../train/RUN/ckpt/best.pt``), else the file name."""
    return f"{path.parent.parent.name}-{path.stem}" if path.parent.name == "ckpt" else path.name


def run_probe(ckpts: list[Path], structures: str | Path, *, translations: int = 10, n: int = 50, seed: int = 0,
              out: Path, device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Probe each checkpoint on the same structures and translations; write ``ipt.csv`` and ``ipt_summary.json``.

    Raises:
        InputError: bad structures source, or fewer than 2 translations / 1 structure asked for.
        CheckpointError: a checkpoint cannot be loaded.
    """
    import pandas as pd

    from engine.lab.fsutil import atomic_write_json, atomic_write_text
    from engine.models.family import load_family_model, provenance

    if translations < 2:
        raise InputError(f"--translations {translations}: IPT needs at least 2 translations (the paper uses 10+)")
    if n < 1:
        raise InputError(f"--n {n}: probe at least 1 structure")
    loaded, unparsed = load_structures(structures, n, seed)
    all_rows: list[IptRow] = []
    texts_cache: dict = {}
    summary: dict[str, Any] = {"structures": str(structures), "n_requested": n, "translations": translations,
                               "seed": seed, "unparsed": unparsed, "checkpoints": [],
                               "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for path in ckpts:
        model = load_family_model(path, device)
        label = checkpoint_label(Path(path))
        report = None
        if progress:
            def report(done: int, total: int, label: str = label) -> None:
                print(f"\r{label}: {done}/{total} structures", end="", file=sys.stderr, flush=True)
        rows, skipped = probe_model(model, label, loaded, translations, seed, report, texts_cache)
        if progress:
            print(file=sys.stderr)
        all_rows += rows
        summary["checkpoints"].append({"label": label, "family": model.family, **provenance(model),
                                       **summarize(rows), "skipped": skipped})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / ROWS, pd.DataFrame([asdict(r) for r in all_rows],
                                               columns=list(IptRow.__dataclass_fields__)).to_csv(index=False))
    atomic_write_json(out / SUMMARY, summary)
    return summary


def ipt_table(root: Path) -> Any:
    """One row per probed checkpoint of every ``ipt_summary.json`` under ``root`` (newest probe first)."""
    import pandas as pd

    from engine.lab.fsutil import read_json

    rows = []
    for path in sorted(root.glob(f"**/{SUMMARY}"), key=lambda p: p.stat().st_mtime, reverse=True):
        summary = read_json(path) or {}
        for c in summary.get("checkpoints", []):
            rows.append({"probe": path.parent.name, "checkpoint": c.get("label"), "family": c.get("family"),
                         "structures": c.get("n_structures"), "translations": summary.get("translations"),
                         "IPT mean": c.get("ipt_mean"), "IPT median": c.get("ipt_median"),
                         "perplexity": c.get("ppl_mean"), "seed": summary.get("seed")})
    return pd.DataFrame(rows)


def _cmd_ipt(args: argparse.Namespace) -> int:
    from engine.lab.settings import get_settings
    from engine.models.checkpoint import cli_checkpoint_path

    out = Path(args.out) if args.out else (
        get_settings().runs_dir / "ipt" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    summary = run_probe([cli_checkpoint_path(c) for c in args.ckpt], args.structures, translations=args.translations,
                        n=args.n, seed=args.seed, out=out, device=args.device, progress=not args.no_progress)
    for c in summary["checkpoints"]:
        print(f"{c['label']}: IPT mean {c['ipt_mean']:.4f} (median {c['ipt_median']:.4f}) over "
              f"{c['n_structures']} structures, mean perplexity {c['ppl_mean']:.4f}; skipped {len(c['skipped'])}")
    print(f"wrote {out / ROWS} and {out / SUMMARY}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab ipt``."""
    p = subparsers.add_parser("ipt", help="translation-invariance probe (IPT) of checkpoints on held-out structures",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint to probe (repeatable; any family)")
    p.add_argument("--structures", required=True, help="CSV with a cif column (e.g. MP-20 test.csv) or a folder "
                   "of .cif files")
    p.add_argument("--translations", type=int, default=10, help="random fractional translations per structure")
    p.add_argument("--n", type=int, default=50, help="structures to probe (a seeded choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the structure choice and the translations")
    p.add_argument("--out", help="folder for ipt.csv and ipt_summary.json (default <runs>/ipt/<time>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.set_defaults(func=_cmd_ipt)

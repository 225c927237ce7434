"""What distillation bought and what it lost: students against their teacher and same-size baselines.

`distill_report` measures, for a teacher and any students (each optionally with its undistilled baseline):

- parameters and size (MB of float32 weights);
- validation loss (nats/token) on the *real* validation split, the same fixed windows for every model;
- the share of the teacher gap closed: ``(L_baseline - L_student) / (L_baseline - L_teacher)`` (1 = as good as
  the teacher, 0 = no better than training without the teacher, negative = worse);
- validity, uniqueness (valid) and formula / space-group hit rates of ``n`` samples per prompt, drawn with the
  same prompts, knobs and seeds as the teacher (`engine.sample.sample_sets.write_sample_set`, evaluated by the
  lab's checks; the sample sets stay in the report folder, so a rerun reuses them);
- sampling tokens/s and CIFs/s at batch 1 and at a large batch, every model timed in one process, interleaved, and
  the speed-up over the teacher;
- the target verdict: a student at least ``speedup_target`` x faster (large batch) keeps at least
  ``retention_target`` of the teacher's validity, or by how much it misses.

`write_report` writes ``distill_report.json`` and ``distill_report.md``; `engine.train.chain` calls both.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from engine.lab.fsutil import atomic_write_json, atomic_write_text, read_json

REPORT_JSON = "distill_report.json"
REPORT_MD = "distill_report.md"


def model_size(path: str | Path) -> dict[str, Any]:
    """Parameters (all, tied weights once) and MB of float32 weights of a checkpoint's model."""
    from engine.models.family import load_family_model

    info = load_family_model(path, "cpu").describe()
    n = int(info.get("n_params") or 0)
    return {"params": n, "size_mb": round(n * 4 / 1e6, 3), "n_layer": info.get("n_layer"),
            "n_embd": info.get("n_embd"), "n_head": info.get("n_head"), "block_size": info.get("block_size")}


@torch.no_grad()
def validation_loss(path: str | Path, dataset: str | Path, *, batches: int = 8, batch_size: int = 8,
                    window: int | None = None, seed: int = 1337) -> float:
    """Mean next-token cross-entropy (nats/token) on fixed windows of the dataset's validation split.

    The windows depend only on ``seed``, ``window`` and the data, so every model is scored on the same tokens.
    """
    from engine.data.datasets import resolve_dataset_dir
    from engine.data.tokens import load_token_dataset
    from engine.models.checkpoint import load_model
    from engine.train.batches import WindowSampler

    ds = load_token_dataset(resolve_dataset_dir(dataset))
    model, _ = load_model(path, "cpu")
    w = min(window or model.config.block_size, model.config.block_size, len(ds.val) - 1)
    sampler = WindowSampler(ds.val, w, batch_size, seed, ds.val_starts)
    losses = [float(model(*sampler.batch("distill-report", k))[1]) for k in range(batches)]
    return float(np.mean(losses))


def sample_quality(path: str | Path, prompts: Sequence[Any], out: Path, *, n: int, seed: int,
                   knobs: Mapping[str, Any] | None, batch_size: int | None = None) -> dict[str, Any]:
    """Validity, uniqueness and hit rates of ``n`` samples per prompt, per prompt and averaged over prompts."""
    from engine.models.family import load_family_model, resolve_knobs
    from engine.sample.sample_sets import write_sample_set

    model = load_family_model(path, "cpu")
    k = resolve_knobs(type(model), knobs, "report sampling knobs")
    per_prompt = {}
    for i, prompt in enumerate(prompts):
        set_dir = out / f"p{i:02d}-{prompt.label.replace('/', '_').replace(' ', '_')}"
        write_sample_set(model, prompt, set_dir, n=n, knobs=k, seed=seed, batch_size=batch_size, evaluate=True,
                         progress=None)
        m = read_json(set_dir / "eval_summary.json") or {}
        per_prompt[prompt.label] = {name: (m.get(name) or {}).get("value") for name in
                                    ("n", "parse_rate", "validity", "uniqueness_valid", "formula_hit_rate",
                                     "spacegroup_hit_rate")}
    mean = {}
    for name in ("parse_rate", "validity", "uniqueness_valid", "formula_hit_rate", "spacegroup_hit_rate"):
        values = [v[name] for v in per_prompt.values() if v[name] is not None]
        mean[name] = float(np.mean(values)) if values else None
    return {"per_prompt": per_prompt, **mean}


def sampling_speed(paths: Mapping[str, str | Path], prompt: Any, *, batch_sizes: Sequence[int] = (1, 32),
                   samples_per_batch_size: Mapping[int, int] | None = None, seed: int = 1337,
                   knobs: Mapping[str, Any] | None = None, rounds: int = 1) -> dict[str, dict[str, Any]]:
    """Tokens/s and CIFs/s of every model at each batch size, all timed in this process, interleaved.

    Args:
        paths: name -> checkpoint.
        samples_per_batch_size: samples drawn at each batch size (default: 2 at batch 1, one batch otherwise).
        rounds: repetitions; each model's best round counts (the least disturbed by other work on the host).
    """
    from engine.models.family import load_family_model, resolve_knobs

    models = {name: load_family_model(p, "cpu") for name, p in paths.items()}
    counts = dict(samples_per_batch_size or {})
    out: dict[str, dict[str, Any]] = {name: {} for name in models}
    for b in batch_sizes:
        n = counts.get(b, 2 if b == 1 else b)
        for _ in range(rounds):
            for name, model in models.items():
                k = resolve_knobs(type(model), knobs, "speed knobs")
                t0 = time.perf_counter()
                gens = model.generate(prompt, n, k, seed=seed, batch_size=b)
                dt = time.perf_counter() - t0
                tokens = sum(g.n_new_tokens for g in gens)
                best = out[name].get(f"b{b}")
                if best is None or tokens / dt > best["tokens_per_s"]:
                    out[name][f"b{b}"] = {"batch_size": b, "samples": n, "tokens": tokens, "seconds": round(dt, 3),
                                          "tokens_per_s": round(tokens / dt, 1), "cifs_per_s": round(n / dt, 3)}
    return out


def gap_closed(student: float | None, baseline: float | None, teacher: float | None) -> float | None:
    """``(L_baseline - L_student) / (L_baseline - L_teacher)``; None when the teacher is not better than the
    baseline (no gap to close) or a loss is missing."""
    if None in (student, baseline, teacher) or not baseline > teacher:  # type: ignore[operator]
        return None
    return (baseline - student) / (baseline - teacher)  # type: ignore[operator]


def distill_report(teacher: str | Path, students: Sequence[Mapping[str, Any]], *, dataset: str | Path,
                   prompts: Sequence[Any], out: Path, n: int = 200, seed: int = 1337,
                   knobs: Mapping[str, Any] | None = None, speed_batch: int = 32, speed_rounds: int = 1,
                   sample_baselines: bool = True, retention_target: float = 0.9, speedup_target: float = 3.0,
                   val_batches: int = 8, batch_size: int | None = None, window: int | None = None) -> dict[str, Any]:
    """Measure a teacher and its students (and baselines) and return the report dict (see the module docstring).

    Args:
        students: ``{"name", "path", "baseline" (path or None), "parent" (name of its teacher, for chains)}``.
        out: Folder for the sample sets (``out/samples/<model>/...``).
    """
    models: dict[str, dict[str, Any]] = {"teacher": {"role": "teacher", "path": str(teacher), "parent": None}}
    for s in students:
        models[s["name"]] = {"role": "student", "path": str(s["path"]), "parent": s.get("parent") or "teacher"}
        if s.get("baseline"):
            models[f"{s['name']}-baseline"] = {"role": "baseline", "path": str(s["baseline"]), "parent": None,
                                               "of": s["name"]}
    for m in models.values():
        m.update(model_size(m["path"]))
    window = window or min(int(m["block_size"]) for m in models.values())  # the same tokens for every model
    for name, m in models.items():
        m["val_loss"] = round(validation_loss(m["path"], dataset, batches=val_batches, seed=seed, window=window), 4)
        if m["role"] != "baseline" or sample_baselines:
            m["sampling"] = sample_quality(m["path"], prompts, out / "samples" / name, n=n, seed=seed, knobs=knobs,
                                           batch_size=batch_size)
    speed = sampling_speed({name: m["path"] for name, m in models.items()}, prompts[0],
                           batch_sizes=(1, speed_batch), seed=seed, knobs=knobs, rounds=speed_rounds)
    t = models["teacher"]
    for name, m in models.items():
        m["speed"] = speed[name]
        m["speedup"] = {key: round(v["tokens_per_s"] / t["speed"][key]["tokens_per_s"], 2)
                        for key, v in speed[name].items() if t["speed"][key]["tokens_per_s"]}
    for s in students:
        m = models[s["name"]]
        base = models.get(f"{s['name']}-baseline")
        m["baseline_val_loss"] = base["val_loss"] if base else None
        gap = gap_closed(m["val_loss"], m["baseline_val_loss"], t["val_loss"])
        m["gap_closed"] = None if gap is None else round(gap, 3)
        tv, sv = (t.get("sampling") or {}).get("validity"), (m.get("sampling") or {}).get("validity")
        m["validity_retention"] = round(sv / tv, 3) if tv and sv is not None else None
        m["target"] = _verdict(m, retention_target, speedup_target, f"b{speed_batch}", tv)
    return {
        "teacher": str(teacher), "dataset": str(dataset), "n_per_prompt": n, "seed": seed,
        "prompts": [p.to_dict() for p in prompts], "knobs": dict(knobs or {}), "speed_batch": speed_batch,
        "targets": {"speedup": speedup_target, "validity_retention": retention_target},
        "models": models, "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    }


def _verdict(m: Mapping[str, Any], retention: float, speedup: float, key: str, teacher_validity: Any) -> str:
    fast, kept = (m.get("speedup") or {}).get(key), m.get("validity_retention")
    if fast is not None and teacher_validity == 0:
        return f"not measurable: the teacher wrote no valid CIF; {fast:g}x faster"
    if fast is None or kept is None:
        return "not measured"
    if fast < speedup:
        return f"not a {speedup:g}x student: {fast:g}x faster (short by {speedup - fast:.2f}x)"
    if kept >= retention:
        return f"met: {fast:g}x faster, keeps {kept:.0%} of the teacher's validity"
    return f"missed: {fast:g}x faster but keeps {kept:.0%} of the teacher's validity ({retention - kept:.0%} short)"


def ordered_models(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Teacher first, then students largest first, each followed by its baseline (JSON loses insertion order)."""
    models = report["models"]
    out = [(n, m) for n, m in models.items() if m["role"] == "teacher"]
    for name, m in sorted(((n, m) for n, m in models.items() if m["role"] == "student"),
                          key=lambda nm: (-nm[1]["params"], nm[0])):
        out.append((name, m))
        out += [(n, b) for n, b in models.items() if b["role"] == "baseline" and b.get("of") == name]
    return out + [(n, m) for n, m in models.items() if (n, m) not in out]


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1%}" if pct else (f"{v:,}" if isinstance(v, int) else f"{v:g}")


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown table plus its definitions."""
    b = f"b{report['speed_batch']}"
    lines = [
        f"# Distillation report ({report['created_at']})", "",
        f"Teacher `{report['teacher']}`; validation data `{report['dataset']}`; {report['n_per_prompt']} samples per "
        f"prompt ({', '.join(p.get('label') or p.get('text', '')[:20] for p in report['prompts'])}), seed "
        f"{report['seed']}, knobs {report['knobs'] or 'family defaults'}; machine: {report['machine']}.", "",
        "| model | role | parent | params | MB | val loss | gap closed | parsed | validity | uniq. (valid) | "
        f"formula hit | sg hit | tok/s b1 | tok/s b{report['speed_batch']} | CIFs/s b{report['speed_batch']} | "
        f"speed-up b1 | speed-up b{report['speed_batch']} | target |",
        "|" + "---|" * 18,
    ]
    for name, m in ordered_models(report):
        s, sp = m.get("sampling") or {}, m.get("speed") or {}
        lines.append("| " + " | ".join([
            name, m["role"], m.get("parent") or (f"(baseline of {m['of']})" if m.get("of") else "-"),
            _fmt(m["params"]), _fmt(m["size_mb"]),
            _fmt(m["val_loss"]), _fmt(m.get("gap_closed")), _fmt(s.get("parse_rate"), True),
            _fmt(s.get("validity"), True),
            _fmt(s.get("uniqueness_valid"), True), _fmt(s.get("formula_hit_rate"), True),
            _fmt(s.get("spacegroup_hit_rate"), True), _fmt((sp.get("b1") or {}).get("tokens_per_s")),
            _fmt((sp.get(b) or {}).get("tokens_per_s")), _fmt((sp.get(b) or {}).get("cifs_per_s")),
            _fmt((m.get("speedup") or {}).get("b1")), _fmt((m.get("speedup") or {}).get(b)),
            m.get("target") or "-",
        ]) + " |")
    lines += ["", "Definitions: val loss = next-token cross-entropy (nats/token) on fixed windows of the real "
              "validation split; gap closed = (baseline - student) / (baseline - teacher) validation loss; parsed = "
              "post-processed CIF parses into a structure / n; validity "
              "= CrystaLLM-valid / n, uniqueness = distinct valid structures / n (StructureMatcher defaults), hit "
              "rates = samples matching the prompt's composition / space group / n, averaged over prompts; speed = "
              "generated tokens/s and CIFs/s, every model timed in one process; speed-up = student / teacher "
              f"tokens/s. Target: >= {report['targets']['speedup']:g}x faster at batch {report['speed_batch']} and "
              f">= {report['targets']['validity_retention']:.0%} of the teacher's validity.", ""]
    return "\n".join(lines)


def report_table(report: Mapping[str, Any]) -> Any:
    """A pandas table of the report's models, one row each (the Compare page shows it)."""
    import pandas as pd

    b = f"b{report['speed_batch']}"
    rows = []
    for name, m in ordered_models(report):
        s, sp, up = m.get("sampling") or {}, m.get("speed") or {}, m.get("speedup") or {}
        rows.append({"model": name, "role": m["role"], "params": m["params"], "MB": m["size_mb"],
                     "val loss": m["val_loss"], "gap closed": _fmt(m.get("gap_closed")),
                     "validity": _fmt(s.get("validity"), True), "unique (valid)": _fmt(s.get("uniqueness_valid"), True),
                     "tok/s b1": _fmt((sp.get("b1") or {}).get("tokens_per_s")),
                     f"tok/s {b}": _fmt((sp.get(b) or {}).get("tokens_per_s")),
                     f"speed-up {b}": _fmt(up.get(b)), "target": m.get("target") or "-"})
    return pd.DataFrame(rows)


def write_report(report: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    """``distill_report.json`` and ``distill_report.md`` in ``folder``, atomically."""
    return (atomic_write_json(folder / REPORT_JSON, report),
            atomic_write_text(folder / REPORT_MD, report_markdown(report)))


def find_reports(root: Path) -> list[Path]:
    """Every ``distill_report.json`` under ``root`` (the runs folder), newest first."""
    if not root.exists():
        return []
    return sorted(root.rglob(REPORT_JSON), key=lambda p: p.stat().st_mtime, reverse=True)

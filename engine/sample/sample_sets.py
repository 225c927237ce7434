"""Sample-set folders: drawing a sample set into its folder, resumably, and the ``crystallab sample`` CLI.

Sample sets (`sample_to_dir`, ``crystallab sample``): ``config.json`` (prompt, sampling parameters, checkpoint
path/step/sha256/run, device, elapsed_s and tokens_per_s of generation), ``raw/NNNN.txt`` (full text, prompt
included), ``processed/NNNN.cif`` (post-processed successes; a text cut at ``max_new_tokens`` is recorded as a
``truncated`` failure, never written there), ``samples.jsonl`` (per sample: index, n_new_tokens, finished,
truncated_reason, postprocess_ok/reason/error). They are written batch by batch into the hidden sibling
``.<name>.partial/`` and renamed into place when complete, so a killed run keeps its finished batches and the same
command continues it (`write_sample_set`); evaluation (``eval.csv``, ``eval_summary.json``) follows, and is
finished by the same command when it was killed. The CLI draws ``--n`` samples
per prompt: a reduced formula without ``--z`` gives one set per Z, in ``z1/``, ``z2/``, ... under ``--out``.

Decoding itself (`generate`, constraints, seeds, devices) is `engine.sample.sampler`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from engine import __version__
from engine.crystal.postprocess import postprocess
from engine.crystal.prompts import Prompt, build_prompts
from engine.lab.errors import InputError
from engine.lab.fsutil import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    read_json,
    read_jsonl,
    remove_stale_temporaries,
)
from engine.lab.jobs import OWNER_FILE, hold_folder
from engine.lab.settings import get_settings
from engine.models.checkpoint import cli_checkpoint_path
from engine.models.family import (
    FamilyModel,
    add_knob_arguments,
    knobs_from_args,
    load_family_model,
    provenance,
    resolve_knobs,
    shared_knobs,
)
from engine.sample.sampler import DEFAULT_BATCH_SIZE, check_counts, resolve_device


def sample_to_dir(
    ckpt: str | os.PathLike,
    prompt: Prompt,
    out_dir: str | os.PathLike,
    *,
    n: int,
    temperature: float = 0.8,
    top_k: int | None = 10,
    top_p: float = 1.0,
    max_new_tokens: int = 3000,
    seed: int = 1337,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    constrain: bool = True,
    knobs: dict | None = None,
    evaluate: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Load a model of any family, sample ``n`` CIFs for ``prompt`` and write a sample set (ARCHITECTURE.md).

    Resumable (see `write_sample_set`): the same call after a kill continues where it stopped, and finishes the
    evaluation of a set that was killed while being evaluated.

    Args:
        ckpt: Checkpoint file.
        prompt: From `engine.crystal.prompts.build_prompts`.
        out_dir: Folder to create; it must not exist, be empty, or hold this very request (continued).
        constrain: Restrict element tokens to the prompt's elements (when it has a composition) and the token
            after the H-M tag to space-group symbols (see the module docstring).
        knobs: Further sampling knobs of the checkpoint's family by name; the GPT-style arguments above are used
            for the families that have them.
        evaluate: Run ``engine.evaluate.evaluation.evaluate_sample_set`` on the finished set.
        Others: as `generate`; ``device="auto"`` picks CUDA when available.

    Returns:
        ``out_dir``.

    Raises:
        InputError: ``out_dir`` holds something other than this request's sample set, or cannot be written.
        CheckpointError, ConfigError, PromptError: as `load_family_model` and `generate`.
    """
    dev = resolve_device(device)
    check_counts(n, batch_size)
    out = _check_target(out_dir)
    model = load_family_model(ckpt, dev)
    flags = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                 constrain=constrain)
    resolved = resolve_knobs(type(model), {**shared_knobs(type(model), flags), **(knobs or {})})
    return write_sample_set(model, prompt, out, n=n, knobs=resolved, seed=seed, batch_size=batch_size,
                            evaluate=evaluate, progress=progress)


PARTIAL_SUFFIX = ".partial"
"""A set being written lives in the hidden sibling ``.<name>.partial/`` until it is complete."""
REQUEST_KEYS = ("prompt", "sampling", "checkpoint")
"""The parts of ``config.json`` that identify a request: the same values continue a set, others are refused."""


def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def _check_target(out_dir: str | os.PathLike) -> Path:
    """The absolute output folder, refused before any work when it can hold no sample set or cannot be written.

    A folder holding a sample set (complete or not) passes: whether it is the same request is decided once the
    request is known (`write_sample_set`).

    Raises:
        InputError: a file, a non-empty folder that is no sample set, or a folder that cannot be written.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file: choose another output folder")
    if out.is_dir() and any(p.name != OWNER_FILE for p in out.iterdir()) and not (out / "config.json").is_file():
        raise InputError(f"{out} already exists and holds no sample set: choose another output folder or remove it")
    check_writable(out.parent, "the output folder's parent", "choose another output folder (--out)")
    if out.is_dir():
        check_writable(out, "the sample set", "choose another output folder (--out)")
    return out


def _differences(recorded: dict, request: dict) -> list[str]:
    """Names of the request's settings (``sampling.seed``, ``checkpoint.sha256`` ...) that differ from a record."""
    diffs = []
    for part in REQUEST_KEYS:
        old, new = recorded.get(part) or {}, request.get(part) or {}
        diffs += [f"{part}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return diffs


def _refuse_other_request(where: Path, recorded: dict, request: dict, finished: bool) -> None:
    diffs = _differences(recorded, request)
    if diffs:
        what = "a sample set" if finished else "an unfinished sample set"
        raise InputError(
            f"{where} holds {what} made with different settings ({', '.join(diffs[:4])}"
            f"{' ...' if len(diffs) > 4 else ''}): re-run the same command to continue it, or choose another "
            "output folder (--out)"
        )


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def write_sample_set(
    model: FamilyModel,
    prompt: Prompt,
    out: Path,
    *,
    n: int,
    knobs: dict,
    seed: int,
    batch_size: int | None,
    evaluate: bool,
    progress: Callable[[int, int], None] | None,
) -> Path:
    """Sample ``n`` CIFs into the sample set ``out``; resumable, so a killed run loses at most one batch.

    Samples are drawn in fixed batches ``[k * batch_size, (k + 1) * batch_size)``, each sample from the random
    stream of its own index (`sample_seed`), and every finished batch is kept on disk (``raw/``, ``processed/``
    and its lines of ``progress.jsonl``) in the hidden ``.<name>.partial/`` folder, renamed to ``out`` once all
    ``n`` are there. Calling again with the same request (prompt, sampling settings, checkpoint) after a kill
    skips the finished batches and redraws the rest exactly as the uninterrupted run would have; a complete set
    is left as it is, and its evaluation is finished when it is missing. One live process owns the set while it
    is written (`engine.lab.jobs.hold_folder`). Any model family works (`engine.models.family`): ``knobs`` are
    its sampling knobs, already resolved by `engine.models.family.resolve_knobs`.

    Raises:
        InputError: ``out`` (or its partial folder) holds a set made with other settings (they are named), or
            another live process is writing it.
    """
    check_counts(n, batch_size)
    batch_size = min(n, batch_size or DEFAULT_BATCH_SIZE)
    request = {
        "prompt": prompt.to_dict(),
        "sampling": {"n": n, **model.sampling_record(prompt, knobs), "seed": seed, "batch_size": batch_size},
        "checkpoint": provenance(model),
    }
    request = json.loads(json.dumps(request))  # as read back from disk (tuples become lists)
    busy = "wait for it to finish, or stop it and re-run the same command to continue"
    recorded = read_json(out / "config.json")
    if recorded is not None:
        _refuse_other_request(out, recorded, request, finished=True)
        if evaluate and not (out / "eval_summary.json").exists():
            from engine.evaluate.evaluation import (
                evaluate_sample_set,  # heavy (pymatgen analysis, worker pool): load on use
            )

            with hold_folder(out, "sample set", busy):  # a set killed during its evaluation: finish it
                evaluate_sample_set(out)
        return out
    partial = _partial_dir(out)
    with hold_folder(partial, "sample set", busy):
        config = _sample_batches(model, prompt, partial, request, knobs, progress)
        atomic_write_json(partial / "config.json", config)
        (partial / "progress.jsonl").unlink()
        (partial / "request.json").unlink()
        if out.is_dir():  # an empty folder made for the set (by the user, or a lock taken on it earlier)
            (out / OWNER_FILE).unlink(missing_ok=True)
            out.rmdir()
        os.replace(partial, out)
        if evaluate:
            from engine.evaluate.evaluation import evaluate_sample_set

            evaluate_sample_set(out)
    return out


def _sample_batches(model: FamilyModel, prompt: Prompt, partial: Path, request: dict, knobs: dict,
                    progress: Callable[[int, int], None] | None) -> dict:
    """Draw the batches ``partial`` lacks, keep each on disk as it completes; return the set's ``config.json``."""
    s = request["sampling"]
    n, batch_size = s["n"], s["batch_size"]
    device = torch.device(model.device)
    previous = read_json(partial / "request.json")
    if previous is not None:
        _refuse_other_request(partial, previous, request, finished=False)
        if previous.get("device") != _device_label(device):
            raise InputError(f"{partial} holds samples drawn on {previous.get('device')}; continue it there (other "
                             f"devices draw other samples), or choose another output folder (--out)")
    else:
        atomic_write_json(partial / "request.json", {**request, "device": _device_label(device)})
    (partial / "raw").mkdir(exist_ok=True)
    (partial / "processed").mkdir(exist_ok=True)
    for folder in (partial, partial / "raw", partial / "processed"):
        remove_stale_temporaries(folder)  # files a killed writer left half-written; this process owns the set
    records = {r["index"]: r for r in read_jsonl(partial / "progress.jsonl")}
    width = max(4, len(str(n - 1)))
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        if all(i in records for i in rows):
            continue
        t0 = time.perf_counter()
        report = None if progress is None else (lambda done, _total, base=len(records): progress(base + done, n))
        gens = model.generate(prompt, len(rows), knobs, seed=s["seed"], batch_size=len(rows), progress=report,
                              first_index=start)
        elapsed = (time.perf_counter() - t0) / len(rows)
        batch = []
        for i, g in zip(rows, gens):
            name = f"{i:0{width}d}"
            atomic_write_text(partial / "raw" / f"{name}.txt", g.text)
            result = postprocess(g.text, g.finished)  # a text cut at max_new_tokens is a failure, not a CIF
            processed = partial / "processed" / f"{name}.cif"
            if result.cif is not None:
                atomic_write_text(processed, result.cif)
            else:
                processed.unlink(missing_ok=True)  # left by a killed attempt at this batch
            batch.append({
                "index": i, "name": name, "n_new_tokens": g.n_new_tokens, "finished": g.finished,
                "truncated_reason": g.truncated_reason, "postprocess_ok": result.cif is not None,
                "postprocess_reason": result.reason, "postprocess_error": result.error,
                "spacegroup": result.spacegroup, "elapsed_s": elapsed,
            })
        for rec in batch:  # after the batch's files: a line on disk means its sample is complete
            append_jsonl(partial / "progress.jsonl", rec)
            records[rec["index"]] = rec
        if progress is not None:
            progress(len(records), n)
    ordered = [records[i] for i in range(n)]
    elapsed = sum(r.pop("elapsed_s") for r in ordered)
    atomic_write_text(partial / "samples.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered))
    new_tokens = sum(r["n_new_tokens"] for r in ordered)
    return {
        **request,
        "device": _device_label(device),
        "elapsed_s": round(elapsed, 3),
        "n_new_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / elapsed, 1) if elapsed > 0 else None,
        "samples_per_s": round(n / elapsed, 3) if elapsed > 0 else None,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _out_root(args: argparse.Namespace, prompts: list[Prompt]) -> Path:
    """``--out`` (relative paths live under the runs' samples folder), or a fresh name there."""
    samples = get_settings().samples_dir
    if args.out:
        out = Path(args.out).expanduser()
        return out if out.is_absolute() else samples / out
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = prompts[0].formula if len(prompts) == 1 or prompts[0].formula is None else args.prompt
    sg = f"-{prompts[0].spacegroup.replace('/', '_')}" if prompts[0].spacegroup else ""
    return samples / f"{label or 'unconditional'}{sg}-{stamp}"


def _summary_line(set_dir: Path) -> str:
    records = [json.loads(line) for line in (set_dir / "samples.jsonl").read_text().splitlines() if line]
    cut = sum(not r["finished"] for r in records)
    parts = [
        f"n {len(records)}",
        f"finished {len(records) - cut}" + (f" ({cut} cut at --max-new-tokens: raise it)" if cut else ""),
        f"post-processed {sum(r['postprocess_ok'] for r in records)}",
    ]
    metrics = read_json(set_dir / "eval_summary.json") or {}
    parse_rate = metrics.get("parse_rate", {}).get("value")
    validity = metrics.get("validity", {}).get("value")
    if parse_rate is not None:  # absent with --no-evaluate
        parts.append(f"parsed {round(parse_rate * len(records))}")
    if validity is not None:
        parts.append(f"valid {validity:.1%}")
    config = read_json(set_dir / "config.json")
    parts.append(f"{config['tokens_per_s']} tokens/s")
    return ", ".join(parts) + f"  ->  {set_dir}"


def _run_cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.models.crystallm import CrystaLLMGPT

    prompts = build_prompts(args.prompt, z=args.z, spacegroup=args.sg)
    dev = resolve_device(args.device)
    check_counts(args.n, args.batch_size)
    root = _out_root(args, prompts)
    # One prompt -> the set is the folder itself; several Z -> one set per Z in z1/, z2/, ... (n samples each).
    targets = [(p, _check_target(root if len(prompts) == 1 else root / f"z{p.z}")) for p in prompts]
    model = load_family_model(cli_checkpoint_path(args.ckpt), dev)
    knobs = knobs_from_args(args, CrystaLLMGPT.knobs, type(model))
    for prompt, out in targets:
        with tqdm(total=args.n, desc=prompt.label, unit="sample", file=sys.stderr, leave=False) as bar:

            def progress(done: int, total: int, bar: tqdm = bar) -> None:
                bar.update(done - bar.n)

            write_sample_set(model, prompt, out, n=args.n, knobs=knobs, seed=args.seed, batch_size=args.batch_size,
                             evaluate=args.evaluate, progress=progress)
        print(f"{prompt.label}: {_summary_line(out)}")
    return 0


def _gpt_knobs():
    """The CrystaLLM GPT family's knobs: the sampling commands' named flags (other families use ``--knob``)."""
    from engine.models.crystallm import CrystaLLMGPT

    return CrystaLLMGPT.knobs


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab sample``."""
    p = subparsers.add_parser(
        "sample",
        help="sample CIFs from a checkpoint for a composition / space-group prompt",
        description=(
            "Generate CIFs with a checkpoint and write a sample set (config.json, raw/, processed/, samples.jsonl, "
            "then eval.csv unless --no-evaluate). A reduced formula without --z samples n CIFs for each Z in "
            "1, 2, 3, 4, 6, 8 into z1/, z2/, ... under --out."
        ),
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file (ours or CrystaLLM's ckpt.pt); a relative path "
                   "not found from the current folder is looked up under the runs root (train/RUN/ckpt/best.pt)")
    p.add_argument("--prompt", default=None, help="formula: cell composition (Na2Cl2) or formula unit (NaCl); "
                   "omit for unconditional sampling")
    p.add_argument("--z", type=int, default=None, help="formula units per cell (with a formula unit)")
    p.add_argument("--sg", default=None, help="space group: symbol (Fm-3m, 'F m -3 m') or number (225)")
    p.add_argument("--n", type=int, default=10, help="samples per prompt (default 10)")
    add_knob_arguments(p, _gpt_knobs())
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--out", default=None, help="output folder; relative paths are under <runs>/samples "
                   "(default: a new timestamped folder there)")
    p.add_argument("--batch-size", type=int, default=None, help=f"rows decoded together (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the evaluation step")
    p.set_defaults(func=_run_cli)

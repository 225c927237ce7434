"""Progressive distillation chains (teacher -> assistant -> student) from one YAML file; CLI ``crystallab distill``.

A chain config names a teacher, a dataset, training keys shared by every stage, the stages (each a model shape,
plus any training key it overrides) and what the report measures::

    name: demo_cpu_chain
    teacher: train/demo_cpu/ckpt/best.pt     # relative: under runs/
    dataset: builtin
    baseline: true                           # also train each stage's shape without a teacher (the honest baseline)
    train: {max_iters: 300, batch_size: 16, learning_rate: 2.0e-3, device: cpu, kd_alpha: 0.5, ...}
    stages:
      - {name: student, n_layer: 2, n_head: 4, n_embd: 128}
      - {name: tiny, n_layer: 1, n_head: 4, n_embd: 72}
    report: {prompts: [Na4Cl4], n: 200, seed: 1337, speed_batch: 32, knobs: {temperature: 0.8, top_k: 10}}

Stage ``k`` is an ordinary training run folder ``<chain>/<name>/`` (``objective: distill``, ``teacher_ckpt`` = the
previous stage's ``ckpt/best.pt``, the chain's teacher for the first), and its baseline ``<chain>/<name>-baseline/``
(``objective: next-token``, same shape, steps, data and seed). ``chain.json`` records every stage's parent. A
rerun skips completed stages and resumes an interrupted one from its ``ckpt/last.pt``; a chain whose stages do
not shrink (each must have fewer parameters than its teacher) is refused before anything trains. The chain ends
with `engine.train.distill_report` (``distill_report.json`` / ``.md`` in the chain folder).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.lab.errors import ConfigError
from engine.lab.fsutil import atomic_write_json

CHAIN_KEYS = ("name", "teacher", "dataset", "baseline", "train", "stages", "report")
REPORT_KEYS = ("prompts", "n", "seed", "knobs", "speed_batch", "speed_rounds", "sample_baselines",
               "retention_target", "speedup_target", "val_batches", "batch_size")


def load_chain(path: str | Path) -> dict[str, Any]:
    """Read and check a chain config (keys, stages) without training; one-line `ConfigError` otherwise."""
    from engine.lab.yamlfiles import read_yaml_mapping

    raw = read_yaml_mapping(path, "chain config", "see configs/distill_demo_cpu.yaml")
    unknown = sorted(set(raw) - set(CHAIN_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown chain key(s) {', '.join(map(repr, unknown))}; the keys are "
                          f"{', '.join(CHAIN_KEYS)}")
    for key in ("name", "teacher", "stages"):
        if not raw.get(key):
            raise ConfigError(f"{path}: the chain needs {key!r} (see configs/distill_demo_cpu.yaml)")
    stages = raw["stages"]
    if not isinstance(stages, list) or not all(isinstance(s, dict) and s.get("name") for s in stages):
        raise ConfigError(f"{path}: stages must be a list of mappings, each with a name and its shape "
                          "(n_layer, n_head, n_embd)")
    names = [str(s["name"]) for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must differ, got {', '.join(names)}")
    bad = sorted(set(raw.get("report") or {}) - set(REPORT_KEYS))
    if bad:
        raise ConfigError(f"{path}: unknown report key(s) {', '.join(bad)}; the keys are {', '.join(REPORT_KEYS)}")
    return {"baseline": True, "dataset": "builtin", "train": {}, "report": {}, **raw}


def chain_dir(chain: dict[str, Any], out: str | Path | None = None) -> Path:
    """``out``, or ``<runs>/distill/<name>``."""
    from engine.lab.settings import get_settings

    return Path(out).expanduser().resolve() if out else get_settings().runs_dir / "distill" / str(chain["name"])


def _teacher_params(path: Path) -> int:
    from engine.models.checkpoint import read_any
    from engine.models.gpt import GPTConfig

    args = read_any(path, "cpu", mmap=True).get("model_args") or {}
    return GPTConfig.from_model_args(args).num_params(non_embedding=False)


def stage_configs(chain: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """Per stage: name, parent, run folder, distilled and baseline `TrainConfig`, parameter count.

    Raises:
        ConfigError: a stage's training keys are refused (the message names the stage), or a stage does not
            have fewer parameters than its teacher.
    """
    from engine.models.gpt import GPTConfig
    from engine.train.config import config_from_dict, resolve_ckpt_path

    teacher = resolve_ckpt_path(str(chain["teacher"]))
    from engine.train.distill import teacher_problem

    problem = teacher_problem(teacher)
    if problem:
        raise ConfigError(f"chain {chain['name']}: {problem}")
    parent_name, parent_path, parent_params = "teacher", teacher, _teacher_params(teacher)
    out = []
    for stage in chain["stages"]:
        name = str(stage["name"])
        keys = {**(chain.get("train") or {}), **{k: v for k, v in stage.items() if k != "name"}}
        base = {**keys, "dataset": chain["dataset"], "name": name, "init_from": "scratch"}
        # Checked against the chain's teacher: a later stage's teacher (the stage before) does not exist yet, and
        # its build() checks that checkpoint when it starts.
        distilled = replace(config_from_dict({**base, "objective": "distill", "teacher_ckpt": str(teacher),
                                              "out_dir": str(folder / name)}, f"chain stage {name}"),
                            teacher_ckpt=str(parent_path))
        baseline = config_from_dict({k: v for k, v in {**base, "out_dir": str(folder / f"{name}-baseline")}.items()
                                     if not k.startswith("kd_") and k != "teacher_ckpt"},
                                    f"chain stage {name} (baseline)")
        shape = GPTConfig(n_layer=distilled.n_layer, n_head=distilled.n_head, n_embd=distilled.n_embd,
                          block_size=distilled.block_size, bias=distilled.bias)
        params = shape.num_params(non_embedding=False)
        if params >= parent_params:
            raise ConfigError(f"chain stage {name!r} ({params:,} parameters) does not shrink from its teacher "
                              f"{parent_name!r} ({parent_params:,}); each stage must be smaller than the one before")
        out.append({"name": name, "parent": parent_name, "parent_ckpt": str(parent_path), "params": params,
                    "run": folder / name, "config": distilled, "baseline": baseline,
                    "baseline_run": folder / f"{name}-baseline"})
        parent_name, parent_path, parent_params = name, folder / name / "ckpt" / "best.pt", params
    return out


def _train_stage(config: Any, run: Path, progress: bool, say: Any, stop_event: Any = None) -> None:
    """Train ``config`` into ``run``: skip when completed, resume when interrupted, start otherwise."""
    from engine.lab.runs import RunFolder
    from engine.train.trainer import train

    state = RunFolder(run).read_status().get("state") if (run / "status.json").exists() else None
    if state == "completed":
        say(f"{run.name}: completed earlier, skipped")
        return
    if (run / "ckpt" / "last.pt").exists():
        say(f"{run.name}: resuming from its ckpt/last.pt")
        config = replace(config, init_from="resume")
    else:
        say(f"{run.name}: training")
    train(config, run_dir=run, progress=progress, stop_event=stop_event)
    final = RunFolder(run).read_status().get("state")
    if final != "completed":
        raise ConfigError(f"stage {run.name} ended {final}; rerun `crystallab distill chain` to continue it")


def run_chain(path: str | Path, *, out: str | Path | None = None, progress: bool = True, report: bool = True,
              say: Any = None, stop_event: Any = None) -> Path:
    """Train every stage (and baseline) of the chain in ``path``, then write its report; return the folder.

    ``stop_event`` (anything with ``is_set()``) stops the running stage as a ``STOP`` file would; the chain then
    raises, and the same call later resumes that stage.
    """
    from engine.crystal.prompts import Prompt
    from engine.lab.fsutil import read_json
    from engine.train.distill_report import distill_report, write_report
    from engine.train.seqdistill import parse_prompt_specs

    say = say or (lambda msg: print(msg, file=sys.stderr))
    chain = load_chain(path)
    folder = chain_dir(chain, out)
    stages = stage_configs(chain, folder)  # every check before anything trains
    r = chain.get("report") or {}
    prompts: list[Prompt] = parse_prompt_specs(r.get("prompts") or ["Na4Cl4"]) if report else []
    folder.mkdir(parents=True, exist_ok=True)
    record = {"chain": str(Path(path).resolve()), "name": chain["name"], "teacher": stages[0]["parent_ckpt"],
              "dataset": chain["dataset"], "baseline": bool(chain["baseline"]),
              "stages": [{"name": s["name"], "parent": s["parent"], "parent_ckpt": s["parent_ckpt"],
                          "params": s["params"], "run": str(s["run"]),
                          "baseline_run": str(s["baseline_run"]) if chain["baseline"] else None} for s in stages]}
    previous = read_json(folder / "chain.json")
    if previous and [s["name"] for s in previous.get("stages", [])] != [s["name"] for s in record["stages"]]:
        raise ConfigError(f"{folder} holds a chain with stages {[s['name'] for s in previous['stages']]}; choose "
                          "another --out or name for a different chain")
    atomic_write_json(folder / "chain.json", record)
    for s in stages:
        _train_stage(s["config"], s["run"], progress, say, stop_event)
        if chain["baseline"]:
            _train_stage(s["baseline"], s["baseline_run"], progress, say, stop_event)
    if report:
        say("measuring the report (sampling and timing every model)")
        threads = stages[0]["config"].cpu_threads
        if threads is not None:  # as the stages trained: on a busy CPU, extra threads only fight each other
            import torch

            torch.set_num_threads(threads)
        result = distill_report(
            stages[0]["parent_ckpt"],
            [{"name": s["name"], "path": s["run"] / "ckpt" / "best.pt", "parent": s["parent"],
              "baseline": s["baseline_run"] / "ckpt" / "best.pt" if chain["baseline"] else None} for s in stages],
            dataset=chain["dataset"], prompts=prompts, out=folder / "report",
            **{k: r[k] for k in REPORT_KEYS if k in r and k != "prompts"},
        )
        result["chain"] = record
        write_report(result, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _cmd_chain(args: argparse.Namespace) -> int:
    folder = run_chain(args.config, out=args.out, progress=not args.no_progress, report=not args.no_report)
    md = folder / "distill_report.md"
    print(md.read_text(encoding="utf-8") if md.exists() else f"chain trained in {folder}")
    return 0


def _cmd_seqdata(args: argparse.Namespace) -> int:
    from engine.lab.yamlfiles import parse_key_value
    from engine.models.checkpoint import cli_checkpoint_path
    from engine.train.seqdistill import build_seq_dataset, parse_prompt_specs

    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    knobs = dict(parse_key_value(item, "temperature=0.8") for item in args.knob)
    record = build_seq_dataset(cli_checkpoint_path(args.teacher), parse_prompt_specs(args.prompts), args.n, args.out,
                               knobs=knobs, seed=args.seed, batch_size=args.batch_size, mix=args.mix,
                               device=args.device, overwrite=args.overwrite,
                               progress=lambda msg: print(msg, file=sys.stderr))
    print(f"kept {record['kept']} of {record['samples']} teacher samples (dropped: {record['dropped']}); "
          f"dataset: {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from engine.models.checkpoint import cli_checkpoint_path
    from engine.train.distill_report import distill_report, write_report
    from engine.train.seqdistill import parse_prompt_specs

    students = []
    for spec in args.student:
        path, _, base = spec.partition(",")
        p = cli_checkpoint_path(path)
        students.append({"name": p.parent.parent.name if p.parent.name == "ckpt" else p.stem, "path": p,
                         "baseline": cli_checkpoint_path(base) if base else None})
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = distill_report(cli_checkpoint_path(args.teacher), students, dataset=args.dataset,
                            prompts=parse_prompt_specs(args.prompts), out=out / "report", n=args.n, seed=args.seed,
                            speed_batch=args.speed_batch)
    write_report(report, out)
    print((out / "distill_report.md").read_text(encoding="utf-8"))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``crystallab distill {chain,seqdata,report}``."""
    p = subparsers.add_parser("distill", help="distil a teacher into smaller students: chains, sequence-level "
                              "data, reports", description="Knowledge distillation (engine/train/distill.py).")
    sub = p.add_subparsers(dest="distill_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("chain", help="train a progressive chain (teacher -> ... -> student) and write its report")
    c.add_argument("config", type=Path, help="chain YAML (see configs/distill_demo_cpu.yaml)")
    c.add_argument("--out", help="chain folder (default <runs>/distill/<name>)")
    c.add_argument("--no-report", action="store_true", help="train only; skip the sampling report")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_cmd_chain)
    s = sub.add_parser("seqdata", help="sequence-level distillation: the teacher's valid, unique CIFs as a dataset")
    s.add_argument("--teacher", required=True, help="teacher checkpoint (any family)")
    s.add_argument("--prompts", nargs="+", required=True, help="cell compositions, optionally FORMULA:SPACEGROUP")
    s.add_argument("--n", type=int, default=100, help="samples per prompt (default 100)")
    s.add_argument("--out", required=True, help="dataset folder (a bare name is <runs>/data/NAME)")
    s.add_argument("--mix", nargs="*", default=[], help="real-data sources to add (e.g. builtin:500, a CIF folder)")
    s.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE", help="teacher sampling knob")
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--device", default="auto")
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    s.set_defaults(func=_cmd_seqdata)
    r = sub.add_parser("report", help="compare students (and baselines) with their teacher")
    r.add_argument("--teacher", required=True)
    r.add_argument("--student", action="append", required=True, metavar="CKPT[,BASELINE_CKPT]")
    r.add_argument("--dataset", default="builtin", help="dataset whose validation split is scored")
    r.add_argument("--prompts", nargs="+", default=["Na4Cl4"])
    r.add_argument("--n", type=int, default=200, help="samples per prompt per model (default 200)")
    r.add_argument("--seed", type=int, default=1337)
    r.add_argument("--speed-batch", type=int, default=32)
    r.add_argument("--out", required=True, help="folder for distill_report.json/.md and the sample sets")
    r.set_defaults(func=_cmd_report)

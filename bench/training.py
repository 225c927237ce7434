"""Training throughput of ``engine.train.trainer.train``: tokens/s and step time per architecture, and MFU on GPUs.

Each architecture trains from scratch, through the real trainer (run folder, metrics, checkpoint at the end),
for ``2 x --steps`` optimizer steps with ``log_interval = --steps``: the first interval absorbs warm-up
(allocator, lazy init, ``torch.compile``), the second is the measurement. Its ``metrics.jsonl`` record gives
tokens/s, and the step time is tokens per step / tokens/s. The run folder is deleted
afterwards (unless ``--keep``). The data is a token dataset built once from ``--data-source`` (default: 300
structures of the built-in corpus) or an existing ``--dataset``; what the tokens say does not change the speed.

Model FLOPs utilisation (GPUs, or any device given ``--peak-tflops``) uses the PaLM-style count of
``GPT.estimate_flops_per_token`` at the trained window length T: ``6 N + 12 L H Q T`` FLOPs per token
(N non-embedding parameters), over the device's dense bf16 peak.

    uv run python bench/training.py --arch tiny,small --steps 5
    uv run python bench/training.py --device cuda --arch small --batch-size 32 --steps 20 --compile
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from engine.data.tokens import load_token_dataset  # noqa: E402
from engine.lab.fsutil import read_jsonl  # noqa: E402
from engine.models.gpt import PRESETS, GPTConfig  # noqa: E402
from engine.train.batches import plan_context  # noqa: E402
from engine.train.config import load_config  # noqa: E402
from engine.train.trainer import train  # noqa: E402

# Dense bf16 tensor-core peaks in FLOP/s (vendor datasheets, without sparsity), matched in this order.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("GH200", 989.4e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165.2e12), ("RTX 3090", 71e12), ("V100", 125e12),
)


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``override_tflops`` if given, else the table, else None."""
    if override_tflops:
        return override_tflops * 1e12
    for key, flops in PEAK_BF16_FLOPS:
        if device_name and key in device_name:
            return flops
    return None


def flops_per_token(shape: GPTConfig, window: int) -> float:
    """Training FLOPs per token (forward + backward) at context ``window`` (PaLM appendix B).

    The same count as ``GPT.estimate_flops_per_token``, at the trained window instead of the full block size.
    """
    return 6 * shape.num_params() + 12 * shape.n_layer * shape.n_head * shape.head_dim * window


def ensure_dataset(name: str | None, source: str) -> Path:
    """``--dataset`` when given; else a dataset built once from ``source`` under ``<runs>/bench/data``."""
    from engine.data.datasets import build_dataset, resolve_dataset_dir

    if name:
        return resolve_dataset_dir(name)
    digest = hashlib.sha256(source.encode()).hexdigest()[:10]
    path = benchlib.default_out("x").parent / "data" / f"{Path(source).name.replace(':', '-')}-{digest}"
    if not (path / "train.bin").exists():
        print(f"building {path} from {source} (once)", flush=True)
        build_dataset([source], path, dedup=False, overwrite=True)
    return path


def bench_arch(arch: str, args: argparse.Namespace, dataset: Path, device: str) -> dict[str, Any]:
    """Train ``arch`` for 2 x steps and read the steady-state interval from its metrics."""
    shape = PRESETS[arch]
    block = args.block_size or shape.block_size
    batch = args.batch_size or (4 if device == "cpu" else 32)
    root = benchlib.default_out("x").parent / "train"
    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{arch}-", dir=root))
    overrides = [
        f"dataset={dataset}", f"name=bench-{arch}", "init_from=scratch", f"preset={arch}", f"block_size={block}",
        f"batch_size={batch}", "gradient_accumulation_steps=1", f"max_iters={2 * args.steps}",
        f"log_interval={args.steps}", f"eval_interval={2 * args.steps}", "eval_iters=1", "warmup_iters=1",
        f"device={device}", f"dtype={args.dtype}", f"compile={str(bool(args.compile)).lower()}",
    ]
    config = load_config(None, overrides)
    load = benchlib.load_average()
    try:
        train(config, run_dir=run_dir, progress=False)
        records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "train"]
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    tokens_per_s = records[-1]["tokens_per_s"]  # the second interval: steady state
    data = load_token_dataset(dataset)
    window = plan_context(block, len(data.train), len(data.val), can_lower_model=True).train_window
    step_s = batch * window / tokens_per_s
    fpt = flops_per_token(shape, window)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    peak = peak_flops(name, args.peak_tflops)
    row = {"arch": arch, "n_params": shape.num_params(non_embedding=False), "batch_size": batch, "window": window,
           "tokens_per_step": batch * window, "step_s": step_s, "tokens_per_s": tokens_per_s,
           "flops_per_token": fpt, "achieved_tflops": tokens_per_s * fpt / 1e12,
           "mfu": tokens_per_s * fpt / peak if peak else None, "peak_tflops": peak / 1e12 if peak else None,
           "loss": records[-1]["loss"], "load_1min": load[0] if load else None}
    print(f"  {arch}: {tokens_per_s:.0f} tokens/s, {step_s * 1000:.0f} ms/step", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny,small", help="comma-separated presets (default tiny,small)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps, after as many warm-up steps (default 5)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 4 on CPU, 32 on GPU)")
    parser.add_argument("--block-size", type=int, default=None, help="context window (default: the preset's)")
    parser.add_argument("--dataset", default=None, help="token dataset folder or name (default: built-in corpus)")
    parser.add_argument("--data-source", default="builtin:300",
                        help="CIF source of the dataset built when --dataset is not given (default builtin:300: "
                             "300 structures of the built-in corpus)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, bfloat16, float16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the config's compile key)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak in TFLOP/s for MFU (default: table of GPU bf16 dense peaks)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (under <runs>/bench/train)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default <runs>/bench/training.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but no CUDA GPU is visible: use --device cpu")
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")

    info = benchlib.machine_info(args.device)
    dataset = ensure_dataset(args.dataset, args.data_source)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown --arch {', '.join(unknown)}: choose from {', '.join(PRESETS)}")
    rows = [bench_arch(a, args, dataset, args.device) for a in archs]
    benchlib.print_table(rows, ["arch", "n_params", "batch_size", "window", "step_s", "tokens_per_s",
                                "achieved_tflops", "mfu", "load_1min"],
                         title=f"training throughput on {info['device_name'] or args.device} ({args.steps} steps "
                               "after as many warm-up steps)")
    benchlib.write_result(args.out or benchlib.default_out("training"), {
        "benchmark": "training", "machine": benchlib.finish(info), "dataset": str(dataset), "steps": args.steps,
        "dtype": args.dtype, "compile": args.compile, "results": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling throughput: ``engine.sample.sampler.generate`` at batch sizes 1 ... 1024 against upstream CrystaLLM's algorithm.

For each architecture (random weights by default, which is fine for speed because both sides generate a fixed
number of tokens: ``stop_at_cif_end=False`` here, ``fixed_tokens=True`` in `upstream_generate`), the same model,
device, prompt, sampling knobs (temperature 0.8, top-k 10) and token budget are timed for

- our sampler: one batch of ``b`` samples for every ``b`` in ``--batch-sizes`` (KV cache, batched decode);
- the upstream reference (`bench/upstream_generate.py`): ``--upstream-n`` samples, batch 1, full recompute.

Reported per batch size: tokens/s, CIFs/s (samples of ``tokens`` new tokens per second), the speed-up over
upstream (ratio of tokens/s), peak memory (CPU: resident-set growth; CUDA: allocator peak) and the KV-cache size.
Batch sizes whose KV cache would not fit in half the available memory are skipped and say so.

The budget is cut to ``block_size - prompt length`` unless ``--allow-slide`` (past the context both algorithms
recompute a sliding window every token, which measures that window, not the cache).

    uv run python bench/sampling.py --arch tiny,small --tokens 512 --batch-sizes 1,2,4,8,16,32,64,128,256
    uv run python bench/sampling.py --device cuda --arch small --batch-sizes 1,8,64,256,1024 --compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import build_model, prompt_ids_for  # noqa: E402
from upstream_generate import time_upstream  # noqa: E402

from engine.models.gpt import GPT  # noqa: E402
from engine.sample.sampler import generate  # noqa: E402

DEFAULT_BATCHES = "1,2,4,8,16,32,64,128,256,512,1024"
TEMPERATURE, TOP_K = 0.8, 10


def kv_cache_bytes(model: GPT, batch: int, length: int, device: torch.device) -> int:
    """Bytes of the sampler's KV cache for ``batch`` rows of ``length`` positions (keys and values)."""
    cfg = model.config
    itemsize = 2 if device.type == "cuda" else 4  # the sampler caches in bf16/fp16 on CUDA, fp32 on CPU
    return 2 * cfg.n_layer * batch * cfg.n_embd * min(length, cfg.block_size) * itemsize


def time_ours(model: GPT, ids: list[int], batch: int, tokens: int, device: torch.device, seed: int) -> dict:
    """Time one batch of ``batch`` samples of exactly ``tokens`` new tokens with ``engine.sample.sampler.generate``."""
    load = benchlib.load_average()
    with benchlib.PeakMemory(str(device)) as mem, benchlib.Timer(str(device)) as timer:
        gens = generate(model, ids, n=batch, batch_size=batch, max_new_tokens=tokens, temperature=TEMPERATURE,
                        top_k=TOP_K, seed=seed, device=device, stop_at_cif_end=False)
    produced = sum(g.n_new_tokens for g in gens)
    assert produced == batch * tokens, f"expected {batch * tokens} tokens, got {produced}"
    return {"batch": batch, "tokens": produced, "seconds": timer.seconds,
            "tokens_per_s": produced / timer.seconds, "cifs_per_s": batch / timer.seconds,
            "peak_mem_mib": mem.peak_bytes / 2**20 if mem.peak_bytes is not None else None,
            "load_1min": load[0] if load else None}


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Upstream baseline and our sampler at every batch size, for one architecture."""
    model, label = build_model(arch, args.ckpt, device, seed=args.seed)
    if args.compile:
        model = torch.compile(model, dynamic=True, mode=None if args.compile == "default" else args.compile)
    ids = prompt_ids_for(args.prompt)
    block = model.config.block_size
    tokens = args.tokens if args.allow_slide else min(args.tokens, block - len(ids))
    print(f"\n{label}: prompt {len(ids)} tokens, {tokens} new tokens per sample, device {device}", flush=True)
    generate(model, ids, n=1, max_new_tokens=4, seed=args.seed, device=device, stop_at_cif_end=False)  # warm-up

    upstream = None
    if args.upstream_n > 0:
        base = model._orig_mod if args.compile else model
        upstream = time_upstream(base, ids, tokens, args.upstream_n, seed=args.seed, temperature=TEMPERATURE,
                                 top_k=TOP_K)
        upstream["cifs_per_s"] = upstream.pop("samples_per_s")
        print(f"  upstream: {upstream['tokens_per_s']:.1f} tokens/s ({upstream['seconds']:.1f} s)", flush=True)

    available = benchlib.available_memory_bytes()
    rows = []
    for b in args.batch_sizes:
        need = kv_cache_bytes(model, b, len(ids) + tokens, device)
        budget = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available
        if budget is not None and need > args.mem_fraction * budget:
            rows.append({"batch": b, "skipped": f"KV cache {need / 2**30:.1f} GiB > {args.mem_fraction:.0%} of "
                                                f"{budget / 2**30:.1f} GiB available"})
            print(f"  batch {b}: skipped ({rows[-1]['skipped']})", flush=True)
            continue
        row = time_ours(model, ids, b, tokens, device, args.seed)
        row["kv_cache_mib"] = need / 2**20
        if upstream:
            row["speedup_vs_upstream"] = row["tokens_per_s"] / upstream["tokens_per_s"]
        rows.append(row)
        print(f"  batch {b}: {row['tokens_per_s']:.1f} tokens/s ({row['seconds']:.1f} s)", flush=True)
    return {"arch": arch, "model": label, "n_params": model.num_params(non_embedding=False), "block_size": block,
            "prompt_tokens": len(ids), "tokens_per_sample": tokens, "upstream": upstream, "ours": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny,small", help="comma-separated presets with random weights "
                        "(default tiny,small)")
    parser.add_argument("--ckpt", default=None, help="benchmark this checkpoint instead of random-weight presets")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-sizes", type=benchlib.int_list, default=benchlib.int_list(DEFAULT_BATCHES),
                        help=f"comma-separated batch sizes (default {DEFAULT_BATCHES})")
    parser.add_argument("--tokens", type=int, default=512, help="new tokens per sample (default 512)")
    parser.add_argument("--allow-slide", action="store_true", help="do not cut --tokens to the context window")
    parser.add_argument("--upstream-n", type=int, default=1,
                        help="upstream samples to time (default 1; 0 skips the baseline)")
    parser.add_argument("--prompt", default="Na2Cl2", help="cell composition of the prompt (default Na2Cl2)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--mem-fraction", type=float, default=0.5,
                        help="skip batch sizes whose KV cache exceeds this share of available memory (default 0.5)")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=["default", "max-autotune-no-cudagraphs"],
                        help="torch.compile our model (dynamic shapes; CUDA only in practice: slow to start)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default <runs>/bench/sampling.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but no CUDA GPU is visible: use --device cpu")

    info = benchlib.machine_info(str(device))
    archs = [a.strip() for a in args.arch.split(",") if a.strip()] if not args.ckpt else ["ckpt"]
    results = [bench_arch(a, args, device) for a in archs]
    for res in results:
        up = res["upstream"]
        rows = ([{"batch": "upstream", **up}] if up else []) + res["ours"]
        benchlib.print_table(rows, ["batch", "tokens", "seconds", "tokens_per_s", "cifs_per_s",
                                    "speedup_vs_upstream", "peak_mem_mib", "kv_cache_mib", "load_1min", "skipped"],
                             title=f"{res['model']}: {res['tokens_per_sample']} new tokens per sample")
    benchlib.write_result(args.out or benchlib.default_out("sampling"), {
        "benchmark": "sampling", "machine": benchlib.finish(info), "temperature": TEMPERATURE, "top_k": TOP_K,
        "compile": args.compile, "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

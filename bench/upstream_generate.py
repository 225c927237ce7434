"""Reference re-implementation of upstream CrystaLLM's sampling loop, the baseline of the sampling benchmark.

Written from the description of upstream ``generate`` in shared/reference/crystallm-format.md section 4, so the
speed-up of ``engine.sample.sampler`` is measured against the algorithm CrystaLLM actually runs:

- one sample at a time (batch 1), no KV cache: every new token recomputes the whole context;
- the context is cropped to the model's last ``block_size`` tokens;
- per step: last-position logits / temperature, then top-k (logits below the k-th largest set to -inf), softmax,
  ``torch.multinomial``;
- stop after two consecutive *sampled* newlines, or after ``max_new_tokens``; ``fixed_tokens=True`` never stops
  early, so both algorithms generate the same number of tokens in a benchmark;
- ``torch.no_grad()``; on CUDA under bf16 autocast (fp16 without bf16), as upstream's sample script.

Like nanoGPT (which CrystaLLM's model is), the forward pass at inference applies the output layer to the last
position only. Attention dropout is off (model in eval mode); upstream leaves it on, which changes samples, not
speed, and is zero for models trained with dropout 0.

    uv run python bench/upstream_generate.py --arch small --tokens 64 --n 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from engine.crystal.vocab import NEWLINE_ID
from engine.models.gpt import GPT


def _last_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits of the last position only, recomputing the whole (cropped) context: (1, T) ids -> (1, V)."""
    tr = model.transformer
    pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
    x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (1, T, C)
    for block in tr.h:
        x = block(x)  # (1, T, C)
    x = tr.ln_f(x[:, -1, :])  # (1, C): LayerNorm is per position, so the last one is all we need
    return model.lm_head(x)  # (1, V)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def upstream_generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 10,
    fixed_tokens: bool = False,
) -> list[int]:
    """Generate one sample the way upstream CrystaLLM does (see the module docstring).

    Randomness comes from torch's global generator: seed it with ``torch.manual_seed`` first, as upstream does.

    Args:
        model: The GPT (put in eval mode by the caller).
        prompt_ids: Prompt token ids (at least one).
        max_new_tokens: Most tokens to generate.
        temperature: Softmax temperature (> 0).
        top_k: Keep the k most likely tokens (None: all).
        fixed_tokens: Generate exactly ``max_new_tokens`` tokens, ignoring the end of the CIF.

    Returns:
        Prompt ids followed by the generated ids.
    """
    device = next(model.parameters()).device
    block = model.config.block_size
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    previous = None
    with _autocast(device):
        for _ in range(max_new_tokens):
            context = idx if idx.shape[1] <= block else idx[:, -block:]  # (1, <= block)
            logits = _last_logits(model, context).float() / temperature  # (1, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (1, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (1, V)
            nxt = torch.multinomial(probs, num_samples=1)  # (1, 1)
            token = int(nxt)  # upstream compares on the host every step, too
            if not fixed_tokens and previous == NEWLINE_ID and token == NEWLINE_ID:
                break
            previous = token
            idx = torch.cat((idx, nxt), dim=1)
    return idx[0].tolist()


def time_upstream(
    model: GPT,
    prompt_ids: list[int],
    tokens: int,
    n: int,
    *,
    seed: int = 1337,
    temperature: float = 0.8,
    top_k: int | None = 10,
) -> dict:
    """Time ``n`` fixed-length upstream samples of ``tokens`` new tokens each (one untimed 2-token warm-up first).

    Returns:
        ``{"samples", "tokens", "seconds", "tokens_per_s", "samples_per_s"}``.
    """
    device = next(model.parameters()).device
    model.eval()
    upstream_generate(model, prompt_ids, 2, temperature=temperature, top_k=top_k, fixed_tokens=True)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        upstream_generate(model, prompt_ids, tokens, temperature=temperature, top_k=top_k, fixed_tokens=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"samples": n, "tokens": n * tokens, "seconds": seconds, "tokens_per_s": n * tokens / seconds,
            "samples_per_s": n / seconds}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib
    from benchlib import build_model, prompt_ids_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny", help="model preset with random weights (tiny, small, ...); "
                        "ignored with --ckpt")
    parser.add_argument("--ckpt", default=None, help="checkpoint to load instead of a random-weight preset")
    parser.add_argument("--prompt", default="Na2Cl2", help="cell composition of the prompt (default Na2Cl2)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sample (default 64)")
    parser.add_argument("--n", type=int, default=2, help="samples to time (default 2)")
    parser.add_argument("--until-cif-end", action="store_true",
                        help="stop at two consecutive newlines (upstream's rule) instead of a fixed token count")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default <runs>/bench/upstream.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model, label = build_model(args.arch, args.ckpt, device, seed=args.seed)
    ids = prompt_ids_for(args.prompt)
    info = benchlib.machine_info(args.device)
    if args.until_cif_end:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        lengths = [len(upstream_generate(model.eval(), ids, args.tokens, temperature=args.temperature,
                                         top_k=args.top_k)) - len(ids) for _ in range(args.n)]
        seconds = time.perf_counter() - t0
        row = {"samples": args.n, "tokens": sum(lengths), "seconds": seconds,
               "tokens_per_s": sum(lengths) / seconds, "samples_per_s": args.n / seconds}
    else:
        row = time_upstream(model, ids, args.tokens, args.n, seed=args.seed, temperature=args.temperature,
                            top_k=args.top_k)
    row["model"] = label
    benchlib.print_table([row], ["model", "samples", "tokens", "seconds", "tokens_per_s", "samples_per_s"],
                         title="upstream CrystaLLM algorithm (batch 1, full recompute)")
    result = {"benchmark": "upstream_generate", "machine": benchlib.finish(info), "prompt_ids": ids,
              "fixed_tokens": not args.until_cif_end, **row}
    benchlib.write_result(args.out or benchlib.default_out("upstream"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

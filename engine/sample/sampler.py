"""Batched sampling from a CrystaLLM GPT with a KV cache: generation, constraints, drawing, devices and seeds.

Generation (`generate`):

- The shared prompt is prefilled once (batch 1) and the cache is copied to every row of the batch; then one token
  is decoded per step for all rows. All rows of a batch share the prompt, so no padding is ever needed.
- A row finishes at the CIF end: the sampled token is a newline and the token before it (prompt included) is a
  newline. Finished rows leave the cache (``KVCache.keep``) in bulk, once a quarter of the batch has finished,
  because each compaction copies the whole cache while a finished row only wastes its own slot of one step.
- Per step: logits / temperature (0 = greedy), optional constraints, top-k, top-p (nucleus), then one draw.
- Randomness: every sample ``i`` owns a ``torch.Generator`` on the model's device, seeded from ``(seed, i)``,
  which draws that sample's uniforms up front; a token is drawn by inverse-CDF lookup (equal in distribution
  to ``torch.multinomial``). Hence the same seed gives identical samples for the same batch size and device, and
  sample ``i`` uses the same random numbers whatever the batch size; only batch-shape-dependent floating-point
  rounding of the logits (which can flip a near-tie) separates runs at different batch sizes. CPU and CUDA
  generators produce different streams, so samples differ between devices.
- Context: once a sequence reaches the model's ``block_size`` it continues with a sliding window: the cache is
  dropped and each step recomputes the last ``block_size`` tokens, which is exactly upstream CrystaLLM's
  behaviour for long CIFs (all rows of a batch have the same length, so they switch together). ``use_cache=False``
  runs that full-recompute path from the first token; greedy output is the same either way.
- Runs under ``torch.inference_mode()`` with the model in eval mode (no attention dropout, unlike upstream) and,
  on CUDA, under bf16 autocast (fp16 where bf16 is unsupported).

Constraints (optional, per step, vectorised over the batch by tracking each row's current line):

- ``allowed_elements``: element tokens outside the set get probability zero wherever the CIF grammar puts an
  element symbol: anywhere on the ``data_`` line, the ``_chemical_formula_sum`` and ``_chemical_formula_structural``
  lines, at the start of any line (rows of the ``_atom_type_*`` and ``_atom_site_*`` loops begin with their
  element) and anywhere on a line that began with an element (atom-site labels such as ``Na0``).
- ``constrain_spacegroup``: right after ``_symmetry_space_group_name_H-M`` and its space, only the 227
  space-group tokens are allowed (so the symbol always parses).

Sample-set folders and the ``crystallab sample`` CLI live in `engine.sample.sample_sets`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from typing import Callable, Iterable

import torch
from torch.nn import functional as F

from engine.crystal.tokenizer import decode
from engine.crystal.vocab import DATA_ID, ELEMENTS, NEWLINE_ID, SPACE_ID, STOI, TOKENS, VOCAB_SIZE
from engine.lab.errors import ConfigError, PromptError
from engine.models.family import Generation
from engine.models.gpt import GPT, KVCache

DEFAULT_BATCH_SIZE = 64
"""Rows decoded together when ``batch_size`` is None (capped at ``n``)."""

_HM_ID = STOI["_symmetry_space_group_name_H-M"]
_ELEMENT_LINE_TAGS = (DATA_ID, STOI["_chemical_formula_sum"], STOI["_chemical_formula_structural"])


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` in a run seeded with ``seed`` (a 63-bit hash of both)."""
    digest = hashlib.sha256(f"crystallab-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Constraints:
    """Per-row grammar state (first token of the current line, tokens on it, previous token) and the masks."""

    def __init__(
        self,
        prompt_ids: list[int],
        rows: int,
        allowed_elements: Iterable[str] | None,
        constrain_spacegroup: bool,
        device: torch.device,
    ) -> None:
        self.bad_elements: torch.Tensor | None = None  # (V,) True for element tokens to forbid
        if allowed_elements is not None:
            allowed = set(allowed_elements)
            unknown = sorted(allowed - set(ELEMENTS))
            if unknown:
                raise PromptError(
                    f"allowed elements {', '.join(unknown)} are not in the CrystaLLM vocabulary: "
                    "use element symbols such as Na, Cl"
                )
            bad = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
            bad[[STOI[el] for el in ELEMENTS if el not in allowed]] = True
            self.bad_elements = bad.to(device)
            # Indexed by line kind + 1 (line kind -1 = at the start of a line).
            lines = torch.zeros(VOCAB_SIZE + 1, dtype=torch.bool)
            lines[0] = True
            lines[[t + 1 for t in _ELEMENT_LINE_TAGS]] = True
            lines[1 : len(ELEMENTS) + 1] = True
            self.element_lines = lines.to(device)
        self.sg_only: torch.Tensor | None = None  # (V,) True for tokens to forbid after the H-M tag
        if constrain_spacegroup:
            self.sg_only = torch.tensor([not tok.endswith("_sg") for tok in TOKENS], device=device)
        kind, length = -1, 0
        for t in prompt_ids:
            kind, length = (-1, 0) if t == NEWLINE_ID else (t if length == 0 else kind, length + 1)
        self.kind = torch.full((rows,), kind, dtype=torch.long, device=device)
        self.length = torch.full((rows,), length, dtype=torch.long, device=device)
        self.prev = torch.full((rows,), prompt_ids[-1], dtype=torch.long, device=device)

    @property
    def active(self) -> bool:
        return self.bad_elements is not None or self.sg_only is not None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set forbidden tokens of each row to -inf; logits (B, V) float."""
        if self.bad_elements is not None:
            rows = self.element_lines[self.kind + 1]  # (B,)
            logits = logits.masked_fill(rows[:, None] & self.bad_elements[None, :], float("-inf"))
        if self.sg_only is not None:
            rows = (self.kind == _HM_ID) & (self.length == 2) & (self.prev == SPACE_ID)  # (B,)
            logits = logits.masked_fill(rows[:, None] & self.sg_only[None, :], float("-inf"))
        return logits

    def advance(self, tokens: torch.Tensor) -> None:
        """Update the state with each row's new token; tokens (B,)."""
        newline = tokens == NEWLINE_ID
        self.kind = torch.where(newline, -1, torch.where(self.length == 0, tokens, self.kind))
        self.length = torch.where(newline, 0, self.length + 1)
        self.prev = tokens

    def select(self, idx: torch.Tensor) -> None:
        self.kind, self.length, self.prev = self.kind[idx], self.length[idx], self.prev[idx]


def grammar_mask(prefix_ids: list[int], logits: torch.Tensor, allowed_elements: Iterable[str] | None,
                 constrain_spacegroup: bool) -> torch.Tensor:
    """``logits`` (B, V) of the token after ``prefix_ids`` with the tokens the constraints forbid set to -inf.

    The same rules `generate` applies per step (element tokens outside ``allowed_elements`` where the grammar
    expects an element; only space-group tokens after the H-M tag), for callers that pick tokens themselves
    (scored decoding's tree expansion, `engine.sample.mcts`).
    """
    constraints = _Constraints(prefix_ids, logits.shape[0], allowed_elements, constrain_spacegroup, logits.device)
    return constraints.apply(logits) if constraints.active else logits


def _draw(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Pick one token per row: greedy when ``temperature == 0``, else top-k/top-p sampling.

    Args:
        logits: (B, V) float32, forbidden tokens at -inf.
        u: (B,) uniforms in [0, 1) (unused when greedy).

    Returns:
        (B,) token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True)  # (B, V)
    if top_k and top_k < sorted_logits.shape[-1]:
        sorted_logits[:, top_k:] = float("-inf")
    probs = F.softmax(sorted_logits, dim=-1)  # (B, V), non-increasing along V
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (u * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    pick = torch.searchsorted(cdf, target, right=True)  # (B, 1): first position whose cdf exceeds the target
    # Nonzero probabilities form a prefix; rounding must never land on a zero-probability token beyond it.
    last = ((probs > 0).sum(dim=-1, keepdim=True) - 1).clamp_min(0)
    return order.gather(-1, torch.minimum(pick, last)).squeeze(-1)


def check_params(
    n: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    max_new_tokens: int,
    batch_size: int | None = None,
) -> None:
    check_counts(n, batch_size)
    # NaN passes every comparison and inf divides logits to NaN/0: both must be refused by name.
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature = {temperature} must be a finite number >= 0 (0 means greedy decoding)")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k = {top_k} must be >= 0 (0 or None switches top-k filtering off)")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p = {top_p} must be in (0, 1] (1 switches nucleus filtering off)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens} must be at least 1")


def check_counts(n: int, batch_size: int | None = None) -> None:
    """Refuse a sample count below 1 or a batch size below 1 (any family; knobs are checked by their family)."""
    if n < 1:
        raise ConfigError(f"number of samples n = {n} must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size} must be at least 1 (leave it unset for the default)")


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """Reduced-precision compute dtype on CUDA (bf16, or fp16 on GPUs without bf16); None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def generate(
    model: GPT,
    prompt_ids: list[int],
    *,
    n: int,
    temperature: float = 0.8,
    top_k: int | None = 10,
    top_p: float = 1.0,
    max_new_tokens: int = 3000,
    seed: int = 1337,
    batch_size: int | None = None,
    allowed_elements: Iterable[str] | None = None,
    constrain_spacegroup: bool = False,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
    stop_at_cif_end: bool = True,
    first_index: int = 0,
) -> list[Generation]:
    """Generate ``n`` continuations of one prompt (see the module docstring for batching, seeding, constraints).

    Args:
        model: The GPT; left on its device, switched to eval mode for the call and restored afterwards.
        prompt_ids: Token ids of the prompt (at least one).
        n: Number of samples.
        temperature: Softmax temperature; 0 decodes greedily.
        top_k: Keep the ``top_k`` most likely tokens (0 or None: all).
        top_p: Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1: all).
        max_new_tokens: Most tokens generated per sample.
        seed: Seed of the per-sample random streams.
        batch_size: Rows decoded together (None: ``min(n, DEFAULT_BATCH_SIZE)``).
        allowed_elements: Element symbols the sample may write where an element is expected (None: any).
        constrain_spacegroup: Allow only space-group tokens after the H-M tag.
        device: Where the model is (None: the device of its parameters).
        progress: Called as ``progress(done, n)`` whenever samples complete.
        use_cache: Decode with the KV cache (False: recompute the cropped context every step, as upstream).
        stop_at_cif_end: Stop a row at the CIF end (False: always generate ``max_new_tokens``; for benchmarks).
        first_index: Index of the first sample: the call makes samples ``first_index .. first_index + n - 1``, each
            with the random stream of its own index (a resumed sample set continues with the samples it lacks).

    Returns:
        ``n`` Generations in sample order.
    """
    check_params(n, temperature, top_k, top_p, max_new_tokens, batch_size)
    if not prompt_ids:
        raise PromptError("the prompt is empty: start it with data_ (the unconditional prompt)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = min(n, batch_size or DEFAULT_BATCH_SIZE)
    was_training = model.training
    model.eval()
    results: list[Generation] = []
    try:
        amp = _amp_dtype(device)
        autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for start in range(0, n, batch_size):
                rows = list(range(first_index + start, first_index + min(n, start + batch_size)))
                report = None
                if progress is not None:
                    report = functools.partial(lambda done, base: progress(base + done, n), base=len(results))
                results.extend(
                    _generate_batch(
                        model, prompt_ids, rows, temperature, top_k or 0, top_p, max_new_tokens, seed,
                        allowed_elements, constrain_spacegroup, device, use_cache, stop_at_cif_end, report,
                    )
                )
                if progress is not None:
                    progress(len(results), n)
    finally:
        model.train(was_training)
    return results


def _generate_batch(
    model: GPT,
    prompt_ids: list[int],
    rows: list[int],
    temperature: float,
    top_k: int,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    allowed_elements: Iterable[str] | None,
    constrain_spacegroup: bool,
    device: torch.device,
    use_cache: bool,
    stop_at_cif_end: bool,
    report: Callable[[int], None] | None,
) -> list[Generation]:
    """Decode one batch of rows (global sample indices ``rows``) that all start from ``prompt_ids``.

    ``report(k)`` is called whenever the number ``k`` of finished rows in this batch grows.
    """
    block = model.config.block_size
    B, L0 = len(rows), len(prompt_ids)
    total = L0 + max_new_tokens
    seqs = torch.empty((B, total), dtype=torch.long, device=device)  # (B, L0 + max_new)
    seqs[:, :L0] = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    uniforms = None
    if temperature > 0:
        uniforms = torch.stack([
            torch.rand(max_new_tokens, device=device, generator=torch.Generator(device=device).manual_seed(
                sample_seed(seed, i)))
            for i in rows
        ])  # (B, max_new)
    constraints = _Constraints(prompt_ids, B, allowed_elements, constrain_spacegroup, device)
    row_ids = torch.arange(B, device=device)  # batch-local index of each live slot
    live = torch.ones(B, dtype=torch.bool, device=device)  # False once a slot's row has finished
    lengths = torch.full((B,), total, dtype=torch.long, device=device)  # final length of each local row
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    reported = 0

    cache = None
    if use_cache and L0 <= block:
        cache = KVCache.for_model(model, 1, max_len=min(block, total), dtype=_amp_dtype(device))
        logits, _ = model(seqs[:1, :L0], kv_cache=cache)  # (1, L0, V)
        cache.keep(torch.zeros(B, dtype=torch.long, device=device))  # every row starts from the prompt
        last = logits[:, -1].float().expand(B, -1)  # (B, V)
    else:
        last = model(seqs[:1, max(0, L0 - block) : L0])[0][:, -1].float().expand(B, -1)  # (B, V)

    for step in range(max_new_tokens):
        L = L0 + step + 1  # sequence length once this step's token is written
        if constraints.active:
            last = constraints.apply(last)
        u = uniforms[row_ids, step] if uniforms is not None else None
        nxt = _draw(last, u, temperature, top_k, top_p)  # (b,)
        seqs[row_ids, L - 1] = nxt
        if stop_at_cif_end:
            done = live & (nxt == NEWLINE_ID) & (constraints.prev == NEWLINE_ID)  # (b,)
            lengths[row_ids[done]] = L
            finished[row_ids[done]] = True
            live = live & ~done
        constraints.advance(nxt)
        n_live = int(live.sum())  # the step's one host-device synchronisation
        if report is not None and B - n_live != reported:
            reported = B - n_live
            report(reported)
        if step == max_new_tokens - 1 or n_live == 0:
            break
        if 4 * (live.numel() - n_live) >= live.numel():
            keep = live.nonzero().squeeze(-1)
            row_ids, live, nxt = row_ids[keep], live[keep], nxt[keep]
            constraints.select(keep)
            if cache is not None:
                cache.keep(keep)
        if cache is not None and L <= block:
            last = model(nxt[:, None], kv_cache=cache)[0][:, -1].float()  # (b, V)
        else:
            cache = None  # past the context window: slide it, recomputing the last block_size tokens
            last = model(seqs[row_ids, max(0, L - block) : L])[0][:, -1].float()  # (b, V)

    out = []
    lengths_l, finished_l = lengths.tolist(), finished.tolist()
    seqs_l = seqs.tolist()
    for local in range(B):
        ids = seqs_l[local][: lengths_l[local]]
        fin = finished_l[local]
        out.append(
            Generation(
                ids=ids,
                text=decode(ids),
                n_new_tokens=len(ids) - L0,
                finished=fin,
                truncated_reason=None if fin else "max_new_tokens",
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when a GPU is visible, else CPU; other names are checked.

    Raises:
        ConfigError: CUDA requested but not available, or an unknown device name.
    """
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device: use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but no CUDA GPU is visible: use cpu or auto")
    return dev

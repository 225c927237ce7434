"""Batched sampling from a CrystaLLM GPT with a KV cache, sample-set folders, and the ``crystallab sample`` CLI.

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

Sample sets (`sample_to_dir`, ``crystallab sample``): ``config.json`` (prompt, sampling parameters, checkpoint
path/step/sha256/run, device, elapsed_s and tokens_per_s of generation), ``raw/NNNN.txt`` (full text, prompt
included), ``processed/NNNN.cif`` (post-processed successes; a text cut at ``max_new_tokens`` is recorded as a
``truncated`` failure, never written there), ``samples.jsonl`` (per sample: index, n_new_tokens, finished,
truncated_reason, postprocess_ok/reason/error). They are written batch by batch into the hidden sibling
``.<name>.partial/`` and renamed into place when complete, so a killed run keeps its finished batches and the same
command continues it (`write_sample_set`); evaluation (``eval.csv``, ``eval_summary.json``) follows, and is
finished by the same command when it was killed. The CLI draws ``--n`` samples
per prompt: a reduced formula without ``--z`` gives one set per Z, in ``z1/``, ``z2/``, ... under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.nn import functional as F

from engine import __version__
from engine.crystal.postprocess import postprocess
from engine.crystal.prompts import Prompt, build_prompts
from engine.crystal.tokenizer import decode
from engine.crystal.vocab import DATA_ID, ELEMENTS, NEWLINE_ID, SPACE_ID, STOI, TOKENS, VOCAB_SIZE
from engine.lab.errors import ConfigError, InputError, PromptError
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
    Generation,
    add_knob_arguments,
    knobs_from_args,
    load_family_model,
    provenance,
    resolve_knobs,
    shared_knobs,
)
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


def _check_params(
    n: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    max_new_tokens: int,
    batch_size: int | None = None,
) -> None:
    if n < 1:
        raise ConfigError(f"number of samples n = {n} must be at least 1")
    # NaN passes every comparison and inf divides logits to NaN/0: both must be refused by name.
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature = {temperature} must be a finite number >= 0 (0 means greedy decoding)")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k = {top_k} must be >= 0 (0 or None switches top-k filtering off)")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p = {top_p} must be in (0, 1] (1 switches nucleus filtering off)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens} must be at least 1")
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
    _check_params(n, temperature, top_k, top_p, max_new_tokens, batch_size)
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
# Sample sets on disk


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
    _check_params(n, 0.0, 0, 1.0, 1, batch_size)
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
    _check_params(n, 0.0, 0, 1.0, 1, batch_size)
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
    _check_params(args.n, 0.0, 0, 1.0, 1, args.batch_size)
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

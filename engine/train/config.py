"""Typed training configuration: YAML files with CrystaLLM's key names, plus ``--set key=value`` overrides.

A config is a flat YAML mapping. Keys are CrystaLLM's (``n_layer, n_head, n_embd, block_size, dropout,
learning_rate, min_lr, warmup_iters, max_iters, eval_interval, batch_size, gradient_accumulation_steps, dtype,
compile`` ...) plus the lab's own (``init_from: scratch|finetune|resume``, ``init_ckpt``, ``preset``,
``min_lr_ratio``, ``freeze_embeddings``, ``early_stopping_patience`` ...). Every field of `TrainConfig` says
what it means and its unit.

`load_config` refuses unknown keys (suggesting close matches), wrong types and impossible values with a
`ConfigError` naming the key and what to do. Overrides are split at the first ``=`` and parsed as YAML, so
``compile=false`` is ``False``, ``learning_rate=1e-3`` is a float and ``name=a=b`` keeps its ``=``.
A few keys of CrystaLLM's own train configs that the lab does differently are accepted and translated (see
``UPSTREAM_KEYS``), so an upstream config file loads as is.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from engine.lab.errors import ConfigError
from engine.lab.yamlfiles import parse_key_value, read_yaml_mapping

log = logging.getLogger(__name__)

INIT_MODES = ("scratch", "finetune", "resume")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
MAX_BLOCK_SIZE = 8192
"""Longest context a new model may have, in tokens (CrystaLLM large: 2048; CIFs rarely exceed ~1,000 tokens)."""
BLOCK_SIZE_FACTOR = 8
"""A new model's context may be at most this many times its preset's (tiny: 256 -> 2048 tokens)."""


LOOP_LIMITS: dict[str, tuple[int, str]] = {
    "max_iters": (10**8, "at a fast 10 ms per step that is 11 days; CrystaLLM large trained 100,000 steps"),
    "batch_size": (16_384, "sequences per micro-batch; raise gradient_accumulation_steps for a larger batch"),
    "gradient_accumulation_steps": (4_096, "micro-batches per optimizer step; CrystaLLM uses at most 40"),
    "eval_iters": (10_000, "batches per split at every evaluation; CrystaLLM uses 100 or less"),
}
"""Upper bounds on the loop counts (value, why): a typo such as ``eval_iters: 1000000000`` would otherwise pass
and then run for years, or hold memory until the machine stalls, before anyone is told."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; written resolved to the run folder's ``config.yaml``."""

    # --- data ---
    dataset: str = "builtin"
    """Token dataset folder (``train.bin``, ``val.bin``, ``meta.pkl``); a bare name resolves under ``runs/data/``."""
    starts_only: bool = True
    """Start training windows only at CIF starts (``starts.pkl``), as CrystaLLM; false: at any token."""

    # --- run ---
    name: str = "train"
    """Short run name; the run folder is ``runs/train/<YYYYmmdd-HHMMSS>-<name>`` unless ``out_dir`` is set."""
    out_dir: str | None = None
    """Run folder to write (or, with ``init_from: resume``, the interrupted run to continue)."""
    init_from: str = "scratch"
    """``scratch`` (new model), ``finetune`` (weights of ``init_ckpt``, fresh optimizer, step 0) or ``resume``."""
    init_ckpt: str | None = None
    """Checkpoint to fine-tune from (ours or CrystaLLM's ``ckpt.pt``; relative: under ``runs/``); only read."""
    seed: int = 1337
    """Seed of weight init, batch windows and dropout; same seed and data, same losses."""
    objective: str = "next-token"
    """What is optimised (`engine.train.objectives.OBJECTIVES`): ``next-token`` is CrystaLLM's GPT objective."""
    diffusion_variant: str = "direct"
    """Masked diffusion: ``direct`` (position i predicts token i, LLaDA) or ``shift`` (i predicts i + 1, DiffuGPT)."""
    diffusion_anneal_steps: int = 0
    """Masked diffusion: steps over which attention anneals from causal to bidirectional (0: bidirectional at once)."""
    diffusion_random_length: float = 0.01
    """Masked diffusion: fraction of training batches cropped to a random length (LLaDA: 1 %)."""
    diffusion_prompt_dropout: float = 0.1
    """Masked diffusion: fraction of sequences whose prompt may be masked too (trains the unguided pass of CFG)."""
    diffusion_keep_spacegroup: bool = False
    """Masked diffusion: also never mask the atom-property block and space-group line (space-group prompts)."""

    # --- Hugging Face causal LM (``objective: hf-causal-lm``; `engine.train.hf_objective`) ---
    hf_model: str | None = None
    """Local Hugging Face model folder to fine-tune (config.json, weights, tokenizer); never downloaded."""
    hf_text_format: str = "gruver"
    """Crystal text the HF model learns: ``gruver`` (Gruver et al.'s string and prompts) or ``cif`` (CrystaLLM CIF)."""
    hf_lora_rank: int = 8
    """LoRA rank via peft (Gruver: 8); 0 fine-tunes every weight instead."""
    hf_lora_alpha: float = 32.0
    """LoRA scaling alpha (Gruver: 32)."""
    hf_lora_dropout: float = 0.05
    """Dropout on the LoRA input (Gruver: 0.05)."""
    hf_lora_targets: str = "q_proj,v_proj"
    """Modules that get adapters: comma-separated names (Gruver: q_proj,v_proj) or ``all-linear``."""
    hf_quantize: int | None = None
    """Load the base model in 4 or 8 bits (QLoRA; needs bitsandbytes and a CUDA GPU); null: full precision."""

    # --- distillation (objective: distill; engine.train.distill) ---
    teacher_ckpt: str | None = None
    """Teacher checkpoint to distil from (relative: under ``runs/``); only read. Same vocabulary as the student."""
    kd_kind: str = "forward"
    """``forward`` KL(teacher || student) (Hinton) or ``reverse`` KL(student || teacher) (MiniLLM-style)."""
    kd_temperature: float = 2.0
    """Softmax temperature T of both models in the KD term (scaled by T^2); 1-2 suits small LMs."""
    kd_alpha: float = 0.5
    """Weight of the data cross-entropy: loss = a * CE + (1 - a) * T^2 * KL; 1 = no distillation, 0 = pure KD."""
    kd_topk: int = 16
    """On CPU: cache the teacher's top-k logits per position on disk (0: run the teacher on every batch)."""
    kd_cache_dir: str | None = None
    """Folder for the top-k cache (default ``<runs>/cache/distill/<teacher+data+window key>``)."""

    # --- model (scratch: from ``preset``, then these keys; finetune/resume: from the checkpoint) ---
    preset: str | None = None
    """Model shape preset of ``engine.models.gpt.PRESETS`` (tiny, small, medium, large); default small for scratch."""
    n_layer: int | None = None
    """Transformer blocks."""
    n_head: int | None = None
    """Attention heads per block (n_embd must be divisible by it)."""
    n_embd: int | None = None
    """Residual-stream width, in channels."""
    block_size: int | None = None
    """Context window, in tokens: new model 8 to 8x its preset's (max 8192); fine-tune: at most the checkpoint's."""
    dropout: float = 0.1
    """Dropout probability during training (CrystaLLM small: 0.1)."""
    bias: bool = False
    """Bias vectors in Linear/LayerNorm layers (scratch only; CrystaLLM: false)."""

    # --- fine-tuning ---
    freeze_embeddings: bool = False
    """Freeze token and position embeddings (the token table is tied to the output layer, so it freezes too)."""
    train_last_n_layers: int | None = None
    """Train only the last N transformer blocks and the final LayerNorm; everything before is frozen."""
    lora_rank: int | None = None
    """LoRA adapter rank (through peft, `engine.train.lora`); null trains the weights themselves. Needs a base:
    init_from finetune (or resume of a LoRA run). Checkpoints then hold only the adapters and the base's path+sha256."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: an adapter's update B @ A is multiplied by lora_alpha / lora_rank (Gruver et al.: 32)."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapters' inputs during training, in [0, 1)."""
    lora_targets: str = "c_attn,c_proj,c_fc"
    """Comma-separated names of the modules that get adapters (default: the GPT's attention and MLP projections)."""

    # --- optimizer and schedule ---
    learning_rate: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay; default ``learning_rate * min_lr_ratio``."""
    min_lr_ratio: float | None = None
    """``min_lr`` as a fraction of ``learning_rate`` (default 0.1 when neither is given)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices and embeddings."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.99
    """AdamW second-moment decay (CrystaLLM: 0.99)."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""
    decay_lr: bool = True
    """Cosine-decay the learning rate after warmup; false: constant ``learning_rate`` after warmup."""
    warmup_iters: int = 100
    """Optimizer steps of linear warmup from ~0 to ``learning_rate``."""
    lr_decay_iters: int | None = None
    """Step at which the cosine reaches ``min_lr`` (default ``max_iters``)."""
    max_iters: int = 5000
    """Optimizer steps of this run (fine-tuning counts from 0; resume continues to this total)."""
    batch_size: int = 32
    """Sequences per micro-batch (per GPU)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step, summed over GPUs; the loss is averaged over them."""

    # --- evaluation, logging, stopping ---
    eval_interval: int = 250
    """Steps between evaluations; each writes ``ckpt/last.pt`` (and ``best.pt`` on improvement)."""
    eval_iters: int = 20
    """Batches per split per evaluation (the same windows every time, so the curve is comparable)."""
    log_interval: int = 10
    """Steps between training-loss records in ``metrics.jsonl``."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a validation improvement; null disables early stopping."""
    early_stopping_min_delta: float = 0.0
    """Smallest decrease of validation loss (nats/token) that counts as an improvement."""

    # --- system ---
    device: str = "auto"
    """``auto`` (CUDA if available, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    dtype: str = "auto"
    """Compute precision: ``auto`` (bfloat16 on capable CUDA, else float32), float32, bfloat16, float16."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (CUDA; slow to start, faster per step)."""
    cpu_threads: int | None = None
    """Threads PyTorch uses on CPU (null: its default, one per core); 1 is fastest for tiny models on busy hosts."""

    @property
    def resolved_min_lr(self) -> float:
        """The cosine floor in absolute units (learning-rate units)."""
        if self.min_lr is not None:
            return self.min_lr
        return self.learning_rate * (0.1 if self.min_lr_ratio is None else self.min_lr_ratio)

    @property
    def resolved_lr_decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order (what ``config.yaml`` and a checkpoint's ``config`` hold)."""
        return asdict(self)

    def with_updates(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return validate(replace(self, **changes))


# CrystaLLM train-config keys the lab handles differently: translated or ignored, with a logged note.
UPSTREAM_KEYS: dict[str, str] = {
    "eval_iters_train": "folded into eval_iters (the lab evaluates both splits on eval_iters batches)",
    "eval_iters_val": "folded into eval_iters (the lab evaluates both splits on eval_iters batches)",
    "always_save_checkpoint": "ignored: ckpt/last.pt is always written at every evaluation and at the end",
    "validate": "ignored: the validation split is evaluated whenever it is not empty",
    "eval_only": "only false is accepted: evaluate a checkpoint with `crystallab evaluate`",
    "underrep_p": "only 0 is accepted: over-sampling under-represented CIFs is not supported",
    "backend": "ignored: torchrun runs use NCCL on CUDA and Gloo on CPU",
}


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(int|float|str|bool, optional?) of a field annotation."""
    args = typing.get_args(hint)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], True
    return hint, False


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check and convert one value to its field's type; raise a readable `ConfigError` otherwise."""
    typ, optional = _base_type(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} cannot be empty (null); give a {typ.__name__} or remove the key")
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[typ]
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, str):
            value = _parse_number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string: accept it as the number it obviously is.
            value = _parse_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key {key!r} must be {want}, got {value!r} ({type(value).__name__})")


def _parse_number(text: str) -> Any:
    try:
        return float(text.strip())
    except ValueError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """A training ``--set key=value`` (see :func:`parse_key_value`); the config is flat, so lists stay text.

    Raises:
        ConfigError: there is no ``=`` or the key is empty.
    """
    key, value = parse_key_value(item, "max_iters=2000")
    if isinstance(value, (dict, list)):
        value = item.partition("=")[2]  # a flat config: "[x]" or "{a: 1}" can only have been meant as text
    return key, value


def _translate_upstream(raw: dict[str, Any], source: str) -> dict[str, Any]:
    out = dict(raw)
    iters = [out.pop(k) for k in ("eval_iters_train", "eval_iters_val") if k in out]
    if iters and "eval_iters" not in out:
        out["eval_iters"] = max(int(_coerce("eval_iters", v, int)) for v in iters)
    for key in ("always_save_checkpoint", "validate", "backend"):
        out.pop(key, None)
    if out.pop("eval_only", False):
        raise ConfigError(f"{source}: eval_only: true is not a training run; use `crystallab evaluate`")
    underrep = out.pop("underrep_p", 0)
    if underrep not in (0, 0.0, None):
        raise ConfigError(f"{source}: underrep_p={underrep!r} is not supported; remove it or set it to 0")
    for key in sorted(set(raw) & set(UPSTREAM_KEYS)):
        log.info("%s: CrystaLLM key %r %s", source, key, UPSTREAM_KEYS[key])
    return out


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build and validate a `TrainConfig` from a flat mapping (YAML document, overrides already applied).

    Raises:
        ConfigError: an unknown key, a wrong type or an impossible value; the message names the key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping of key: value lines, got {type(raw).__name__}")
    raw = _translate_upstream(raw, source)
    if raw.get("init_from") == "resume" and raw.get("out_dir"):
        run, saved = _saved_run_config(str(raw["out_dir"]))
        raw = {**saved, **raw, "out_dir": str(run)}  # resolved once here, so later steps cannot disagree
    hints = _hints()
    unknown = sorted(k for k in raw if k not in hints)
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(hints), n=2, cutoff=0.6)
            parts.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ConfigError(
            f"{source}: unknown key{'s' if len(parts) > 1 else ''} {', '.join(parts)}; "
            "the keys are listed in engine/train/config.py (TrainConfig)"
        )
    if isinstance(raw.get("lora_targets"), (list, tuple)):  # a YAML list of names, in a flat config
        raw = {**raw, "lora_targets": ",".join(map(str, raw["lora_targets"]))}
    values = {k: _coerce(k, v, hints[k]) for k, v in raw.items()}
    if "dtype" in values:
        values["dtype"] = _DTYPE_ALIASES.get(values["dtype"].lower(), values["dtype"].lower())
    config = TrainConfig(**values)
    if config.init_from == "scratch":
        config = _fill_architecture(config, explicit=set(values))
    return validate(config, source)


def _run_dir_candidates(out_dir: str | os.PathLike) -> list[Path]:
    """The places a typed run folder may be, in the order they are tried (see `resolve_run_dir`)."""
    from engine.lab.settings import get_settings

    path = Path(out_dir).expanduser()
    if path.is_absolute():
        return [path]
    here, under_runs = (Path.cwd() / path).resolve(), get_settings().train_dir / path
    return [under_runs, here] if len(path.parts) == 1 else [here, under_runs]


def resolve_run_dir(out_dir: str | os.PathLike, *, existing: bool = False) -> Path:
    """Where a run folder named on the command line (``--run-dir``, ``--resume``, ``out_dir``) lives.

    - An absolute path (or ``~/...``) is taken as given.
    - A bare name (``RUN``) is ``<runs>/train/RUN``, as a bare dataset name is ``<runs>/data/NAME``.
    - A relative path with a folder part (``runs/train/RUN``, ``../elsewhere/RUN``) is a path from the current
      folder. For an existing run (``existing``) it is looked up under ``<runs>/train/`` when the current folder
      holds no such run, so the README's ``--resume runs/train/RUN``, typed in the checkout, ``--resume RUN`` and
      an absolute path all name the same run.

    Args:
        out_dir: The path as typed.
        existing: The folder should already hold a run (resume): the spelling that finds a ``config.yaml`` wins;
            a bare name also finds a run folder in the current folder when ``<runs>/train/`` has none.

    Returns:
        An absolute path (it may not exist; the caller says what is missing).
    """
    candidates = _run_dir_candidates(out_dir)
    if existing:
        for candidate in candidates:
            if (candidate / "config.yaml").exists():
                return candidate
        for candidate in candidates:
            if candidate.exists():
                return candidate  # not a run: the caller refuses it, naming this folder
    return candidates[0]


def resolve_ckpt_path(path: str | Path) -> Path:
    """A checkpoint path: absolute as given, relative under the runs root (``runs/pretrained/...``)."""
    from engine.lab.settings import get_settings

    p = Path(path).expanduser()
    return (p if p.is_absolute() else get_settings().runs_dir / p).resolve()


def _saved_run_config(out_dir: str) -> tuple[Path, dict[str, Any]]:
    """Resume: (the run folder, its own resolved config), the base that the given keys override."""
    run = resolve_run_dir(out_dir, existing=True)
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, NotADirectoryError):
        looked = " or ".join(str(p) for p in dict.fromkeys(_run_dir_candidates(out_dir)))
        raise ConfigError(
            f"cannot resume {out_dir}: there is no training run folder (one with a config.yaml) at {looked}; "
            "pass the run's folder (runs/train/RUN), its name (RUN) or an absolute path"
        ) from None
    return run, {k: v for k, v in saved.items() if k in _hints()}


def _fill_architecture(config: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Scratch runs: take the preset's shape (default small), then the explicitly given keys."""
    from engine.models.gpt import PRESETS  # lazy: importing torch is not needed to read a YAML file

    name = config.preset or "small"
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[name]
    fill = {k: getattr(shape, k) for k in ARCH_KEYS if k not in explicit or getattr(config, k) is None}
    return replace(config, preset=name, **fill)


def max_new_block_size(preset: str | None) -> tuple[int, str]:
    """(the longest context a new model of ``preset`` may have, in tokens; the rule, in words).

    The rule: at most `BLOCK_SIZE_FACTOR` times the preset's context and never above `MAX_BLOCK_SIZE`, so a
    typo such as ``block_size=100000`` is refused instead of building a position table bigger than the model.
    """
    from engine.models.gpt import PRESETS

    name = preset if preset in PRESETS else "small"
    base = PRESETS[name].block_size
    limit = min(MAX_BLOCK_SIZE, BLOCK_SIZE_FACTOR * base)
    return limit, (f"at most {BLOCK_SIZE_FACTOR}x the {name} preset's {base} and never above {MAX_BLOCK_SIZE}")


def _check(ok: bool, message: str, source: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {message}")


def validate(config: TrainConfig, source: str = "config") -> TrainConfig:
    """Refuse impossible values and combinations; return the config unchanged when it is sound.

    Checkpoint compatibility (vocabulary, shapes) is checked when the checkpoint is loaded, not here.
    """
    c = config
    from engine.train.objectives import OBJECTIVES  # late: objectives may import configs' neighbours

    _check(c.objective in OBJECTIVES,
           f"objective must be one of {', '.join(sorted(OBJECTIVES))}, got {c.objective!r}", source)
    problem = OBJECTIVES[c.objective](c).config_problem(c)
    _check(problem is None, str(problem), source)
    _check(c.diffusion_variant in ("direct", "shift"),
           f"diffusion_variant must be direct or shift, got {c.diffusion_variant!r}", source)
    _check(c.diffusion_anneal_steps >= 0,
           f"diffusion_anneal_steps must be >= 0 (0: bidirectional at once), got {c.diffusion_anneal_steps}", source)
    for key in ("diffusion_random_length", "diffusion_prompt_dropout"):
        _check(0.0 <= getattr(c, key) <= 1.0, f"{key} must be a fraction in [0, 1], got {getattr(c, key)}", source)
    if c.objective == "distill" or c.teacher_ckpt is not None:
        from engine.train.distill import check_distill_config

        check_distill_config(c, source)
    _check(c.init_from in INIT_MODES, f"init_from must be one of {', '.join(INIT_MODES)}, got {c.init_from!r}", source)
    _check(_NAME_RE.match(c.name) is not None,
           f"name {c.name!r} may only hold letters, digits, '.', '_' and '-' (it names a folder)", source)
    _check(c.dataset.strip() != "", "dataset is empty; name a token dataset folder (e.g. builtin)", source)
    if c.init_from == "finetune":
        _check(c.init_ckpt is not None,
               "init_from: finetune needs init_ckpt (the checkpoint to start from, e.g. crystallm_v1_small/ckpt.pt)",
               source)
    if c.init_from == "resume":
        _check(c.out_dir is not None,
               "init_from: resume needs the interrupted run's folder: set out_dir or run "
               "`crystallab train --resume RUN_DIR`", source)
    if c.init_from == "finetune":
        _check(c.preset is None,
               f"preset only shapes new models; with init_from: {c.init_from} the shape comes from the checkpoint",
               source)
    if c.init_from == "scratch":
        _check(c.init_ckpt is None,
               "init_ckpt is only read with init_from: finetune; remove it or set init_from: finetune", source)
        _check(not c.freeze_embeddings and c.train_last_n_layers is None,
               "freeze_embeddings / train_last_n_layers only make sense when fine-tuning (init_from: finetune)",
               source)
    if c.lora_rank is not None:
        from engine.train.lora import settings_problem

        problem = settings_problem(c.lora_rank, c.lora_alpha, c.lora_dropout, lora_target_names(c))
        _check(problem is None, str(problem), source)
        _check(c.objective == "next-token",
               f"lora_rank adapts the GPT's next-token objective, not objective {c.objective}; for hf-causal-lm set "
               "hf_lora_rank, and a masked-diffusion model is fine-tuned whole", source)
        _check(c.init_from != "scratch", "LoRA adapts a trained model: set init_from: finetune and init_ckpt (the "
               "base), or remove lora_rank to train a new model", source)
        _check(not c.freeze_embeddings and c.train_last_n_layers is None,
               "freeze_embeddings / train_last_n_layers do not combine with LoRA (only the adapters train)", source)
    for key in ARCH_KEYS:
        value = getattr(c, key)
        _check(value is None or value >= 1, f"{key} must be at least 1, got {value}", source)
    _check(c.block_size is None or c.block_size >= 8,
           f"block_size must be at least 8 tokens, got {c.block_size}", source)
    if c.init_from == "scratch" and c.block_size is not None:
        limit, why = max_new_block_size(c.preset)
        _check(c.block_size <= limit,
               f"block_size={c.block_size} is too long for a new model: choose 8 to {limit} tokens ({why}); "
               "a CIF is rarely longer than ~1,000 tokens, and a longer context costs memory and time per step",
               source)
    if c.n_embd is not None and c.n_head is not None:
        _check(c.n_embd % c.n_head == 0,
               f"n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head}); CrystaLLM uses n_embd = 64 * n_head",
               source)
    _check(0.0 <= c.dropout < 1.0, f"dropout must be in [0, 1), got {c.dropout}", source)
    _check(c.train_last_n_layers is None or c.train_last_n_layers >= 1,
           f"train_last_n_layers must be at least 1 (or null for all layers), got {c.train_last_n_layers}", source)
    if c.train_last_n_layers is not None and c.n_layer is not None:
        _check(c.train_last_n_layers <= c.n_layer,
               f"train_last_n_layers ({c.train_last_n_layers}) exceeds n_layer ({c.n_layer})", source)
    _check(c.learning_rate > 0, f"learning_rate must be positive, got {c.learning_rate}", source)
    _check(c.min_lr is None or c.min_lr_ratio is None,
           "give either min_lr or min_lr_ratio, not both", source)
    _check(c.min_lr is None or 0 <= c.min_lr <= c.learning_rate,
           f"min_lr ({c.min_lr}) must be between 0 and learning_rate ({c.learning_rate})", source)
    _check(c.min_lr_ratio is None or 0 <= c.min_lr_ratio <= 1,
           f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}", source)
    _check(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}", source)
    _check(0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {c.beta1}, {c.beta2}",
           source)
    _check(c.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {c.grad_clip}", source)
    _check(c.cpu_threads is None or c.cpu_threads >= 1, f"cpu_threads must be at least 1, got {c.cpu_threads}",
           source)
    for key in ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval"):
        _check(getattr(c, key) >= 1, f"{key} must be at least 1, got {getattr(c, key)}", source)
    for key, (limit, why) in LOOP_LIMITS.items():
        _check(getattr(c, key) <= limit, f"{key}={getattr(c, key):,} exceeds {limit:,} ({why})", source)
    _check(0 <= c.warmup_iters <= c.max_iters,
           f"warmup_iters ({c.warmup_iters}) must be between 0 and max_iters ({c.max_iters})", source)
    if c.lr_decay_iters is not None:
        _check(c.lr_decay_iters > c.warmup_iters,
               f"lr_decay_iters ({c.lr_decay_iters}) must exceed warmup_iters ({c.warmup_iters})", source)
    _check(c.early_stopping_patience is None or c.early_stopping_patience >= 1,
           f"early_stopping_patience must be at least 1 evaluation (or null), got {c.early_stopping_patience}",
           source)
    _check(c.early_stopping_min_delta >= 0,
           f"early_stopping_min_delta must be >= 0, got {c.early_stopping_min_delta}", source)
    _check(_DEVICE_RE.match(c.device) is not None,
           f"device must be auto, cpu, cuda, cuda:N or mps, got {c.device!r}", source)
    _check(c.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)} (or bf16/fp16/fp32), got {c.dtype!r}",
           source)
    return config


def lora_target_names(config: TrainConfig) -> list[str]:
    """``lora_targets`` as a list of module names."""
    return [t.strip() for t in config.lora_targets.split(",") if t.strip()]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides in order, validate.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: ``key=value`` strings (``--set``), applied after the file.

    Raises:
        ConfigError: the file is missing or not YAML, or a key/value is refused (the message says which).
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(path, "config file", "start from a preset in configs/ (e.g. configs/tiny_cpu.yaml)")
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    return config_from_dict(raw, source)


def dump_config(config: TrainConfig) -> str:
    """YAML text of a config, keys in field order (what the run folder's ``config.yaml`` holds)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


def field_docs() -> dict[str, str]:
    """One-line description of every key (for ``crystallab train --help-keys`` and the dashboard)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return {f.name: docs.get(f.name, "") for f in fields(TrainConfig)}


_MEASURED = re.compile(r"(?P<steps>\d[\d,]*) steps in (?P<value>\d+(?:\.\d+)?) ?(?P<unit>s|min|h)\b")
_UNIT_S = {"s": 1.0, "min": 60.0, "h": 3600.0}


def preset_measured(path: str | os.PathLike) -> dict[str, Any] | None:
    """The measured training time a preset's header states (``# Measured ...: 350 steps in 4.3 min``), if any.

    Returns:
        ``{"steps", "seconds", "device"}`` (``"cpu"`` when the header says CPU, core(s) or laptop, else
        ``"cuda"``) and ``"text"``: the header's sentence from "Measured" on, up to the first semicolon or
        colon after the figure; None when the header gives no measured figure.
    """
    header = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    text = " ".join(header)
    start = text.find("Measured")
    if start < 0:
        return None
    sentence = text[start:]
    match = _MEASURED.search(sentence)
    if match is None:
        return None
    ends = [i for i in (sentence.find(";", match.end()), sentence.find(":", match.end())) if i >= 0]
    sentence = sentence[: min(ends) if ends else match.end()].rstrip(".,")
    device = "cpu" if re.search(r"\bCPU\b|\bcores?\b|laptop", sentence) else "cuda"
    return {"steps": int(match["steps"].replace(",", "")), "seconds": float(match["value"]) * _UNIT_S[match["unit"]],
            "device": device, "text": sentence}

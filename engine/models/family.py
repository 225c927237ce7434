"""The model-family seam: what the rest of the lab asks of a model, and the registry of families.

A *family* is one kind of model (CrystaLLM's autoregressive GPT today; a masked-diffusion model and Hugging Face
causal LMs later). The rest of the lab (sample sets, sweeps, CSP, reports, pages) never branches on which family
it holds: it loads a model with `load_family_model` and asks the returned `FamilyModel` for

- ``generate(prompt, n, knobs, seed=..., batch_size=..., progress=...)``: texts that post-processing turns into
  CIFs, one `Generation` per sample, in sample order, reproducible for a seed;
- ``sequence_log_likelihood(texts)``: log p(text) in nats and the number of scored tokens, per text (used by infill
  ranking, the IPT probe and distillation);
- ``training_loss(batch)``: the family's training objective on one batch (a scalar tensor);
- ``knobs``: its own sampling settings with defaults and ranges (the Sample page and sweep configs show these);
- ``describe()``: a plain dict for ``crystallab ckpt inspect``, sample-set provenance and reports.

Adding a family means one module (or folder) under ``engine/models/`` with a `FamilyModel` subclass and one
`register_family` call, nothing else. A checkpoint records its family in ``crystallab.family``; CrystaLLM's own
``ckpt.pt`` files carry none and are the GPT family. Families from outside the engine (a lab's own, or the test
suite's) are registered by naming their modules in ``CRYSTALLAB_FAMILY_MODULES`` (comma-separated import paths),
which detached jobs inherit.
"""

from __future__ import annotations

import importlib
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from engine.lab.errors import CheckpointError, ConfigError

DEFAULT_FAMILY = "crystallm-gpt"
"""The family of a checkpoint that names none (CrystaLLM's published ``ckpt.pt`` and the lab's older files)."""

FAMILY_MODULES_ENV = "CRYSTALLAB_FAMILY_MODULES"
"""Environment variable: comma-separated modules to import so that they register extra families."""


@dataclass(frozen=True)
class Generation:
    """One generated sample.

    Attributes:
        ids: Prompt ids followed by the generated ids (the family's own token ids; empty when it has none).
        text: The full text, prompt included, in the family's text format.
        n_new_tokens: Number of generated tokens.
        finished: Whether generation stopped at the end of a CIF (not at a token budget).
        truncated_reason: Why an unfinished sample stopped (e.g. ``"max_new_tokens"``); None when finished.
    """

    ids: list[int]
    text: str
    n_new_tokens: int
    finished: bool
    truncated_reason: str | None


@dataclass(frozen=True)
class SequenceScore:
    """Log-likelihood of one text under a model.

    Attributes:
        logp: Sum of log-probabilities of the scored tokens, in nats (a bound for families that only bound it).
        n_tokens: Number of scored tokens (the first token, which conditions the rest, is not scored).
    """

    logp: float
    n_tokens: int

    @property
    def perplexity(self) -> float:
        """exp(-logp / n_tokens); inf when nothing was scored."""
        return math.exp(-self.logp / self.n_tokens) if self.n_tokens else math.inf


@dataclass(frozen=True)
class Knob:
    """One sampling setting of a family, with its default and allowed range.

    Attributes:
        name: Key in sample-set configs, sweep configs and CLI flags (``top_k`` -> ``--top-k``).
        default: Value used when none is given.
        kind: ``"float"``, ``"int"``, ``"bool"`` or ``"choice"`` (one of ``choices``, a string).
        low: Smallest allowed value (inclusive; None: unbounded).
        high: Largest allowed value (inclusive; None: unbounded).
        help: One line for forms and ``--help``: what it does and its unit.
        none_ok: None is allowed (and means "off").
        choices: The allowed values of a ``"choice"`` knob.
    """

    name: str
    default: Any
    kind: str
    low: float | None = None
    high: float | None = None
    help: str = ""
    none_ok: bool = False
    choices: tuple[str, ...] = ()

    def coerce(self, value: Any, source: str = "sampling settings") -> Any:
        """``value`` as this knob's type, checked against its range.

        Raises:
            ConfigError: not a value of this kind, or outside ``[low, high]``; the message names the knob.
        """
        if value is None and self.none_ok:
            return None
        where = f"{source}: {self.name}"
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            raise ConfigError(f"{where} must be one of {', '.join(self.choices)}, not {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        if self.kind == "int":
            if float(value) != int(value):
                raise ConfigError(f"{where} must be a whole number, not {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, not {value!r}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ConfigError(f"{where} = {value!r} is outside its range {self.range_text()}")
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"[{lo}, {hi}]"


class FamilyModel(ABC):
    """A loaded model of one family, ready to generate and score. Subclasses set the class attributes."""

    family: ClassVar[str]
    """Registry name, recorded in checkpoints and sample sets (e.g. ``"crystallm-gpt"``)."""
    text_format: ClassVar[str]
    """What ``generate`` writes: ``"crystallm-cif"`` (CrystaLLM's CIF text), or another format whose texts the
    family turns into CIF text before returning them."""
    knobs: ClassVar[tuple[Knob, ...]]
    """Sampling settings this family understands, beyond the shared seed / batch size / n."""

    path: Path | None
    """Where the model was loaded from."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, device: Any) -> "FamilyModel":
        """Load a model of this family from ``path`` onto ``device``.

        Raises:
            CheckpointError: the file is not a usable model of this family (one line naming it).
        """

    @classmethod
    def checkpoint_card(cls, path: Path) -> dict[str, Any]:
        """What a checkpoint file of this family is, read without building the model (cheap enough for a
        dashboard selection or a sweep's pre-flight): ``{"info": JSON-ready dict, "problem": str | None,
        "caption": one line}``. ``problem`` says why the file cannot be used (it is still described). Default:
        the lab's provenance record and the file's hash; the GPT family adds its shape and vocabulary check.

        Raises:
            CheckpointError: the file cannot be read as a checkpoint.
        """
        from engine.models.checkpoint import checkpoint_sha256, read_meta

        path = Path(path)
        meta = read_meta(path)
        info = {"family": cls.family, "path": str(path.resolve()),
                "sha256": checkpoint_sha256(path) if path.is_file() else None,
                **{k: meta.get(k) for k in ("step", "run", "parent", "created_at", "data_fingerprint") if k in meta}}
        caption = f"{cls.family} model" + (f" | run {meta['run']}" if meta.get("run") else "") + (
            f" | step {meta['step']:,}" if isinstance(meta.get("step"), int) else "")
        return {"info": info, "problem": None, "caption": caption}

    @abstractmethod
    def generate(
        self,
        prompt: Any,
        n: int,
        knobs: Mapping[str, Any],
        *,
        seed: int = 1337,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        first_index: int = 0,
    ) -> list[Generation]:
        """``n`` samples for a `engine.crystal.prompts.Prompt`, with knobs already resolved by `resolve_knobs`.

        Sample ``i`` of the call is sample ``first_index + i`` of the run seeded ``seed``: its randomness depends
        on that index alone, so a run drawn in several calls (a resumed sample set) equals one drawn at once.
        ``progress(done, n)`` is called as samples complete.
        """

    def sampling_record(self, prompt: Any, knobs: Mapping[str, Any]) -> dict[str, Any]:
        """What a sample set records of its sampling settings: the knobs, plus anything the family derives from
        them and the prompt (the GPT family adds the element constraint it applied)."""
        return dict(knobs)

    @abstractmethod
    def sequence_log_likelihood(self, texts: Sequence[str]) -> list[SequenceScore]:
        """Log-likelihood of each text (in the family's text format) under the model."""

    def structure_text(self, structure: Any) -> str:
        """A pymatgen structure written as this family's training texts are (what `sequence_log_likelihood`
        scores; the IPT probe scores translated copies of a structure this way). Default: CrystaLLM's canonical
        CIF, as the model reads it; a family with another text format overrides this.

        Raises:
            InputError: the structure cannot be written in this format (disordered, unknown element, too large).
        """
        from engine.crystal.canonical import structure_to_model_view

        return structure_to_model_view(structure)

    @abstractmethod
    def training_loss(self, batch: Any) -> Any:
        """The family's training objective on one batch (a scalar tensor with gradients)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain-data description: family, parameters, context length, vocabulary, provenance."""

    def token_logits(self, idx: Any) -> Any:
        """Next-token logits (B, T, vocab) for token ids ``idx`` (B, T), no gradients: what a distillation teacher
        gives (`engine.train.distill`). Families whose outputs are not next-token logits over the lab's
        vocabulary leave this out, and distillation refuses them in one line (`has_token_logits`)."""
        raise NotImplementedError(f"the {self.family} family does not expose next-token logits")

    @classmethod
    def has_token_logits(cls) -> bool:
        """Whether this family implements `token_logits` (and so can teach or be distilled into)."""
        return cls.token_logits is not FamilyModel.token_logits

    @property
    def device(self) -> Any:
        """Where the model computes (a torch device or its name)."""
        return "cpu"

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """Whether ``path``, a folder (or a name that is not a file), is a model of this family that records no
        family itself (e.g. a Hugging Face model folder). Checkpoint files name their family and need no guess."""
        return False

    @classmethod
    def knob(cls, name: str) -> Knob:
        for k in cls.knobs:
            if k.name == name:
                return k
        raise KeyError(name)

    @classmethod
    def default_knobs(cls) -> dict[str, Any]:
        return {k.name: k.default for k in cls.knobs}


def resolve_knobs(family: type[FamilyModel], given: Mapping[str, Any] | None, source: str = "sampling settings"
                  ) -> dict[str, Any]:
    """The family's defaults overridden by ``given``, each value checked.

    Raises:
        ConfigError: a knob this family does not have (the message lists the ones it has), or a bad value.
    """
    out = family.default_knobs()
    for name, value in (given or {}).items():
        try:
            knob = family.knob(name)
        except KeyError:
            names = ", ".join(k.name for k in family.knobs)
            raise ConfigError(
                f"{source}: {name!r} is not a sampling setting of the {family.family} family; it has: {names}"
            ) from None
        out[name] = knob.coerce(value, source)
    return out


def shared_knobs(family: type[FamilyModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that name knobs of ``family``; None values are left out.

    Commands that take CrystaLLM-style flags (``--temperature``, ``--top-k``, ...) for any family pass them here,
    so a family without such a knob is not handed one (`resolve_knobs` then fills its own defaults).
    """
    names = {k.name for k in family.knobs}
    return {k: v for k, v in values.items() if k in names and v is not None}


def provenance(model: FamilyModel) -> dict[str, Any]:
    """What a sample set, sweep cell or CSP run records about the model that produced it."""
    from engine.models.checkpoint import checkpoint_sha256

    info = model.describe()
    out = {
        "path": str(model.path) if model.path else None,
        "step": info.get("step"),
        "sha256": checkpoint_sha256(model.path) if model.path and Path(model.path).is_file() else None,
        "run": info.get("run"),
    }
    if model.family != DEFAULT_FAMILY:  # older sample sets and CSP runs (all GPT) carry no family key
        out["family"] = model.family
    return out


# ----------------------------------------------------------------------------------------------------------------
# Registry

# name -> class, or "module:Class" imported on first use (so `crystallab --help` does not import torch).
_REGISTRY: dict[str, type[FamilyModel] | str] = {
    DEFAULT_FAMILY: "engine.models.crystallm:CrystaLLMGPT",
    "hf-causal-lm": "engine.models.hf:HFCausalLM",
    "masked-diffusion": "engine.models.diffusion:MaskedDiffusionModel",
}
_PLUGINS_LOADED: set[str] = set()


def register_family(cls: type[FamilyModel]) -> type[FamilyModel]:
    """Register a family class under ``cls.family`` (usable as a decorator). Re-registering replaces it."""
    _REGISTRY[cls.family] = cls
    return cls


def _load_plugins() -> None:
    for name in filter(None, (m.strip() for m in os.environ.get(FAMILY_MODULES_ENV, "").split(","))):
        if name in _PLUGINS_LOADED:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"{FAMILY_MODULES_ENV} names module {name!r}, which cannot be imported ({exc}): fix or unset it"
            ) from None
        _PLUGINS_LOADED.add(name)


def family_names() -> list[str]:
    """Names of every registered family, the default first."""
    _load_plugins()
    return sorted(_REGISTRY, key=lambda n: (n != DEFAULT_FAMILY, n))


def get_family(name: str) -> type[FamilyModel]:
    """The class registered as ``name``.

    Raises:
        CheckpointError: no such family (the message lists the registered ones).
    """
    _load_plugins()
    entry = _REGISTRY.get(name)
    if entry is None:
        raise CheckpointError(
            f"model family {name!r} is not known to this lab (known: {', '.join(family_names())}): "
            f"upgrade crystallab, or name the module that registers it in {FAMILY_MODULES_ENV}"
        )
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = entry
    return entry


def peek_family(path: str | os.PathLike) -> str:
    """The family a checkpoint records (``crystallab.family``), without building a model.

    A checkpoint folder records it in ``crystallab.json``; a folder (or a missing path) that records none is
    claimed by the first family whose `FamilyModel.recognises` accepts it.

    Raises:
        CheckpointError: as `engine.models.checkpoint.read_raw` (missing, unreadable, pickled code), or a folder
            no family recognises.
    """
    from engine.models.checkpoint import read_meta

    p = Path(path)
    if p.is_dir() or not p.exists():
        meta = read_meta(p) if p.is_dir() else {}
        if meta.get("family"):
            return str(meta["family"])
        for name in family_names():
            if get_family(name).recognises(p):
                return name
        if p.is_dir():
            raise CheckpointError(f"{p} is a folder that is no model: pass a checkpoint file (.pt), a Hugging Face "
                                  "model folder (config.json, weights, tokenizer) or a run's checkpoint folder")
    meta = read_meta(p)
    return str(meta.get("family") or DEFAULT_FAMILY)


def load_family_model(path: str | os.PathLike, device: Any = "cpu") -> FamilyModel:
    """Load any model the lab knows from ``path``: the checkpoint's family decides the class.

    Raises:
        CheckpointError: missing or unusable file, or a family this lab does not know.
    """
    path = Path(path)
    return get_family(peek_family(path)).load(path, device)


_KNOB_LABELS = {"temperature": "temperature", "top_k": "top-k", "top_p": "top-p", "max_new_tokens": "max new tokens"}
_NOT_KNOBS = ("n", "k", "seed", "batch_size", "with_spacegroup", "allowed_elements", "constrain_spacegroup",
              "use_cache")


def knobs_text(sampling: Mapping[str, Any]) -> str:
    """A run's sampling knobs as prose for captions and reports (``temperature 1.0, top-k 10, ...``)."""
    parts = []
    order = {name: i for i, name in enumerate((*_KNOB_LABELS, "constrain"))}
    for key, value in sorted(sampling.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        if key in _NOT_KNOBS:
            continue
        if key == "constrain":
            parts.append(f"element constraints {'on' if value else 'off'}")
        else:
            parts.append(f"{_KNOB_LABELS.get(key, key.replace('_', ' '))} {value}")
    return ", ".join(parts)


def knob_argv(knobs: Mapping[str, Any], flag_knobs: Sequence[Knob]) -> list[str]:
    """Command-line arguments that ask a sampling command for ``knobs`` (inverse of `knobs_from_args`)."""
    named = {k.name: k for k in flag_knobs}
    argv: list[str] = []
    for name, value in knobs.items():
        knob = named.get(name)
        if knob is None:
            argv += ["--knob", f"{name}={str(value).lower() if isinstance(value, bool) else value}"]
        elif knob.kind == "bool":
            if bool(value) != bool(knob.default):
                argv.append(f"--no-{name.replace('_', '-')}" if knob.default else f"--{name.replace('_', '-')}")
        elif value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


# ----------------------------------------------------------------------------------------------------------------
# Command-line flags for knobs


def add_knob_arguments(parser: Any, knobs: Sequence[Knob], defaults: Mapping[str, Any] | None = None) -> None:
    """Add one flag per knob (``top_k`` -> ``--top-k``; a knob on by default -> ``--no-NAME``) and ``--knob``.

    Flags default to None, so `knobs_from_args` can tell a value the user gave from the family's default. The
    flags are those of the knobs given (the CrystaLLM GPT family's for the sampling commands); ``--knob
    NAME=VALUE`` (repeatable) reaches the knobs of any other family.

    Args:
        defaults: This command's own defaults where they differ from the family's (shown in ``--help``).
    """
    defaults = dict(defaults or {})
    for knob in knobs:
        default = defaults.get(knob.name, knob.default)
        flag = "--" + knob.name.replace("_", "-")
        if knob.kind == "bool":
            if default:
                parser.add_argument(f"--no-{flag[2:]}", dest=knob.name, action="store_const", const=False,
                                    default=None, help=f"switch off: {knob.help}")
            else:
                parser.add_argument(flag, dest=knob.name, action="store_const", const=True, default=None,
                                    help=knob.help)
        else:
            parser.add_argument(flag, dest=knob.name, type={"float": float, "choice": str}.get(knob.kind, int),
                                default=None,
                                help=f"{knob.help} (default {default})")
    parser.add_argument("--knob", dest="knobs", action="append", default=[], metavar="NAME=VALUE",
                        help="a sampling knob of the checkpoint's model family by name (repeatable), e.g. "
                        "--knob steps=64 for a family that has it")


def knobs_from_args(args: Any, flag_knobs: Sequence[Knob], family: type[FamilyModel],
                    defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The knobs a command's flags ask of ``family``, resolved against its defaults and ranges.

    Raises:
        ConfigError: a flag given for a knob the family does not have, a ``--knob`` that is not ``NAME=VALUE``,
            or a bad value (each message names the flag).
    """
    import yaml

    own = {k.name for k in family.knobs}
    given: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if k in own}
    for knob in flag_knobs:
        value = getattr(args, knob.name, None)
        if value is None:
            continue
        if knob.name not in own:
            flag = "--" + knob.name.replace("_", "-")
            raise ConfigError(
                f"{flag} does not apply to the {family.family} family; its sampling knobs are "
                f"{', '.join(sorted(own)) or 'none'} (give them with --knob NAME=VALUE)"
            )
        given[knob.name] = value
    for item in getattr(args, "knobs", None) or []:
        name, sep, raw = str(item).partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--knob {item!r} must be NAME=VALUE, e.g. --knob temperature=0.7")
        try:
            given[name.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--knob {item!r}: {raw!r} is not a value (a number, true or false)") from None
    return resolve_knobs(family, given, "sampling flags")

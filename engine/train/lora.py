"""LoRA adapters through `peft`, for any torch module (the lab's GPT, a Hugging Face causal LM, ...).

The lab never writes LoRA by hand: `apply_lora` asks peft to inject low-rank adapters into the named projections
of a module in place (``peft.inject_adapter_in_model``), which freezes every other weight. The module keeps its
class and its forward, so trainers, samplers and KV caches use it unchanged. `adapter_state` / `load_adapter_state`
move the adapter weights (the only trained ones) in and out of checkpoints, and `merge_lora` folds them into the
base weights and removes the adapter layers, leaving the original architecture (a plain checkpoint again).

Targets are module names as peft matches them: a name equal to a module's full dotted name or to its last
components (``c_attn`` matches ``transformer.h.0.attn.c_attn``). A target that matches nothing is a one-line
`ConfigError` listing the names that can be targeted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from engine.lab.errors import ConfigError
from engine.train.objectives import Objective

ADAPTER = "default"
"""peft's adapter name; the lab holds one adapter per model."""


@dataclass(frozen=True)
class LoraSettings:
    """What a LoRA adapter is: recorded in checkpoints so the same adapter can be rebuilt.

    Attributes:
        rank: Rank r of the update B @ A (A: r x in, B: out x r); at least 1.
        alpha: Scale numerator: the update is multiplied by alpha / r.
        dropout: Dropout probability on the adapter's input during training, in [0, 1).
        targets: Module names to adapt (see the module docstring for how they match).
    """

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraSettings":
        return cls(int(d["rank"]), float(d["alpha"]), float(d["dropout"]), tuple(d["targets"]))


@dataclass(frozen=True)
class LoraReport:
    """Parameters after `apply_lora`: what trains (the adapters) and the total (base + adapters)."""

    trainable: int
    total: int
    adapted: tuple[str, ...]
    """Full names of the modules that received an adapter."""

    def summary(self) -> str:
        return (f"LoRA: {self.trainable:,} trainable parameters of {self.total:,} "
                f"({100.0 * self.trainable / max(1, self.total):.2f}%) in {len(self.adapted)} adapted modules")


def settings_problem(rank: Any, alpha: Any, dropout: Any, targets: Any) -> str | None:
    """Why these LoRA settings are impossible (rank <= 0, alpha <= 0, dropout outside [0, 1), no targets), or None."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return f"lora_rank must be a whole number of at least 1 (Gruver et al. use 8), got {rank!r}"
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        return f"lora_alpha must be a positive number (the update is scaled by alpha / rank), got {alpha!r}"
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        return f"lora_dropout must be in [0, 1), got {dropout!r}"
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        return f"lora_targets must be a non-empty list of module names, got {targets!r}"
    return None


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def targetable_names(module: torch.nn.Module) -> list[str]:
    """Short names (last component) of the Linear / Embedding / Conv1d layers peft can adapt, sorted."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style HF models use this for their projections

        kinds = (*kinds, Conv1D)
    except ImportError:
        pass
    return sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if n and isinstance(m, kinds)})


def apply_lora(module: torch.nn.Module, settings: LoraSettings) -> LoraReport:
    """Inject LoRA adapters into ``module`` in place (peft), freezing every non-adapter weight.

    Raises:
        ConfigError: impossible settings, or a target that names no module of ``module`` (the message names
            the target and lists the module names that can be targeted).
    """
    from peft import LoraConfig, inject_adapter_in_model

    problem = settings_problem(settings.rank, settings.alpha, settings.dropout, list(settings.targets))
    if problem:
        raise ConfigError(problem)
    names = [n for n, _ in module.named_modules() if n]
    for target in settings.targets:
        if not any(_matches(n, target) for n in names):
            raise ConfigError(f"lora_targets: {target!r} names no module of {type(module).__name__}; "
                              f"choose among {', '.join(targetable_names(module))}")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none")
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as exc:  # peft refuses e.g. a target that is a LayerNorm or a container module
        raise ConfigError(f"lora_targets {list(settings.targets)}: peft cannot adapt them ({str(exc).splitlines()[0]}); "
                          f"choose among {', '.join(targetable_names(module))}") from None
    return lora_report(module)


def lora_report(module: torch.nn.Module) -> LoraReport:
    """Trainable and total parameter counts of an adapted module, and the modules that carry adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = tuple(n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer))
    params = {id(p): p for p in module.parameters()}.values()  # tied weights counted once
    return LoraReport(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params), adapted)


def is_adapted(module: torch.nn.Module) -> bool:
    """Whether ``module`` carries LoRA adapters (`apply_lora` ran on it)."""
    return hasattr(module, "peft_config")


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (``...c_attn.lora_A.weight`` ...), detached: what a LoRA checkpoint stores."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}


def load_adapter_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load adapter weights saved by `adapter_state` into an adapted module; every adapter weight must be given.

    Raises:
        ValueError: keys missing or unexpected (``where`` names the file); callers turn it into their error type.
    """
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    expected = set(adapter_state(module))
    missing = sorted(expected - set(state))
    unexpected = sorted(getattr(result, "unexpected_keys", []) or [])
    if missing or unexpected:
        what = (f"lacks {', '.join(missing[:3])}" if missing else f"has unknown {', '.join(unexpected[:3])}")
        raise ValueError(f"{where}: its adapter weights do not fit the model ({what})")


@torch.no_grad()
def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight (W + alpha/r B A, peft's ``merge``) and put the base layers back.

    Returns ``module`` itself, now without adapter layers: its state dict has the original architecture's keys.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # raises if a merged weight is not finite
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def settings_from(rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> LoraSettings:
    """`LoraSettings` from config values, checked.

    Raises:
        ConfigError: as `settings_problem`.
    """
    problem = settings_problem(rank, alpha, dropout, list(targets or []))
    if problem:
        raise ConfigError(problem)
    return LoraSettings(int(rank), float(alpha), float(dropout), tuple(targets))


# ----------------------------------------------------------------------------------------------------------------
# The trainer's LoRA objective (the lab's GPT checkpoints)


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile / DDP wrappers (whose state-dict keys carry no prefix)."""
    from engine.models.checkpoint import _unwrap

    return _unwrap(model)


class LoraObjective(Objective):
    """Wraps an objective (`engine.train.objectives.Objective`): same network and loss, with LoRA adapters.

    ``init_from: finetune``: the inner objective builds the network from ``init_ckpt`` (the base), then adapters
    are applied. ``init_from: resume``: the checkpoint holds adapters only; the network is rebuilt from the base it
    records (path and SHA-256 checked) and the saved adapters are loaded. ``scratch`` is refused by the config
    (adapting a random network teaches nothing that full training would not). Checkpoints store the adapter weights
    and ``crystallab.lora`` (settings + base record), so `engine.models.checkpoint.load_model` rebuilds the model.
    """

    def __init__(self, inner: Any, config: Any) -> None:
        from engine.train.config import lora_target_names

        self.inner = inner
        self.name = f"{inner.name} + LoRA"
        self.settings = settings_from(config.lora_rank, config.lora_alpha, config.lora_dropout,
                                      lora_target_names(config))
        self.base: dict[str, str] | None = None
        self.loss_kind = inner.loss_kind

    def sampler(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.sampler(*args, **kwargs)

    def build(self, config: Any, ckpt: Any | None, info: Any) -> torch.nn.Module:
        from engine.models.lora_checkpoint import base_record, load_base

        if ckpt is None:
            raise ConfigError("LoRA adapts a trained model: set init_from: finetune and init_ckpt (the base)")
        if config.init_from == "resume":
            lora = ckpt.meta.get("lora")
            if not lora:
                raise ConfigError(f"{ckpt.path} is a whole-model checkpoint, not a LoRA run's; resume it without "
                                  "lora_rank")
            model = self.inner.build(config, load_base(ckpt), info)
            self.settings, self.base = LoraSettings.from_dict(lora), dict(lora["base"])
            apply_lora(model, self.settings)
            try:
                load_adapter_state(model, ckpt.state_dict, str(ckpt.path))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        else:
            model = self.inner.build(config, ckpt, info)
            self.base = base_record(ckpt.path)
            apply_lora(model, self.settings)
        info("%s", lora_report(model).summary())
        return model

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, step: int, train: bool
             ) -> torch.Tensor:
        return self.inner.loss(model, x, y, step=step, train=train)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {**self.inner.checkpoint_fields(), "lora": {**self.settings.as_dict(), "base": self.base}}

    def checkpoint_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return adapter_state(_bare(model))

    def describe(self) -> str:
        return f"{self.inner.describe()} + LoRA rank {self.settings.rank}"

"""Training a Hugging Face causal LM on crystal text through the lab's trainer (``objective: hf-causal-lm``).

Gruver et al.'s recipe: LoRA via peft (rank 8, alpha 32, dropout 0.05 on ``q_proj,v_proj`` by default;
``hf_lora_targets: all-linear`` for every linear layer; ``hf_lora_rank: 0`` trains every weight), on Gruver's
crystal text with a fresh random translation each time a structure is drawn and the 2/3 generation, 1/3 infill mix
(`engine.crystal.gruver`), or on CrystaLLM's CIF text (``hf_text_format: cif``) through the model's tokenizer.

The HF model has its own tokenizer, so batches are not the dataset's token windows: `HFBatches` decodes the
dataset's CIFs (`engine.data.tokens.iter_cifs`), parses the structures it draws (cached) and renders them. A run's
checkpoints are folders, ``ckpt/last/`` and ``ckpt/best/``: the adapter (or whole model) as ``save_pretrained``
writes it, the tokenizer, and ``crystallab.json`` (family, text format, base folder path and sha256, run, step),
written into a temporary folder and renamed into place. Each checkpoint folder also holds ``trainer_state.pt``
(AdamW state, step, best validation loss, scaler and early-stopping state; tensors and plain values only, read
with ``weights_only``), so ``crystallab train --resume RUN`` continues an HF run from ``ckpt/last/`` exactly where
it stopped: the adapter (or whole model) is loaded trainable, the base checked against its recorded sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine.lab.errors import CheckpointError, ConfigError, InputError
from engine.models.hf import (
    FAMILY,
    META_FILE,
    TEXT_FORMATS,
    HFCausalLM,
    check_model_folder,
    encode,
    folder_sha256,
    load_base_model,
    load_tokenizer,
)
from engine.train.batches import derive_seed
from engine.train.objectives import Objective

IGNORE = -100
"""Label of padding positions (ignored by the HF loss)."""
TRAINER_STATE = "trainer_state.pt"
"""The file in an HF checkpoint folder that holds what a resume needs besides the weights."""


@dataclass
class HFResumeState:
    """An HF run's ``last`` checkpoint folder, read for a resume (what `Objective.load_resume` returns)."""

    path: Path
    iter_num: int
    best_val_loss: float | None
    optimizer_state: dict[str, Any]
    meta: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None


def read_resume_state(folder: Path) -> HFResumeState:
    """The resume record of an HF checkpoint folder, read without executing code.

    Raises:
        CheckpointError: the folder has no ``crystallab.json`` / ``trainer_state.pt`` (written before resume
            existed, or damaged), or they cannot be read.
    """
    from engine.lab.fsutil import sha256_file

    folder = Path(folder)
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{folder} has no {TRAINER_STATE} (written by a version that could not resume HF runs, "
                              "or damaged); fine-tuning cannot continue from it: start a new run")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{folder} cannot be read for a resume ({str(exc).splitlines()[0][:160]}); the "
                              "checkpoint folder is damaged: start a new run") from None
    return HFResumeState(path=folder, iter_num=int(state["step"]), best_val_loss=state.get("best_val_loss"),
                         optimizer_state=state["optimizer"], meta=meta, extra=state.get("extra") or {},
                         sha256=sha256_file(state_file))


class HFModule(torch.nn.Module):
    """The HF (or peft) model as the trainer sees it: ``forward(x, y) -> loss`` plus the GPT-like helpers."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (B, T) input ids, y: (B, T) labels (HF shifts them itself; IGNORE at padding)
        return self.net(input_ids=x, labels=y).loss

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.Optimizer:
        """AdamW on the trainable parameters; matrices decay, vectors (norms, biases) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=device_type == "cuda")


class HFBatches:
    """Batches of crystal texts in the model's tokenization, from one split of a token dataset."""

    def __init__(self, cifs: list[str], tokenizer: Any, text_format: str, window: int, batch_size: int,
                 seed: int) -> None:
        """
        Args:
            cifs: The split's CIF texts (model view).
            tokenizer: The HF model's tokenizer.
            text_format: ``gruver`` or ``cif``.
            window: Most tokens per text (longer texts are cut).
            batch_size: Texts per batch.
            seed: Run seed; each batch derives its own generator from it and its key.
        """
        if not cifs:
            raise InputError("the dataset split holds no CIF to train on; rebuild the dataset")
        self.cifs, self.tok, self.text_format = cifs, tokenizer, text_format
        self.window, self.batch_size, self.seed = window, batch_size, seed
        self._examples: dict[int, Any] = {}

    def example(self, i: int) -> Any:
        from engine.crystal.gruver import example_from_cif

        if i not in self._examples:
            self._examples[i] = example_from_cif(self.cifs[i])
        return self._examples[i]

    def texts(self, *key: object) -> list[str]:
        """The batch's texts for ``key``: the same key gives the same texts (and translations)."""
        from engine.crystal.gruver import training_text

        rng = np.random.default_rng(derive_seed(self.seed, "hf-batch", *key))
        picks = rng.integers(len(self.cifs), size=self.batch_size)
        if self.text_format == "cif":
            return [self.cifs[int(i)] for i in picks]
        return [training_text(self.example(int(i)), rng) for i in picks]

    def batch(self, *key: object, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and labels, each (batch_size, T) int64 on ``device``; T is the longest text (<= window)."""
        rows = [encode(self.tok, t, eos=True)[: self.window] for t in self.texts(*key)]
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        x = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
        for b, r in enumerate(rows):
            x[b, : len(r)] = torch.tensor(r)
            y[b, : len(r)] = torch.tensor(r)
        return x.to(device), y.to(device)


class HFObjective(Objective):
    """Next-token loss of a Hugging Face causal LM on crystal text, LoRA (peft) or full fine-tuning."""

    name = FAMILY

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tokenizer: Any = None
        self.base: dict[str, Any] = {}
        self.lora: dict[str, Any] | None = None

    def config_problem(self, config: Any) -> str | None:
        if not config.hf_model:
            return "objective hf-causal-lm needs hf_model: the local Hugging Face model folder to fine-tune"
        if config.init_from not in ("scratch", "resume"):
            return (f"objective hf-causal-lm starts from hf_model; init_from must be scratch (a new run) or resume "
                    f"(continue one), not {config.init_from}: a new run from another HF run's checkpoint is not "
                    "supported (a full fine-tune's checkpoint folder is itself a model folder: point hf_model at it)")
        if config.hf_text_format not in TEXT_FORMATS:
            return f"hf_text_format must be one of {', '.join(TEXT_FORMATS)}, got {config.hf_text_format!r}"
        if config.hf_lora_rank < 0:
            return f"hf_lora_rank must be 0 (full fine-tune) or more, got {config.hf_lora_rank}"
        if not 0 <= config.hf_lora_dropout < 1:
            return f"hf_lora_dropout must be in [0, 1), got {config.hf_lora_dropout}"
        return None

    def last_checkpoint(self, ckpt_dir: Path) -> Path:
        return ckpt_dir / "last"

    def load_resume(self, path: Path, mmap: bool = False) -> HFResumeState:
        return read_resume_state(path)

    def build(self, config: Any, ckpt: Any | None, info: Callable[..., None]) -> torch.nn.Module:
        c = config
        if isinstance(ckpt, HFResumeState):
            net = self._resumed(ckpt)
        else:
            folder = check_model_folder(c.hf_model)
            self.tokenizer = load_tokenizer(folder)
            self.base = {"path": str(folder.resolve()), **folder_sha256(folder)}
            device = torch.device("cuda" if c.hf_quantize and torch.cuda.is_available() else "cpu")
            net = load_base_model(folder, device, c.hf_quantize)
            if c.hf_lora_rank > 0:
                net = self._with_lora(net, c)
        net.train()
        folder = Path(self.base["path"])
        module = HFModule(net)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        info("Hugging Face model %s (%s text, %s): %s of %s parameters train", folder, c.hf_text_format,
             f"LoRA rank {c.hf_lora_rank} on {c.hf_lora_targets}" if self.lora else "full fine-tune",
             f"{trainable:,}", f"{module.num_params():,}")
        return module

    def _resumed(self, state: HFResumeState) -> Any:
        """The network of an HF run's ``last`` folder, trainable (LoRA: the adapter on its checked base)."""
        device = torch.device("cuda" if self.config.hf_quantize and torch.cuda.is_available() else "cpu")
        loaded = HFCausalLM._load_run(state.path, device, state.meta, trainable=True)
        self.tokenizer = loaded.tokenizer
        self.base = dict(state.meta.get("base") or {})
        self.lora = state.meta.get("lora") if state.meta.get("adapter") else None
        return loaded.model

    def _with_lora(self, net: Any, c: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        targets: Any = "all-linear" if c.hf_lora_targets.strip() == "all-linear" else [
            t.strip() for t in c.hf_lora_targets.split(",") if t.strip()]
        self.lora = {"rank": c.hf_lora_rank, "alpha": c.hf_lora_alpha, "dropout": c.hf_lora_dropout,
                     "targets": targets}
        lc = LoraConfig(r=c.hf_lora_rank, lora_alpha=c.hf_lora_alpha, lora_dropout=c.hf_lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
        try:
            return get_peft_model(net, lc)
        except ValueError as exc:
            raise ConfigError(f"hf_lora_targets {c.hf_lora_targets!r} name no module of {c.hf_model} "
                              f"({str(exc).splitlines()[0][:160]}); name its linear layers (e.g. q_proj,v_proj) "
                              "or use all-linear") from None

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, step: int, train: bool
             ) -> torch.Tensor:
        return model(x, y)

    def sampler(self, ds: Any, split: str, window: int, batch_size: int, seed: int, starts: Any) -> HFBatches:
        from engine.data.tokens import iter_cifs

        return HFBatches(list(iter_cifs(ds, split)), self.tokenizer, self.config.hf_text_format, window,
                         batch_size, seed)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"family": FAMILY, "text_format": self.config.hf_text_format, "base": self.base,
                "adapter": self.lora is not None, "lora": self.lora, "quantize": self.config.hf_quantize}

    def save(self, ckpt_dir: Path, name: str, *, model: torch.nn.Module, optimizer: Any, step: int,
             best_val_loss: float | None, config: dict[str, Any], meta: dict[str, Any], extra: dict[str, Any]
             ) -> Path:
        """``ckpt_dir/NAME/``: adapter (or model) + tokenizer + ``crystallab.json``, by temporary folder + rename."""
        target = ckpt_dir / name
        tmp = ckpt_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        net = model.net if isinstance(model, HFModule) else model
        net.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "best_val_loss": best_val_loss,
                    "extra": extra}, tmp / TRAINER_STATE)
        record = {**meta, "step": step, "best_val_loss": best_val_loss, "config": config}
        (tmp / META_FILE).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        old = ckpt_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.old.tmp"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return target

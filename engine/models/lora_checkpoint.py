"""LoRA adapter checkpoints of the lab's GPT: loading them on their base, and ``crystallab ckpt merge``.

A LoRA run (`engine.train.lora.LoraObjective`) writes checkpoints in CrystaLLM's layout whose ``model`` holds only
the adapter weights (kilobytes to a few MB) and whose ``crystallab.lora`` records the adapter settings and the base
checkpoint by absolute path and SHA-256 of the file. `build_adapted` loads that base (refusing it when its bytes
changed), crops its context to the adapter run's, applies the adapter through peft and loads its weights: the
result is a `GPT` whose projections carry adapters, sampled unmerged by the ordinary sampler.
`merge_checkpoint` folds the adapters into the weights and writes a plain checkpoint that the lab and upstream
CrystaLLM load like any other.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.lab.errors import CheckpointError, InputError
from engine.models.gpt import GPT, GPTConfig


def base_record(path: str | Path) -> dict[str, str]:
    """How an adapter checkpoint names its base: ``{"path": absolute path, "sha256": of the file}``."""
    from engine.models.checkpoint import checkpoint_sha256

    p = Path(path).resolve()
    return {"path": str(p), "sha256": checkpoint_sha256(p)}


def load_base(adapter: Any) -> Any:
    """The base `Checkpoint` an adapter checkpoint was trained on, after checking the file is the same bytes.

    Raises:
        CheckpointError: the base file is missing, or its SHA-256 differs from the recorded one (one line).
    """
    from engine.models.checkpoint import checkpoint_sha256, load_checkpoint

    record = adapter.meta["lora"]["base"]
    path = Path(record["path"])
    if not path.is_file():
        raise CheckpointError(f"{adapter.path} is a LoRA adapter whose base checkpoint {path} is missing; put the "
                              "base back at that path (or merge the adapter where the base exists)")
    found = checkpoint_sha256(path)
    if found != record["sha256"]:
        raise CheckpointError(f"{adapter.path} is a LoRA adapter for base {path} with sha256 "
                              f"{record['sha256'][:12]}..., but that file now has sha256 {found[:12]}...; restore "
                              "the original base checkpoint")
    return load_checkpoint(path, mmap=True)


def build_adapted(adapter: Any) -> GPT:
    """The GPT an adapter checkpoint describes: its base's weights (context cropped as in training), with the
    adapters applied (peft) and loaded.

    Raises:
        CheckpointError: as `load_base`, or adapter weights that do not fit the base.
    """
    from engine.train.lora import LoraSettings, apply_lora, load_adapter_state

    base = load_base(adapter)
    shape = GPTConfig.from_model_args(adapter.model_args)
    model = GPT(replace(base.model_config, dropout=shape.dropout))
    model.load_state_dict(base.state_dict, strict=True)
    if shape.block_size < model.config.block_size:
        model.crop_block_size(shape.block_size)
    if (model.config.n_layer, model.config.n_embd) != (shape.n_layer, shape.n_embd):
        raise CheckpointError(f"{adapter.path}: its base {base.path} has another shape than the adapter was "
                              "trained on; use the base it names")
    apply_lora(model, LoraSettings.from_dict(adapter.meta["lora"]))
    try:
        load_adapter_state(model, adapter.state_dict, str(adapter.path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return model


def merge_checkpoint(adapter_path: str | Path, out: str | Path) -> Path:
    """Write ``out``: the adapter's base with the adapters merged into its weights, a plain CrystaLLM checkpoint.

    The merged file keeps the adapter run's step, validation loss, config and run name, and names the adapter
    checkpoint (path, sha256, LoRA settings) as its parent. It has no optimizer state (fine-tune from it, do not
    resume it).

    Raises:
        CheckpointError: ``adapter_path`` is not a LoRA adapter checkpoint, or its base cannot be used.
        InputError: ``out`` exists or is the adapter itself.
    """
    from engine.models.checkpoint import load_model, save_checkpoint
    from engine.train.lora import merge_lora

    adapter_path, out = Path(adapter_path), Path(out)
    if out.exists():
        raise InputError(f"--out {out} already exists; choose a new file name (merge never overwrites)")
    model, ckpt = load_model(adapter_path)
    lora = ckpt.meta.get("lora")
    if not lora:
        raise CheckpointError(f"{adapter_path} is not a LoRA adapter checkpoint (it records no crystallab.lora); "
                              "it is already a whole model, nothing to merge")
    merge_lora(model)
    parent = {**base_record(adapter_path), "step": ckpt.iter_num, "lora": lora}
    meta = {"run": ckpt.meta.get("run"), "data_fingerprint": ckpt.meta.get("data_fingerprint"), "parent": parent}
    return save_checkpoint(out, model=model, optimizer=None, iter_num=ckpt.iter_num,
                           best_val_loss=ckpt.best_val_loss, config=ckpt.config, meta=meta)


def _cmd_merge(args: argparse.Namespace) -> int:
    from engine.models.checkpoint import checkpoint_info, cli_checkpoint_path

    path = merge_checkpoint(cli_checkpoint_path(args.adapter), Path(args.out).expanduser())
    info = checkpoint_info(path)
    print(json.dumps({k: info[k] for k in ("path", "sha256", "size_bytes", "step", "n_params", "model_args")},
                     indent=2, default=str))
    return 0


def add_merge_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``crystallab ckpt merge ADAPTER_CKPT --out PATH``."""
    p = sub.add_parser("merge", help="merge a LoRA adapter checkpoint into its base: a plain CrystaLLM checkpoint",
                       description="Fold a LoRA run's adapters into the base weights and write a plain checkpoint "
                       "(CrystaLLM layout) that the lab and upstream CrystaLLM load.")
    p.add_argument("adapter", help="LoRA adapter checkpoint (a LoRA run's ckpt/best.pt or last.pt)")
    p.add_argument("--out", required=True, help="new checkpoint file to write (must not exist)")
    p.set_defaults(func=_cmd_merge)

"""A tiny Hugging Face model folder and a Gruver-text token dataset for the HF family's tests (built once per
session by the test files' fixtures: ``from families.hf_tiny import tiny_model, tiny_dataset``)."""

from __future__ import annotations

from pathlib import Path

TRAIN_ARGS = ["objective=hf-causal-lm", "batch_size=4", "eval_iters=2", "warmup_iters=2", "learning_rate=3e-3",
              "device=cpu", "dtype=float32", "block_size=512", "log_interval=5"]
"""Trainer overrides every HF test run shares (add ``dataset=``, ``hf_model=``, ``max_iters=`` ...)."""


def tiny_model(root: Path) -> Path:
    """A 2-layer, 48-wide Llama and a 400-token BPE tokenizer (digits split) trained on corpus text."""
    from engine.models.hf_tiny import build_tiny_model

    return build_tiny_model(root / "tiny-llama", n_layer=2, n_embd=48, n_head=4, vocab_size=400, n_texts=40)


def tiny_dataset(root: Path, n: int = 30) -> Path:
    """A token dataset of ``n`` built-in corpus structures (10% validation)."""
    from engine.data.corpus import corpus_cifs
    from engine.data.datasets import build_dataset

    cifs = root / "cifs"
    cifs.mkdir(parents=True, exist_ok=True)
    for name, text in corpus_cifs(n, 0):
        (cifs / f"{name}.cif").write_text(text, encoding="utf-8")
    build_dataset([str(cifs)], root / "data", val_fraction=0.1, dedup=False, workers=1)
    return root / "data"

"""A tiny Llama-shaped Hugging Face model and tokenizer built locally, for trying the HF family offline on CPU.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on crystal text (digits split one per token, as
LLaMA's tokenizer does), so numbers are read digit by digit; the model is a randomly initialised `LlamaConfig`.
Tests and ``bench/hf_vs_gpt.py`` use it; a real model (a downloaded LLaMA) goes through the same family.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def corpus_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Gruver-format generation and infill texts of the built-in corpus, for training a tokenizer."""
    import numpy as np

    from engine.crystal.canonical import cell_formula
    from engine.crystal.gruver import Example, training_text
    from engine.data.corpus import generate_structures

    rng = np.random.default_rng(seed)
    return [training_text(Example(s, cell_formula(s.composition), None), rng) for _, s in generate_structures(n, seed)]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> object:
    """A byte-level BPE `PreTrainedTokenizerFast` trained on ``texts``, digits split, with <s> </s> <pad> <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def build_tiny_model(folder: str | os.PathLike, *, n_layer: int = 2, n_embd: int = 48, n_head: int = 4,
                     context: int = 2048, vocab_size: int = 400, n_texts: int = 200, seed: int = 0) -> Path:
    """Write a randomly initialised Llama (``n_layer`` x ``n_embd``) and its tokenizer into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = train_tokenizer(corpus_texts(n_texts, seed), vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=n_embd, intermediate_size=4 * n_embd,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                         max_position_embeddings=context, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

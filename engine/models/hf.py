"""Hugging Face causal LMs as a model family (``hf-causal-lm``): any local folder with a model and its tokenizer.

Two kinds of folder load:

- a model folder as ``save_pretrained`` writes it (``config.json``, weights, tokenizer files), e.g. a LLaMA
  downloaded elsewhere and copied here;
- an HF run checkpoint (``runs/train/RUN/ckpt/best/``) written by `engine.train.hf_objective`: a LoRA adapter
  (peft) or a whole fine-tuned model, and ``crystallab.json`` (family, text format, the base folder's path and
  sha256 of its config and weights, run, step).

The lab never downloads: loading is offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``), and a hub name that
is not a local folder is refused with what to do. Text formats: Gruver's crystal string (``gruver``,
`engine.crystal.gruver`; the default) or CrystaLLM's CIF text (``cif``) through the model's own tokenizer.
Generation goes through HF ``generate`` (batched, KV cache) with the element constraint and per-sample seeds as
logits processors (`engine.sample.hf_logits`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from engine.lab.errors import CheckpointError, InputError
from engine.models.family import FamilyModel, Generation, Knob, SequenceScore, register_family

FAMILY = "hf-causal-lm"
META_FILE = "crystallab.json"
"""Lab provenance inside an HF run checkpoint folder."""
TEXT_FORMATS = ("gruver", "cif")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_name(name: str) -> bool:
    """``owner/name`` as the Hugging Face hub spells models (not a ``.pt`` file path)."""
    return bool(_HUB_NAME.match(name)) and not name.endswith((".pt", ".pth", ".json", ".yaml"))


def offline() -> None:
    """Forbid any download by transformers / huggingface_hub in this process (and the jobs it starts)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def read_run_meta(folder: Path) -> dict[str, Any]:
    """``crystallab.json`` of an HF run checkpoint folder ({} when absent)."""
    f = Path(folder) / META_FILE
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{f} cannot be read ({exc}); the checkpoint folder is damaged: use another") from None
    return meta if isinstance(meta, dict) else {}


def check_model_folder(path: str | os.PathLike) -> Path:
    """``path`` as a local HF model folder with a causal-LM config, weights and a tokenizer.

    Raises:
        CheckpointError: a hub name or missing path (the lab never downloads), a file, a folder without
            ``config.json`` or weights, or without tokenizer files; one line naming the path.
    """
    p = Path(path).expanduser()
    if not p.exists():
        if looks_like_hub_name(str(path)):
            raise CheckpointError(
                f"{path} is not a local folder, and the lab never downloads models: download it where there is "
                f"access (e.g. `huggingface-cli download {path} --local-dir DIR`), copy DIR here and pass that folder")
        raise CheckpointError(f"{p} does not exist; pass a local Hugging Face model folder (config.json, weights, "
                              "tokenizer)")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; a Hugging Face model is a folder (config.json, weights, tokenizer)")
    if not (p / "config.json").is_file() or not any(any(p.glob(g)) for g in _WEIGHT_GLOBS):
        raise CheckpointError(f"{p} is not a Hugging Face model folder (no config.json or no weights); pass the "
                              "folder that save_pretrained wrote or that was downloaded")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{p} has no tokenizer (tokenizer.json / tokenizer.model / tokenizer_config.json); "
                              "copy the model's tokenizer files into the folder")
    return p


def folder_sha256(folder: Path) -> dict[str, str]:
    """sha256 of a model folder's ``config.json`` and of its weight files (in name order, concatenated)."""
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(f for g in _WEIGHT_GLOBS for f in folder.glob(g)):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return {"config_sha256": config, "weights_sha256": h.hexdigest()}


def quantization_config(bits: int | None, device: torch.device) -> Any:
    """A bitsandbytes config for ``bits`` (4 or 8), or None.

    Raises:
        InputError: bits other than 4 / 8, no CUDA device, or bitsandbytes not installed (the reason).
    """
    if bits is None:
        return None
    if bits not in (4, 8):
        raise InputError(f"quantize={bits}: choose 4 or 8 bits, or leave it unset")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise InputError(f"quantize={bits}: {bits}-bit loading needs a CUDA GPU (bitsandbytes) and this runs on "
                         f"{device}; leave quantize unset on CPU")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"quantize={bits}: bitsandbytes is not installed; on the GPU machine run `uv sync --extra "
                         "gpu` (the lockfile pins it), or leave quantize unset")
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, offline, with a pad token (the end-of-text token when it has none)."""
    from transformers import AutoTokenizer

    offline()
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: the tokenizer cannot be loaded ({str(exc).splitlines()[0]}); copy the "
                              "model's tokenizer files into the folder") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(folder: Path, device: torch.device, quantize: int | None = None) -> Any:
    """``AutoModelForCausalLM`` from a checked folder, offline, on ``device`` (4/8-bit when asked and possible)."""
    from transformers import AutoModelForCausalLM

    offline()
    qc = quantization_config(quantize, device)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if qc is not None:
        kwargs.update(quantization_config=qc, device_map={"": device.index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: not a causal language model this transformers can load "
                              f"({str(exc).splitlines()[0]}); pass a folder with an AutoModelForCausalLM") from None
    return model if qc is not None else model.to(device)


def encode(tokenizer: Any, text: str, *, eos: bool = False) -> list[int]:
    """Token ids of ``text``: the beginning-of-text token (when the tokenizer has one), the text, and eos."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + ids + ([tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else [])


@register_family
class HFCausalLM(FamilyModel):
    """A loaded Hugging Face causal LM (a model folder, or a lab HF run with its adapter)."""

    family = FAMILY
    text_format = "gruver"
    knobs = (
        Knob("temperature", 1.0, "float", 0.0, 10.0, "softmax temperature; 0 decodes greedily (Gruver: 0.7 or 1.0)"),
        Knob("top_k", 0, "int", 0, 1_000_000, "keep the k most likely tokens; 0 = off", none_ok=True),
        Knob("top_p", 0.9, "float", 1e-6, 1.0, "nucleus filter: smallest set reaching this mass; 1 = off "
             "(Gruver: 0.9)"),
        Knob("max_new_tokens", 1024, "int", 1, 100_000, "token budget per sample; a longer text is 'truncated'"),
        Knob("constrain", True, "bool", help="only the prompt's elements may be written (Gruver text format)"),
    )

    def __init__(self, model: Any, tokenizer: Any, path: Path, device: torch.device, text_format: str,
                 meta: Mapping[str, Any]) -> None:
        self.model, self.tokenizer, self.path, self._device = model, tokenizer, path, device
        self.text_format = text_format  # type: ignore[misc]  # per model: recorded in its folder
        self.meta = dict(meta)
        self.model.eval()

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """A folder holding an HF model (``config.json``) or an HF run checkpoint (``crystallab.json``); also a
        hub name that is no local path, so that loading it says what to do."""
        p = Path(path)
        if not p.exists():
            return looks_like_hub_name(str(path))
        if not p.is_dir():
            return False
        return read_run_meta(p).get("family") == FAMILY or (p / "config.json").is_file()

    @classmethod
    def load(cls, path: Path, device: Any) -> "HFCausalLM":
        dev = torch.device(device)
        p = Path(path).expanduser()
        meta = read_run_meta(p) if p.is_dir() else {}
        if meta.get("family") == FAMILY:
            return cls._load_run(p, dev, meta)
        folder = check_model_folder(path)
        return cls(load_base_model(folder, dev), load_tokenizer(folder), folder, dev, "gruver", {})

    @classmethod
    def _load_run(cls, p: Path, dev: torch.device, meta: dict[str, Any], trainable: bool = False) -> "HFCausalLM":
        fmt = meta.get("text_format", "gruver")
        if fmt not in TEXT_FORMATS:
            raise CheckpointError(f"{p / META_FILE} names text format {fmt!r}; this lab knows {', '.join(TEXT_FORMATS)}")
        if not meta.get("adapter"):
            folder = check_model_folder(p)
            return cls(load_base_model(folder, dev, meta.get("quantize")), load_tokenizer(folder), p, dev, fmt, meta)
        base = meta.get("base") or {}
        folder = check_model_folder(base.get("path", ""))
        if base.get("weights_sha256") and folder_sha256(folder) != {k: base.get(k) for k in
                                                                    ("config_sha256", "weights_sha256")}:
            raise CheckpointError(f"{p}: its base model {folder} has changed since training (sha256 of config or "
                                  "weights differ); restore that base folder or train again")
        from peft import PeftModel

        model = load_base_model(folder, dev, meta.get("quantize"))
        try:
            model = PeftModel.from_pretrained(model, str(p), is_trainable=trainable)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{p}: the LoRA adapter cannot be loaded ({str(exc).splitlines()[0]})") from None
        tok_src = p if any((p / f).is_file() for f in _TOKENIZER_FILES) else folder
        return cls(model.to(dev), load_tokenizer(tok_src), p, dev, fmt, meta)

    @property
    def device(self) -> torch.device:
        return self._device

    # --- generation ---
    def prompt_text(self, prompt: Any) -> str:
        """The model's prompt for a lab `engine.crystal.prompts.Prompt`, in this model's text format."""
        if self.text_format == "cif":
            return prompt.text
        from engine.crystal.gruver import prompt_for

        return prompt_for(prompt.formula, prompt.spacegroup)

    def sampling_record(self, prompt: Any, knobs: Mapping[str, Any]) -> dict[str, Any]:
        k = {**self.default_knobs(), **knobs}
        k["allowed_elements"] = (prompt.elements or None) if k["constrain"] and self.text_format == "gruver" else None
        k["text_format"] = self.text_format
        k["use_cache"] = True
        return k

    @torch.inference_mode()
    def generate(self, prompt: Any, n: int, knobs: Mapping[str, Any], *, seed: int = 1337,
                 batch_size: int | None = None, progress: Callable[[int, int], None] | None = None,
                 first_index: int = 0) -> list[Generation]:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        from engine.sample.hf_logits import ElementConstraint, SeededSampler

        k = self.sampling_record(prompt, knobs)
        prompt_ids = encode(self.tokenizer, self.prompt_text(prompt))
        batch_size = batch_size or n
        out: list[Generation] = []
        eos = self.tokenizer.eos_token_id
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            procs = LogitsProcessorList()
            if k["allowed_elements"]:
                procs.append(ElementConstraint(self.tokenizer, len(prompt_ids), k["allowed_elements"], eos))
            if k["temperature"] > 0:
                procs.append(TemperatureLogitsWarper(k["temperature"]))
                if k["top_k"]:
                    procs.append(TopKLogitsWarper(k["top_k"]))
                if k["top_p"] < 1.0:
                    procs.append(TopPLogitsWarper(k["top_p"]))
                procs.append(SeededSampler(seed, first_index + start, rows, self._device))
            ids = torch.tensor([prompt_ids] * rows, dtype=torch.long, device=self._device)  # (B, P)
            seqs = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k["max_new_tokens"],
                do_sample=False, logits_processor=procs, use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos, num_beams=1, temperature=None, top_p=None, top_k=None,
            )  # (B, P + new)
            for row in seqs.tolist():
                new = row[len(prompt_ids):]
                finished = eos is not None and eos in new
                if finished:
                    new = new[: new.index(eos) + 1]
                out.append(self._generation(prompt_ids, new, finished))
            if progress:
                progress(len(out), n)
        return out

    def _generation(self, prompt_ids: list[int], new: list[int], finished: bool) -> Generation:
        text = self.tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
        if self.text_format == "gruver" and finished:
            from engine.crystal.gruver import text_to_cif

            try:
                text = text_to_cif(text)
            except InputError:
                pass  # left as the model wrote it: post-processing records why it is not a crystal
        return Generation(prompt_ids + new, text, len(new), finished, None if finished else "max_new_tokens")

    # --- scoring and training ---
    @torch.inference_mode()
    def sequence_log_likelihood(self, texts: Sequence[str]) -> list[SequenceScore]:
        """Sum of next-token log-probabilities of each text (its first token conditions the rest)."""
        out = []
        for text in texts:
            ids = encode(self.tokenizer, text)
            if len(ids) < 2:
                out.append(SequenceScore(0.0, 0))
                continue
            x = torch.tensor([ids], device=self._device)  # (1, T)
            logits = self.model(input_ids=x).logits[0, :-1].float()  # (T - 1, V)
            logp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]  # (T - 1,)
            out.append(SequenceScore(float(logp.sum()), len(ids) - 1))
        return out

    def training_loss(self, batch: Any) -> torch.Tensor:
        """Mean next-token cross-entropy of ``batch = (input_ids, labels)``, (B, T); labels -100 are ignored."""
        x, y = batch
        return self.model(input_ids=x, labels=y).loss

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "family": self.family,
            "text_format": self.text_format,
            "path": str(self.path),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "architecture": (getattr(cfg, "architectures", None) or [type(self.model).__name__])[0],
            "vocab_size": len(self.tokenizer),
            "context": getattr(cfg, "max_position_embeddings", None),
            "adapter": bool(self.meta.get("adapter")),
            "base": self.meta.get("base"),
            "step": self.meta.get("step"),
            "run": self.meta.get("run"),
            "knobs": self.default_knobs(),
        }

"""CIF text <-> structures: the CrystaLLM vocabulary and tokenizer, canonical CIFs, post-processing, prompts, structure analysis."""

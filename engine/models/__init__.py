"""Model families behind one seam, and checkpoints. Today: CrystaLLM's GPT (`gpt.py`)."""

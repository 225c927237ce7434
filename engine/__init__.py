"""crystallab engine: CrystaLLM-compatible data, models, training, sampling and evaluation.

The engine never imports streamlit. Every dashboard action is an engine function and a CLI command.
"""

__version__ = "0.1.0"

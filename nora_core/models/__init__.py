"""Small built-in models for demos and tests (no downloads)."""

from nora_core.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]

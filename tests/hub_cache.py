"""Test helpers: a local HF hub cache holding tiny stand-ins under hub-style names.

The layout is huggingface_hub's (``models--org--name/blobs/<sha256>``, ``snapshots/<rev>/<file>``
as relative symlinks to the blobs, ``refs/main`` holding ``<rev>``), so ``snapshot_download(...,
local_files_only=True)`` and transformers read it exactly as they read a real cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_hf_cache(cache: Path, repo_id: str, folder: Path, revision: str | None = None) -> Path:
    """Copy the files of ``folder`` into ``cache`` as the ``main`` snapshot of ``repo_id``; returns
    the snapshot folder. ``revision`` (40 hex digits) defaults to a hash of the files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for p in files:
        digest.update(p.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(p.read_bytes()).digest())
    rev = revision or digest.hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    shutil.rmtree(snap, ignore_errors=True)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def make_tiny_reward_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random ``LlamaForSequenceClassification`` (one output, hidden 64, 2 layers) saved with
    the tokenizer of ``tokenizer_dir``: a stand-in for a hub reward model (Bradley-Terry judge)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # reward differences large enough to see
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

"""Prompt sets: real files through HF datasets, chat template, evaluation-only files refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlhf.data.prompts import PromptSampler, load_prompt_texts, load_training_prompts


def test_real_prompt_files(shared_data: Path) -> None:
    d = shared_data / "prompts"
    assert len(load_prompt_texts(d / "alpaca-eval-805.json")) == 805
    arena = load_prompt_texts(d / "arena-hard-v0.1.jsonl")
    assert len(arena) == 500 and arena[0].startswith("Use ABC notation")
    mt = load_prompt_texts(d / "mt-bench.jsonl")
    assert len(mt) == 80 and mt[0].startswith("Compose an engaging travel blog post")  # first turn only


def test_training_prompts_templated_and_filtered(shared_data: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = load_training_prompts([str(shared_data / "prompts" / "vicuna-bench.jsonl")], tok, max_prompt_tokens=64)
    assert 0 < len(prompts) <= 80
    assert all(len(p.token_ids) <= 64 for p in prompts)
    text = tok.decode(prompts[0].token_ids)
    assert prompts[0].text in text and text.rstrip().endswith("assistant")  # generation prompt appended
    sampler = PromptSampler(prompts, seed=0)
    epoch = sampler.next(len(prompts))
    assert sorted(p.text for p in epoch) == sorted(p.text for p in prompts)  # no repeats within an epoch


@pytest.mark.parametrize("name", ["mt-bench.jsonl", "self-instruct-user-oriented.jsonl"])
def test_evaluation_only_refused(shared_data: Path, tokenizer_dir: Path, name: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="evaluation-only"):
        load_training_prompts([str(shared_data / "prompts" / name)], tok, max_prompt_tokens=64)

"""RolloutWorker: samples per prompt, token ids/text/log-probs against transformers (fp32),
game mode (one restricted token, log-prob renormalised over the actions), seeds, bad input."""

from __future__ import annotations

import math

import pytest
import torch

PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]
NEW_TOKENS = 6


def chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, tiny_model_dir):
    """A tiny Llama with large random weights (peaked, input-dependent distributions), its
    tokenizer and the fp32 transformers model."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).float().eval()
    out = tmp_path_factory.mktemp("peaked")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok, model


@pytest.fixture(scope="module")
def worker(peaked, cache_dir):
    from nlhf.config import RolloutConfig
    from nlhf.rollout.worker import RolloutWorker

    path, _, _ = peaked
    w = RolloutWorker(str(path), RolloutConfig(max_new_tokens=NEW_TOKENS, max_model_len=128, cpu_kvcache_gb=0.25),
                      pool="current", seed=0, cache_dir=str(cache_dir))
    yield w
    w.shutdown()


def hf_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log pi(y|x) in nats from transformers (fp32), summed over the response tokens."""
    x = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = model(x).logits[0, len(prompt_ids) - 1:-1].log_softmax(-1)
    return float(logp.gather(1, torch.tensor(response_ids)[:, None]).sum())


def test_generate_n_samples_with_transformers_logprobs(worker, peaked):
    _, tok, model = peaked
    ids = [chat_ids(tok, p) for p in PROMPTS]
    worker.stats()
    out = worker.generate(PROMPTS, ids, seeds_for(len(PROMPTS), 3, base=11))
    assert len(out) == len(PROMPTS) and all(len(s) == 3 for s in out)
    n_tokens = 0
    for prompt, pids, samples in zip(PROMPTS, ids, out):
        assert len({tuple(r.response_token_ids) for r in samples}) > 1  # n distinct samples, not copies
        for r in samples:
            assert r.prompt == prompt and r.prompt_token_ids == pids
            assert 1 <= len(r.response_token_ids) <= NEW_TOKENS
            assert r.response_text == tok.decode(r.response_token_ids, skip_special_tokens=True)
            ended_on_eos = r.response_token_ids[-1] == tok.eos_token_id
            assert r.finished == ended_on_eos
            assert r.sampler_logprob < 0
            assert abs(r.sampler_logprob - hf_logprob(model, pids, r.response_token_ids)) < 1e-3
            assert len(r.sampler_token_logprobs) == len(r.response_token_ids)
            assert math.isclose(sum(r.sampler_token_logprobs), r.sampler_logprob, abs_tol=1e-6)
            n_tokens += len(r.response_token_ids)
    st = worker.stats()
    assert st["tokens"] == n_tokens and st["seconds"] > 0 and st["tokens_per_s"] > 0
    assert worker.stats()["tokens"] == 0  # counters reset


def seeds_for(prompts: int, n: int, base: int) -> list[list[int]]:
    return [[base + 100 * i + j for j in range(n)] for i in range(prompts)]


def test_each_sample_is_determined_by_its_own_seed(worker, peaked):
    _, tok, _ = peaked
    ids = [chat_ids(tok, p) for p in PROMPTS]

    def draw(seeds, prompts=PROMPTS, pids=ids, **kw):
        return [[(r.response_token_ids, r.sampler_logprob, r.seed) for r in s]
                for s in worker.generate(prompts, pids, seeds, **kw)]

    a, b, c = draw([[5, 6], [7, 8]]), draw([[5, 6], [7, 8]]), draw([[9, 10], [11, 12]])
    assert a == b
    assert a != c
    assert [[x[2] for x in row] for row in a] == [[5, 6], [7, 8]]
    # the same seed gives the same response whatever else is in the batch and wherever it sits
    alone = draw([[8]], prompts=PROMPTS[1:], pids=ids[1:])
    shuffled = draw([[99, 8, 3]], prompts=PROMPTS[1:], pids=ids[1:])
    assert alone[0][0] == a[1][1] == shuffled[0][1]
    greedy = draw([[1, 2], [3, 4]], greedy=True, max_new_tokens=3)
    assert all(len(s[0][0]) <= 3 and s[0][0] == s[1][0] for s in greedy)


def test_bad_input_raises(worker, peaked):
    _, tok, _ = peaked
    ids = [chat_ids(tok, p) for p in PROMPTS]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        worker.generate(PROMPTS, ids[:1], [[1], [2]])
    with pytest.raises(ValueError, match="seed lists"):
        worker.generate(PROMPTS, ids, [[1]])
    with pytest.raises(ValueError, match=r"seeds\[1\] is empty"):
        worker.generate(PROMPTS, ids, [[1], []])
    with pytest.raises(ValueError, match="empty"):
        worker.generate(["x"], [[]], [[1]])
    with pytest.raises(ValueError, match="max_model_len"):
        worker.generate(["x"], [[1] * 128], [[1]])
    assert worker.generate([], [], []) == []


def test_game_mode_one_restricted_token_with_renormalised_logprob(peaked, cache_dir):
    from nlhf.config import RolloutConfig
    from nlhf.rollout.worker import RolloutWorker

    path, tok, model = peaked
    actions = tok.convert_tokens_to_ids(list("ABCDE"))
    assert len(set(actions)) == 5
    pids = chat_ids(tok, "Choose one letter.")
    with torch.no_grad():
        logits = model(torch.tensor([pids])).logits[0, -1]
    raw = logits.log_softmax(-1)[actions]
    restricted = logits[actions].log_softmax(-1)
    assert float(restricted.exp().max()) < 0.999  # several actions have mass: sampling has something to do
    game = RolloutWorker(str(path), RolloutConfig(max_new_tokens=NEW_TOKENS, max_model_len=128), pool="current",
                         action_token_ids=actions, cache_dir=str(cache_dir))
    try:
        [samples] = game.generate(["Choose one letter."], [pids], seeds_for(1, 64, base=1))
        assert len(samples) == 64
        seen = set()
        for r in samples:
            assert len(r.response_token_ids) == 1 and r.response_token_ids[0] in actions
            k = actions.index(r.response_token_ids[0])
            seen.add(k)
            assert abs(r.sampler_logprob - float(restricted[k])) < 1e-4
            assert r.sampler_logprob > float(raw[k]) + 1.0  # not the raw (full-vocabulary) log-prob
            assert r.finished
        assert len(seen) >= 2
        # empirical frequencies follow the restricted distribution (loose: 64 draws)
        freq = torch.bincount(torch.tensor([actions.index(r.response_token_ids[0]) for r in samples]), minlength=5) / 64
        assert float((freq - restricted.exp()).abs().max()) < 0.25
        [[g]] = game.generate(["Choose one letter."], [pids], [[0]], greedy=True, max_new_tokens=5)
        assert g.response_token_ids == [actions[int(restricted.argmax())]]
        assert math.isclose(g.sampler_logprob, float(restricted.max()), abs_tol=1e-4)
    finally:
        game.shutdown()
    with pytest.raises(ValueError):
        RolloutWorker(str(path), RolloutConfig(), pool="x", action_token_ids=[5, 5])


class _EngineNotBuilt(Exception):
    pass


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_engine_process_retains_freed_memory_before_the_engine_is_built(monkeypatch, peaked, cache_dir, retain):
    """``rollout.retain_freed_memory`` (CPU): the engine's process keeps freed memory
    (nlhf.hardware.retain_freed_memory) before vLLM builds the engine, so each weight push
    re-allocates the weights from pages the process already owns; false leaves glibc's defaults."""
    import vllm

    from nlhf.config import RolloutConfig
    from nlhf.rollout.worker import RolloutWorker

    calls = []
    monkeypatch.setattr("nlhf.hardware.retain_freed_memory", lambda: calls.append("mallopt") or True)

    def engine(**kwargs):
        calls.append("engine")
        raise _EngineNotBuilt

    monkeypatch.setattr(vllm, "LLM", engine)
    cfg = RolloutConfig(max_new_tokens=NEW_TOKENS, max_model_len=128, retain_freed_memory=retain)
    with pytest.raises(_EngineNotBuilt):
        RolloutWorker(str(peaked[0]), cfg, pool="current", cache_dir=str(cache_dir))
    assert calls == (["mallopt", "engine"] if retain else ["engine"])


def test_cpu_kv_cache_is_sized_in_bytes_from_the_config(worker, monkeypatch, peaked, cache_dir):
    """``rollout.cpu_kvcache_gb`` sizes the engine's KV cache to the byte, fractions included (vLLM's
    legacy VLLM_CPU_KVCACHE_SPACE reads whole GiB and would override it: it is cleared)."""
    import os

    import vllm

    from nlhf.config import RolloutConfig
    from nlhf.rollout.worker import RolloutWorker

    cache = worker.llm.llm_engine.vllm_config.cache_config
    assert cache.kv_cache_memory_bytes == 2**28  # the module's engine: cpu_kvcache_gb=0.25

    seen = {}

    def engine(**kwargs):
        seen.update(kwargs, env=os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
        raise _EngineNotBuilt

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    monkeypatch.setattr(vllm, "LLM", engine)
    with pytest.raises(_EngineNotBuilt):
        RolloutWorker(str(peaked[0]), RolloutConfig(max_model_len=128, cpu_kvcache_gb=0.375), pool="current",
                      cache_dir=str(cache_dir))
    assert seen["kv_cache_memory_bytes"] == 3 * 2**27 and seen["env"] is None

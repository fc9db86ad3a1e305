"""After a weight sync, the learner's per-token log-probs of the engine's samples match the
engine's own (fp32 engine and learner: within 1e-3 nats per token; issue 8.5).

In-process: a vLLM rollout worker (tiny random Llama, CPU, fp32) and a LearnerWorker that
takes a Nash-MP iteration, then pushes its weights with ``state_dict_bytes("float32")``."""

from __future__ import annotations

import pytest
import torch

from _learner_util import PREF, batch_for, learner, make_cfg, make_rollouts  # noqa: E402
from nlhf.batch import Rollout, StepBatch  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]
SAMPLES = 2
TOL = 1e-3  # nats per token


def chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def sample(worker, prompts: list[str], ids: list[list[int]], n: int, base_seed: int) -> list[Rollout]:
    """Responses from the engine, flattened prompt-major; sample j of prompt i has seed base + i*n + j."""
    seeds = [[base_seed + i * n + j for j in range(n)] for i in range(len(prompts))]
    return [r for rs in worker.generate(prompts, ids, seeds) for r in rs]


def engine_token_logprobs(worker, rollouts: list[Rollout]) -> list[list[float]]:
    """The engine's per-token log-probs of each response: recorded at sampling time when the
    rollout carries them, else the engine scores prompt + response (``prompt_logprobs``)."""
    from vllm import SamplingParams

    out: list[list[float] | None] = [list(r.sampler_token_logprobs) or None for r in rollouts]
    todo = [i for i, v in enumerate(out) if v is None]
    if todo:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        inputs = [{"prompt_token_ids": rollouts[i].prompt_token_ids + rollouts[i].response_token_ids} for i in todo]
        for i, res in zip(todo, worker.llm.generate(inputs, params, use_tqdm=False)):
            r = rollouts[i]
            p = len(r.prompt_token_ids)
            out[i] = [float(res.prompt_logprobs[p + t][tok].logprob) for t, tok in enumerate(r.response_token_ids)]
    return out  # type: ignore[return-value]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, cache_dir):
    from nlhf.config import RolloutConfig
    from nlhf.rollout.worker import RolloutWorker

    cfg = RolloutConfig(max_new_tokens=12, max_model_len=256, cpu_kvcache_gb=1, temperature=1.0, top_p=1.0)
    worker = RolloutWorker(str(tiny_model_dir), cfg, pool="current", dtype="float32", cache_dir=str(cache_dir))
    yield worker
    worker.shutdown()


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_learner_token_logprobs_match_engine_after_sync(engine, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [chat_ids(tok, p) for p in PROMPTS]
    with learner(make_cfg(algorithm={"inner_steps": 2}), tiny_model_dir) as w:
        train = make_rollouts(tok)
        b = batch_for(w, train, PREF)
        w.half_step(b)
        w.full_step(StepBatch(b.rollouts, PREF[::-1], b.partner))  # theta_1 != the engine's theta_0

        stale = sample(engine, PROMPTS, ids, SAMPLES, base_seed=11)
        assert _max_gap(w.token_logprobs(stale), engine_token_logprobs(engine, stale)) > 10 * TOL  # can fail

        engine.update_weights(w.state_dict_bytes("float32"))
        rollouts = sample(engine, PROMPTS, ids, SAMPLES, base_seed=12)
        assert sum(len(r.response_token_ids) for r in rollouts) > len(rollouts)  # several tokens each
        learner_tok = w.token_logprobs(rollouts)
        engine_tok = engine_token_logprobs(engine, rollouts)
        gap = _max_gap(learner_tok, engine_tok)
        print(f"max per-token |log pi_engine - log pi_learner| after sync: {gap:.2e} nats "
              f"(CPU {torch.backends.cpu.get_cpu_capability()})")
        assert gap <= TOL
        for r, lt in zip(rollouts, learner_tok):  # and the engine's sequence sums
            assert abs(r.sampler_logprob - sum(lt)) <= TOL * len(lt)

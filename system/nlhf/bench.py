"""Benchmarks (``nlhf bench``) and offline evaluation (``nlhf eval``), in one process, no Ray.

Speed targets are checked here, with results written to JSON files, not by timed unit tests.

- ``rollout``: vLLM generation throughput (output tokens/s) of the config's policy on its training prompts.
- ``sync``: one weight sync learner -> engine on the object-store path: the fp32 weights cast to
  the engine dtype and packed as safetensors bytes, then reloaded in the engine (seconds, bytes, MB/s).
- ``judge``: preference queries per second of the config's judge on rollout pairs.
- ``eval``: win rate of one policy against another on held-out prompts under the judge.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from nlhf.config import TrainConfig


def _env_for_vllm(cfg: TrainConfig) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(cfg.cache_dir).resolve() / "vllm"))


def _prompts(cfg: TrainConfig, tokenizer: Any, n: int, held_out: bool = False) -> list:
    from nlhf.data.prompts import load_prompt_texts, load_training_prompts, render_prompts

    if cfg.data is None:
        raise ValueError("nlhf bench/eval need a config with a `data` section (language mode)")
    if held_out:
        if not cfg.data.eval_prompts:
            raise ValueError("data.eval_prompts: required for nlhf eval")
        texts = load_prompt_texts(cfg.data.eval_prompts)
        return render_prompts(texts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt)[:n]
    prompts = load_training_prompts(cfg.data.train_prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.system_prompt)
    rng = np.random.default_rng(cfg.seed)
    return [prompts[i] for i in rng.permutation(len(prompts))[:n]]


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed_generate(worker: Any, prompts: list, seeds: list[list[int]]) -> tuple[int, float]:
    """One ``generate`` call of a :class:`~nlhf.rollout.worker.RolloutWorker`: (output tokens, wall seconds)."""
    t0 = time.perf_counter()
    out = worker.generate([p.text for p in prompts], [p.token_ids for p in prompts], seeds)
    return sum(len(y.response_token_ids) for g in out for y in g), time.perf_counter() - t0


def bench_rollout(cfg: TrainConfig, num_prompts: int = 32, samples: int = 1, repeats: int = 1) -> dict[str, Any]:
    """Output tokens/s of one vLLM engine on ``num_prompts`` training prompts x ``samples`` responses
    (``max_new_tokens`` from config), each response seeded on its own as in training; the median
    of ``repeats`` timed calls after one warm-up call."""
    from transformers import AutoTokenizer

    from nlhf.models import resolve_model
    from nlhf.rollout.worker import RolloutWorker
    from nlhf.seeding import Phase, sample_seeds

    _env_for_vllm(cfg)
    path = resolve_model(cfg.policy, cfg.cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(cfg, tok, num_prompts)
    t0 = time.perf_counter()
    worker = RolloutWorker(path, cfg.rollout, pool="bench", seed=cfg.seed, dtype=cfg.policy.dtype, cache_dir=cfg.cache_dir)
    start_s = time.perf_counter() - t0
    runs = []
    try:
        _timed_generate(worker, prompts, sample_seeds(cfg.seed, Phase.EVAL_OTHER, 99, len(prompts), samples))  # warm-up
        for r in range(repeats):
            runs.append(_timed_generate(worker, prompts, sample_seeds(cfg.seed, Phase.EVAL_OTHER, r, len(prompts), samples)))
    finally:
        worker.shutdown()
    rates = sorted(t / d for t, d in runs)
    return {"benchmark": "rollout", "model": path, "dtype": worker.dtype, "prompts": len(prompts), "samples": samples,
            "max_new_tokens": cfg.rollout.max_new_tokens, "output_tokens": runs[-1][0], "seconds": runs[-1][1],
            "tokens_per_s": rates[len(rates) // 2], "tokens_per_s_all": rates, "engine_start_s": start_s,
            "peak_rss_mb": _peak_rss_mb(), **_machine()}


def replay_requests(cfg: TrainConfig, tokenizer: Any, iterations: range) -> tuple[Any, list[tuple[int, Any, list, list[list[int]]]]]:
    """The rollout requests a run of ``cfg`` makes at ``iterations``, rebuilt from ``cfg.seed``: the
    prompts its sampler draws (every iteration from 0 draws ``prompts_per_iteration``) and the
    per-response seeds of each pool's call: pi_k's responses (``Phase.TRAIN``) and, but for
    online IPO, the opponents' (``Phase.OPPONENT``), in the driver's order.

    Returns:
        ``(sampler, [(k, phase, prompts, seeds)])``: the sampler after ``iterations.stop`` draws
        (its state is the run's ``run_state.json`` ``sampler`` at that iteration) and the calls.

    Raises:
        ValueError: a config without a ``data`` section (game mode).
    """
    from nlhf.data.prompts import training_prompt_sampler
    from nlhf.seeding import Phase, sample_seeds

    if cfg.data is None:
        raise ValueError("the rollout replay needs a config with a `data` section (language mode)")
    sampler = training_prompt_sampler(cfg.data, tokenizer, cfg.seed)
    G, R = cfg.prompts_per_iteration, cfg.responses_per_prompt
    batches = [sampler.next(G) for _ in range(iterations.stop)]
    # online IPO samples pi_k alone; Nash-MP, EGPO and Nash-MD-PG then sample their opponents
    # (pi_{k+1/2}, or Nash-MD-PG's mixture, which the replay samples from the engine's policy)
    phases = [Phase.TRAIN] if cfg.algorithm.name in ("online-ipo", "omd") else [Phase.TRAIN, Phase.OPPONENT]
    return sampler, [(k, ph, batches[k], sample_seeds(cfg.seed, ph, k, G, R)) for k in iterations for ph in phases]


def bench_rollout_replay(cfg: TrainConfig, iterations: range) -> dict[str, Any]:
    """Output tokens/s of one standalone vLLM engine (the same settings, the initial weights) on
    the very requests a run of ``cfg`` made in its rollout phase at ``iterations``
    (:func:`replay_requests`), called in the loop's order after one warm-up call. Responses stop
    at EOS as in the loop, so both rates see the same response lengths (a batch whose responses
    end early generates fewer tokens per engine step).

    Returns:
        ``{"tokens_per_s", "output_tokens", "seconds", "calls", ...}`` (total tokens / total
        ``generate`` wall time).
    """
    from transformers import AutoTokenizer

    from nlhf.models import resolve_model
    from nlhf.rollout.worker import RolloutWorker
    from nlhf.seeding import Phase, sample_seeds

    _env_for_vllm(cfg)
    path = resolve_model(cfg.policy, cfg.cache_dir)
    _, calls = replay_requests(cfg, AutoTokenizer.from_pretrained(path), iterations)
    worker = RolloutWorker(path, cfg.rollout, pool="bench", seed=cfg.seed, dtype=cfg.policy.dtype, cache_dir=cfg.cache_dir)
    tokens, seconds = 0, 0.0
    try:
        first = calls[0][2]
        _timed_generate(worker, first, sample_seeds(cfg.seed, Phase.EVAL_OTHER, 99, len(first), cfg.responses_per_prompt))
        for _, _, prompts, seeds in calls:
            n, dt = _timed_generate(worker, prompts, seeds)
            tokens, seconds = tokens + n, seconds + dt
    finally:
        worker.shutdown()
    return {"benchmark": "rollout-replay", "model": path, "dtype": worker.dtype, "iterations": list(iterations),
            "calls": len(calls), "output_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else float("nan")}


def bench_sync(cfg: TrainConfig, repeats: int = 3) -> dict[str, Any]:
    """Object-store weight sync: pack the full state dict to safetensors bytes, reload it in a running engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from nlhf.models import resolve_model
    from nlhf.rollout.worker import RolloutWorker
    from nlhf.sync.object_store import pack_state_dict

    _env_for_vllm(cfg)
    path = resolve_model(cfg.policy, cfg.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    worker = RolloutWorker(path, cfg.rollout, pool="bench", seed=cfg.seed, dtype=cfg.policy.dtype, cache_dir=cfg.cache_dir)
    engine_dtype = getattr(torch, worker.dtype)
    pack_s, reload_s, nbytes = [], [], 0
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            # what the learner sends: floating tensors in the engine's dtype
            payload = pack_state_dict({k: (v.detach().to(engine_dtype) if v.is_floating_point() else v)
                                       for k, v in model.named_parameters()})  # tied weights once
            pack_s.append(time.perf_counter() - t0)
            nbytes = len(payload)
            t0 = time.perf_counter()
            worker.update_weights(payload)
            reload_s.append(time.perf_counter() - t0)
    finally:
        worker.shutdown()
    total = float(np.median(pack_s) + np.median(reload_s))
    return {"benchmark": "sync", "backend": "object_store", "model": path, "bytes": nbytes,
            "pack_s_median": float(np.median(pack_s)), "reload_s_median": float(np.median(reload_s)),
            "total_s_median": total, "mb_per_s": nbytes / 2**20 / total, "repeats": repeats,
            "peak_rss_mb": _peak_rss_mb(), **_machine()}


def _judge(cfg: TrainConfig) -> Any:
    from nlhf.judge import build_judge

    if cfg.judge.path is None or not Path(cfg.judge.path).exists():
        raise FileNotFoundError(f"judge.path: {cfg.judge.path} does not exist (run `nlhf judge train` first)")
    return build_judge(cfg.judge)


def bench_judge(cfg: TrainConfig, num_pairs: int = 64) -> dict[str, Any]:
    """Preference queries per second of the config's judge on pairs of real prompt/response-like texts."""
    from transformers import AutoTokenizer

    from nlhf.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.policy, cfg.cache_dir))
    prompts = _prompts(cfg, tok, num_pairs)
    texts = [p.text for p in prompts]
    judge = _judge(cfg)
    a = [t[: len(t) // 2] for t in texts]
    b = [t[len(t) // 2:] for t in texts]
    judge.prefer(texts[:2], a[:2], b[:2])  # warm-up
    t0 = time.perf_counter()
    judge.prefer(texts, a, b)
    dt = time.perf_counter() - t0
    return {"benchmark": "judge", "kind": cfg.judge.kind, "path": cfg.judge.path, "pairs": len(texts),
            "seconds": dt, "pairs_per_s": len(texts) / dt, "peak_rss_mb": _peak_rss_mb(), **_machine()}


def evaluate_win_rate(cfg: TrainConfig, policy: str, baseline: str, num_prompts: int = 80,
                      samples: int | None = None) -> dict[str, Any]:
    """Win rate of ``policy`` against ``baseline`` (HF folders) on the held-out prompts under the
    config's judge: ``samples`` responses per prompt and side (default
    ``data.eval_samples_per_prompt``), sample s against sample s, seeds of their own
    (:data:`nlhf.seeding.Phase.EVAL_OTHER`), 95% CI over prompts (:mod:`nlhf.evaluation`)."""
    from transformers import AutoTokenizer

    from nlhf.algorithms.pairing import plan_queries
    from nlhf.evaluation import comparisons, win_rate_report
    from nlhf.rollout.worker import RolloutWorker
    from nlhf.seeding import Phase, sample_seeds

    _env_for_vllm(cfg)
    tok = AutoTokenizer.from_pretrained(policy)
    prompts = _prompts(cfg, tok, num_prompts, held_out=True)
    S = samples or (cfg.data.eval_samples_per_prompt if cfg.data else 2)
    responses = {}
    for side, path in (("policy", policy), ("baseline", baseline)):
        worker = RolloutWorker(path, cfg.rollout, pool=side, seed=cfg.seed, dtype=cfg.policy.dtype, cache_dir=cfg.cache_dir)
        try:
            seeds = sample_seeds(cfg.seed, Phase.EVAL_OTHER, 0 if side == "policy" else 1, len(prompts), S)
            responses[side] = worker.generate([p.text for p in prompts], [p.token_ids for p in prompts], seeds)
        finally:
            worker.shutdown()
    judge = _judge(cfg)
    x, a, b = comparisons(responses["policy"], responses["baseline"])
    plan = plan_queries(x, a, b)
    answers = judge.prefer([x[t] for t in plan.queries], [a[t] for t in plan.queries], [b[t] for t in plan.queries])
    report = win_rate_report(plan.assemble(answers), len(prompts), policy=responses["policy"],
                             baseline=responses["baseline"])
    return {"policy": policy, "baseline": baseline, "judge": cfg.judge.path, **report}

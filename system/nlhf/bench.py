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
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.rollout.cpu_kvcache_gb)))))
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


def bench_rollout(cfg: TrainConfig, num_prompts: int = 32) -> dict[str, Any]:
    """Output tokens/s of one vLLM engine on ``num_prompts`` training prompts (``max_new_tokens`` from config)."""
    from transformers import AutoTokenizer

    from nlhf.models import resolve_model
    from nlhf.rollout.worker import RolloutWorker

    _env_for_vllm(cfg)
    path = resolve_model(cfg.policy, cfg.cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(cfg, tok, num_prompts)
    t0 = time.perf_counter()
    worker = RolloutWorker(path, cfg.rollout, pool="bench", seed=cfg.seed, dtype=cfg.policy.dtype, cache_dir=cfg.cache_dir)
    start_s = time.perf_counter() - t0
    try:
        worker.generate([p.text for p in prompts[:2]], [p.token_ids for p in prompts[:2]], 1)  # warm-up
        t0 = time.perf_counter()
        out = worker.generate([p.text for p in prompts], [p.token_ids for p in prompts], 1, seed=cfg.seed)
        dt = time.perf_counter() - t0
    finally:
        worker.shutdown()
    tokens = sum(len(g[0].response_token_ids) for g in out)
    return {"benchmark": "rollout", "model": path, "dtype": worker.dtype, "prompts": len(prompts),
            "max_new_tokens": cfg.rollout.max_new_tokens, "output_tokens": tokens, "seconds": dt,
            "tokens_per_s": tokens / dt, "engine_start_s": start_s, "peak_rss_mb": _peak_rss_mb(), **_machine()}


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


def evaluate_win_rate(cfg: TrainConfig, policy: str, baseline: str, num_prompts: int = 80) -> dict[str, Any]:
    """Win rate of ``policy`` over ``baseline`` (HF folders) on the held-out prompts under the judge:
    one sampled response each per prompt, P(policy > baseline) averaged over prompts, 95% normal CI.
    The engines run one after the other (one fits on a small machine)."""
    from transformers import AutoTokenizer

    from nlhf.rollout.worker import RolloutWorker

    _env_for_vllm(cfg)
    tok = AutoTokenizer.from_pretrained(policy)
    prompts = _prompts(cfg, tok, num_prompts, held_out=True)
    responses = {}
    for name, path in (("policy", policy), ("baseline", baseline)):
        worker = RolloutWorker(path, cfg.rollout, pool=name, seed=cfg.seed, dtype=cfg.policy.dtype, cache_dir=cfg.cache_dir)
        try:
            responses[name] = worker.generate([p.text for p in prompts], [p.token_ids for p in prompts], 1, seed=cfg.seed)
        finally:
            worker.shutdown()
    judge = _judge(cfg)
    probs = judge.prefer([p.text for p in prompts], [g[0].response_text for g in responses["policy"]],
                         [g[0].response_text for g in responses["baseline"]])
    n = len(probs)
    mean = float(np.mean(probs))
    se = float(np.std(probs, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"policy": policy, "baseline": baseline, "judge": cfg.judge.path, "num_prompts": n, "win_rate": mean,
            "ci95_low": mean - 1.96 * se, "ci95_high": mean + 1.96 * se}

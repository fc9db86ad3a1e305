"""Peak resident memory of one learner rank through whole iterations (issue 11.3).

:func:`measure_learner_rss` runs a world-size-1 :class:`~nlhf.learner.worker.LearnerWorker` in a
fresh ``spawn``-ed process (so the peak is the learner's alone, not the caller's) on a
synthetic batch of ``prompts x responses`` rollouts of ``prompt_tokens + response_tokens``
tokens, and for each iteration runs what the driver runs: ``half_step``, the export to the
extrapolated pool (``state_dict_bytes``), ``full_step``, the export to the current pool
(``step`` and one export for the one-step algorithms). The peak RSS (``VmHWM``) is read after
each phase, resetting it in between (``/proc/self/clear_refs``), so every phase reports its own
peak. Linux only.

``python -m nlhf.learner.memory --policy DIR [--set learner.zero_stage=0 ...]`` prints the JSON.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from typing import Any

from nlhf.config import TrainConfig

GB = 1e9


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _synthetic_batch(cfg: TrainConfig, vocab: int, prompts: int, responses: int, prompt_tokens: int,
                     response_tokens: int, seed: int):
    import torch

    from nlhf.algorithms.pairing import regression_partner
    from nlhf.batch import Rollout, StepBatch

    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for p in range(prompts):
        prompt = torch.randint(10, vocab, (prompt_tokens,), generator=g).tolist()
        for _ in range(responses):
            resp = torch.randint(10, vocab, (response_tokens,), generator=g).tolist()
            rollouts.append(Rollout(f"prompt {p}", prompt, resp, "", 0.0))
    pref = torch.rand(len(rollouts), generator=g).tolist()
    partner = regression_partner(prompts, responses) if responses % 2 == 0 else []
    return StepBatch(rollouts, pref, partner)


def _child(cfg: TrainConfig, policy_path: str, reference_path: str, kw: dict, queue) -> None:
    try:
        queue.put(_measure_here(cfg, policy_path, reference_path, **kw))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _measure_here(cfg: TrainConfig, policy_path: str, reference_path: str, *, prompts: int, responses: int,
                  prompt_tokens: int, response_tokens: int, iterations: int, export_dtype: str) -> dict[str, Any]:
    import socket

    from nlhf.hardware import cpu_capability
    from nlhf.learner.worker import LearnerWorker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    phases: dict[str, float] = {}

    def mark(name: str) -> None:
        phases[name] = max(phases.get(name, 0.0), _status_kb("VmHWM") * 1024 / GB)
        _reset_peak()

    _reset_peak()
    t0 = time.perf_counter()
    w = LearnerWorker(cfg, policy_path, reference_path, master_port=port)
    mark("init")
    init_s = time.perf_counter() - t0
    vocab = w.engine.module.config.vocab_size
    two_step = cfg.algorithm.name in ("nash-mp", "egpo")
    times = []
    try:
        for k in range(iterations):
            batch = _synthetic_batch(cfg, vocab, prompts, responses, prompt_tokens, response_tokens, seed=k)
            t = time.perf_counter()
            if two_step:
                w.half_step(batch)
                mark("half_step")
                w.state_dict_bytes(export_dtype)
                mark("export")
                w.full_step(batch)
                mark("full_step")
            else:
                w.step(batch)
                mark("step")
            w.state_dict_bytes(export_dtype)
            mark("export")
            times.append(time.perf_counter() - t)
    finally:
        w.shutdown()
    lc, alg = cfg.learner, cfg.algorithm
    return {
        "peak_rss_gb": max(phases.values()),
        "phase_peak_rss_gb": phases,
        "snapshot": w.snapshot_mode,
        "reference_dtype": str(w.reference_dtype).removeprefix("torch."),
        "algorithm": alg.name, "estimator": alg.estimator, "inner_steps": alg.inner_steps, "anchor": alg.anchor,
        "zero_stage": lc.zero_stage, "precision": w.cfg.learner.precision, "micro_batch_size": lc.micro_batch_size,
        "gradient_checkpointing": lc.gradient_checkpointing,
        "lora": None if getattr(lc, "lora", None) is None else lc.lora.model_dump(),
        "batch": {"prompts": prompts, "responses": responses, "prompt_tokens": prompt_tokens,
                  "response_tokens": response_tokens},
        "export_dtype": export_dtype, "iterations": iterations, "init_s": init_s, "iteration_s": times,
        "cpu_capability": cpu_capability(), "cpus": os.cpu_count(), "torch_threads": lc.torch_threads,
    }


def measure_learner_rss(cfg: TrainConfig, policy_path: str, reference_path: str | None = None, *, prompts: int = 4,
                        responses: int = 4, prompt_tokens: int = 64, response_tokens: int = 64, iterations: int = 2,
                        export_dtype: str = "float32", timeout_s: float = 3600.0) -> dict[str, Any]:
    """Peak RSS of a learner rank doing ``iterations`` iterations (see module docstring).

    Args:
        cfg: the run's config (``learner``, ``algorithm``; ``learner.snapshot`` when present).
        policy_path, reference_path: HF folders (reference defaults to the policy).
        prompts, responses, prompt_tokens, response_tokens: the synthetic batch's shape.
        iterations: iterations measured (the peak is over all of them).
        export_dtype: the engines' dtype the weights are exported in.
        timeout_s: give up after this long.

    Returns:
        ``peak_rss_gb`` (GB = 1e9 bytes), ``phase_peak_rss_gb`` per phase (``init``,
        ``half_step``, ``export``, ``full_step`` or ``step``), the settings measured, wall times,
        and ``cpu_capability``.

    Raises:
        RuntimeError: the measurement failed (the child's error) or timed out.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    kw = {"prompts": prompts, "responses": responses, "prompt_tokens": prompt_tokens,
          "response_tokens": response_tokens, "iterations": iterations, "export_dtype": export_dtype}
    proc = ctx.Process(target=_child, args=(cfg, str(policy_path), str(reference_path or policy_path), kw, queue))
    proc.start()
    try:
        out = queue.get(timeout=timeout_s)
    except Exception as e:
        raise RuntimeError(f"learner RSS measurement got no result in {timeout_s:.0f} s") from e
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if "error" in out:
        raise RuntimeError(f"learner RSS measurement failed: {out['error']}")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: measure and print the JSON (``--set key=value`` overrides the default TrainConfig)."""
    import argparse

    from nlhf.config import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="HF folder of the policy (and reference)")
    ap.add_argument("--config", default=None, help="TrainConfig YAML (default: built-in defaults)")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. learner.zero_stage=0")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="response tokens (prompt tokens too)")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--export-dtype", default="float32")
    args = ap.parse_args(argv)
    base = ["data.train_prompts=[unused.jsonl]", "judge.path=unused"] if args.config is None else []
    cfg = load_model(TrainConfig, args.config, base + args.set)
    res = measure_learner_rss(cfg, args.policy, prompts=args.prompts, responses=args.responses,
                              prompt_tokens=args.tokens, response_tokens=args.tokens, iterations=args.iterations,
                              export_dtype=args.export_dtype)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""``nlhf bench train``: steady-state speed and memory of a real training run.

Runs ``nlhf train`` on the config for ``iterations`` iterations (no held-out evaluation, no
per-iteration win probability, no intermediate checkpoints) in a temporary run folder, drops
the first ``warmup`` iterations, and reports, in the fields the peer benchmark
(``benchmarks/peers/trl_nashmd``) writes too:

- seconds per training comparison: seconds per iteration / training queries per iteration
  (distinct judged pairs that feed a loss, as ``charts/queries`` counts them);
- seconds per iteration, split by phase (driver wall time of rollout, judge, learn, sync);
- Ray overhead: iteration wall time minus the actors' own busy time in each phase (vLLM
  ``generate``, the judge replicas' compute, the learner's steps, weight export + engine reload);
- rollout tokens/s inside the loop (tokens / rollout-phase wall time) against a standalone
  engine with the same settings replaying the measured iterations' requests (same prompts and
  seeds, so the same response lengths; :func:`nlhf.bench.bench_rollout_replay`), and the older
  standalone figure on the first prompts (:func:`nlhf.bench.bench_rollout`);
- weight-sync seconds and bytes per iteration;
- peak RSS of the driver and of every actor, and for the learner ranks and rollout workers its
  private part (the process's own pages) and shared part (pages of Ray's object store holding
  the weight payloads, counted again in each process that touched them;
  :mod:`nlhf.telemetry.memory`).

Every figure comes with the CPU capability of the machine it was measured on.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from nlhf.config import TrainConfig

PHASES = ("rollout", "judge", "learn", "sync")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _deltas(ms: list[dict], key: str) -> list[float]:
    """Per-iteration increments of a running total ``key``."""
    vals = [0.0] + [float(m.get(key) or 0.0) for m in ms]
    return [b - a for a, b in zip(vals[:-1], vals[1:])]


def summarise(ms: list[dict], warmup: int) -> dict[str, Any]:
    """Steady-state figures from a run's metrics records (one per iteration).

    Raises:
        ValueError: fewer than ``warmup + 1`` iterations.
    """
    if len(ms) <= warmup:
        raise ValueError(f"bench train: {len(ms)} iterations recorded, need more than the {warmup} warm-up ones")
    queries = _deltas(ms, "charts/queries")[warmup:]
    sync_bytes = _deltas(ms, "sync/bytes")[warmup:]
    steady = ms[warmup:]
    it = [float(m["time/iteration"]) for m in steady]
    phases = {p: _median([float(m.get(f"time/{p}", 0.0)) for m in steady]) for p in PHASES}
    busy = {p: _median([float(m.get(f"busy/{p}", 0.0)) for m in steady]) for p in PHASES}
    overhead = [float(m["time/iteration"]) - sum(float(m.get(f"busy/{p}", 0.0)) for p in PHASES) for m in steady]
    tokens = [float(m.get("rollout/tokens", 0.0)) for m in steady]
    rollout_wall = [float(m.get("time/rollout", 0.0)) for m in steady]
    q = _median(queries)
    return {
        "warmup_steps": warmup,
        "steps_measured": len(steady),
        "training_comparisons_per_step": q,
        "seconds_per_step": {"median": _median(it), "mean": float(statistics.mean(it)), "all": it},
        "seconds_per_training_comparison": _median(it) / q if q else float("nan"),
        "phases": phases,
        "busy_seconds": busy,
        "ray_overhead_seconds": _median(overhead),
        "ray_overhead_fraction": _median(overhead) / _median(it),
        "sync_fraction": phases["sync"] / _median(it),
        "sync_bytes_per_step": _median(sync_bytes),
        "rollout_tokens_per_s_in_loop": sum(tokens) / sum(rollout_wall) if sum(rollout_wall) else float("nan"),
    }


def bench_train(cfg: TrainConfig, iterations: int = 4, warmup: int = 1, standalone: bool = True) -> dict[str, Any]:
    """Run ``cfg`` for ``iterations`` iterations and return the benchmark record (see module doc).

    Raises:
        ValueError: ``iterations <= warmup``.
    """
    from nlhf.bench import bench_rollout, bench_rollout_replay
    from nlhf.driver import train
    from nlhf.hardware import describe
    from nlhf.telemetry.metrics import read_metrics

    if iterations <= warmup:
        raise ValueError(f"--iterations ({iterations}) must exceed the warm-up iterations ({warmup})")
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=cfg.cache_dir) as tmp:
        run = cfg.model_copy(deep=True)
        run.iterations, run.save_every, run.win_rate_every, run.resume = iterations, 0, 0, False
        run.output_dir, run.progress = str(Path(tmp) / "run"), "plain"
        if run.data is not None:
            run.data.eval_prompts = None
        summary = train(run)
        ms = read_metrics(run.output_dir)
    record: dict[str, Any] = {
        "tool": "nlhf",
        "tool_version": _version(),
        "config": {"algorithm": cfg.algorithm.name, "inner_steps": cfg.algorithm.inner_steps,
                   "prompts_per_iteration": cfg.prompts_per_iteration, "responses_per_prompt": cfg.responses_per_prompt,
                   "zero_stage": cfg.learner.zero_stage, "learner_precision": summary.get("learner_precision", cfg.learner.precision)},
        "model": summary["policy"],
        "dtype": summary["engine_dtype"],
        "batch_prompts": cfg.prompts_per_iteration,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "gradient_checkpointing": cfg.learner.gradient_checkpointing,
        "torch_threads": cfg.learner.torch_threads or max(1, int(cfg.learner.num_cpus)),
        **summarise(ms, warmup),
        "peak_rss_gb": summary["peak_rss_gb"],
        "peak_rss_total_gb": round(sum(summary["peak_rss_gb"].values()), 3),
        "peak_private_gb": summary.get("peak_private_gb", {}),
        "peak_shared_gb": summary.get("peak_shared_gb", {}),
        "wall_seconds": summary["wall_seconds"],
        "machine": describe(),
    }
    record["cpu_capability"] = record["machine"]["cpu_capability"]
    record["cpu_model"] = record["machine"].get("cpu_model", "")
    if standalone and cfg.data is not None:
        # the same requests (prompts, seeds, order) as the measured iterations, in an engine alone
        alone = bench_rollout_replay(cfg, range(warmup, iterations))
        record["rollout_tokens_per_s_standalone"] = alone["tokens_per_s"]
        record["rollout_in_loop_vs_standalone"] = record["rollout_tokens_per_s_in_loop"] / alone["tokens_per_s"]
        # the earlier standalone figure: the first prompts_per_iteration prompts, 3 repeats
        fixed = bench_rollout(cfg, num_prompts=cfg.prompts_per_iteration, samples=cfg.responses_per_prompt, repeats=3)
        record["rollout_tokens_per_s_standalone_fixed_prompts"] = fixed["tokens_per_s"]
    return record


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nlhf")
    except PackageNotFoundError:
        return "unknown"

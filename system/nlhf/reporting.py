"""Everything the driver does around the algorithm: per-iteration metrics, checkpoints,
held-out evaluation, the run summary, and what happens when a learner dies.

Metric names (CleanRL-style groups): ``charts/`` (queries, eval_queries, win_prob, kl_ref,
kl_anchor, response_len, identical_fraction), ``losses/`` (half_step, full_step), ``learner/``
(grad_norm, clip_frac, ratio_min/mean/max, pg_weight_std per step), ``rollout/logprob_gap``,
``perf/`` (tokens/s per pool), ``time/`` (seconds per phase), ``sync/``, ``judge/``, ``faults/``.
``charts/queries`` counts *training* queries: distinct judged pairs that feed a loss.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from nlhf.evaluation import comparisons, win_rate_report
from nlhf.hardware import describe as describe_hardware
from nlhf.seeding import Phase

if TYPE_CHECKING:
    from nlhf.batch import Rollout
    from nlhf.driver import Iteration
    from nlhf.session import Session

LEARNER_KEYS = ("grad_norm", "clip_frac", "ratio_min", "ratio_mean", "ratio_max", "pg_weight_std")


class LearnerDied(RuntimeError):
    """A learner actor died; the message names it and the command that resumes the run."""


def _nan() -> float:
    return float("nan")


# ----------------------------------------------------------------------------- evaluation
def evaluate_initial_policy(s: "Session") -> None:
    """Language mode: ``eval_samples_per_prompt`` responses of the initial policy per held-out
    prompt (seeds of their own), kept in the run state for the final win rate."""
    if not s.eval_prompts or s.state.eval_initial:
        return
    s.progress.phase("eval (initial policy)")
    S = s.cfg.data.eval_samples_per_prompt if s.cfg.data else 1
    s.state.eval_initial = s.current.generate(s.eval_prompts, s.seeds(0, Phase.EVAL_INITIAL, len(s.eval_prompts), S))


def final_win_rate(s: "Session") -> dict[str, Any] | None:
    """Win rate of the final policy against the initial one on the held-out prompts under the
    judge (sample s against sample s, seeds disjoint from training), with a 95% CI over prompts,
    mean response lengths, identical fraction, and the exact KL(pi_final || pi_ref) on the final
    responses."""
    if not s.state.eval_initial:
        return None
    s.progress.phase("eval (final policy)")
    S = len(s.state.eval_initial[0])
    final = s.current.generate(s.eval_prompts, s.seeds(0, Phase.EVAL_FINAL, len(s.eval_prompts), S))
    x, a, b = comparisons(final, s.state.eval_initial)
    probs, _ = s.judge.compare(x, a, b, training=False)
    report = win_rate_report(probs, len(s.eval_prompts), policy=final, baseline=s.state.eval_initial)
    report.update(final_kl_to_reference(s, final))
    report["final_mean_len"] = report.pop("policy_mean_len")
    report["initial_mean_len"] = report.pop("baseline_mean_len")
    return report


def final_kl_to_reference(s: "Session", final: list[list[Rollout]]) -> dict[str, float | int]:
    """Exact KL(pi_final || pi_ref) (nats per response: the per-token KL over the vocabulary,
    summed over the response) on the first ``data.eval_kl_samples_per_prompt`` of each prompt's
    final responses ``final`` (prompts x samples): ``kl_final_to_reference`` (mean),
    ``kl_final_to_reference_se`` (standard error over the responses) and ``kl_samples``."""
    n = s.cfg.data.eval_kl_samples_per_prompt if s.cfg.data else 1
    chosen = [y for g in final for y in g[:n]]
    kl = np.asarray(s.learners.kl_to_reference(chosen), dtype=np.float64)
    se = float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else float("nan")
    return {"kl_final_to_reference": float(kl.mean()), "kl_final_to_reference_se": se, "kl_samples": len(kl)}


def win_probability(s: "Session", k: int, it: "Iteration") -> float:
    """P(pi_{k+1} > pi_k) under the judge: one fresh response of pi_{k+1} per prompt against
    pi_k's first response to it, averaged over the iteration's prompts (evaluation queries)."""
    new = s.current.generate(it.prompts, s.seeds(k, Phase.WIN_PROB, len(it.prompts), 1))
    x, a, b = comparisons([g[:1] for g in new], [g[:1] for g in it.responses])
    probs, _ = s.judge.compare(x, a, b, training=False)
    return float(np.mean(probs))


# ----------------------------------------------------------------------------- per iteration
def iteration_metrics(s: "Session", k: int, it: "Iteration", win: float | None) -> dict[str, float]:
    """The metrics of iteration k (one metrics.jsonl line)."""
    c = s.state.counters
    half, full = it.half, it.full
    lengths = [len(y.response_token_ids) for g in it.responses for y in g]
    cur, ext = s.current.stats(), s.extrapolated.stats()
    learner_stats = s.learners.stats()
    judge_stats = s.judge.service_stats()
    judge_busy = float(judge_stats.get("busy_s", 0.0))
    reload = c.sync_reload_seconds
    busy = {  # actor-side busy seconds of this iteration, per phase (the rest of each phase is overhead)
        "busy/rollout": cur["seconds"] + ext["seconds"],
        "busy/learn": float(half.get("step_time_s", 0.0)) + float(full.get("step_time_s", 0.0)),
        "busy/judge": judge_busy - s.last_busy.get("judge", 0.0),
        "busy/sync": reload - s.last_busy.get("reload", 0.0) + float(learner_stats[0].get("export_seconds", 0.0)),
    }
    s.last_busy.update(judge=judge_busy, reload=reload)
    s.peak_rss_gb.update({f"learner_rank{st['rank']}": st["peak_rss_gb"] for st in learner_stats})
    if "replica_peak_rss_gb" in judge_stats:
        s.peak_rss_gb["judge_replica"] = max(s.peak_rss_gb.get("judge_replica", 0.0), judge_stats["replica_peak_rss_gb"])
    m: dict[str, float] = {
        **busy,
        "charts/queries": float(c.queries),
        "charts/eval_queries": float(c.eval_queries),
        "charts/kl_ref": float(full.get("kl_ref", half.get("kl_ref", _nan()))),
        "charts/kl_anchor": float(full.get("kl_anchor", _nan())),
        "charts/response_len": float(np.mean(lengths)) if lengths else _nan(),
        "charts/identical_fraction": it.identical / it.comparisons if it.comparisons else _nan(),
        "losses/half_step": float(half.get("loss", _nan())),
        "losses/full_step": float(full.get("loss", _nan())),
        "rollout/logprob_gap": float(half.get("logprob_gap", full.get("logprob_gap", _nan()))),
        "rollout/tokens": float(cur["tokens"] + ext["tokens"]),
        "perf/tokens_per_s_current": cur["tokens_per_s"],
        "perf/tokens_per_s_extrapolated": ext["tokens_per_s"],
        "sync/bytes": float(c.sync_bytes),
        "sync/seconds": float(c.sync_seconds),
        "judge/requests": float(c.judge_requests),
        "judge/latency_s": s.judge.take_latency(),
        "faults/rollout_restarts": float(c.rollout_restarts),
        "faults/judge_retries": float(c.judge_retries),
        "faults/learner_restarts": float(c.learner_restarts),
        "time/iteration": float(sum(it.times.values())),
        **{f"time/{phase}": float(v) for phase, v in it.times.items()},
    }
    for step, metrics in (("half", half), ("full", full)):
        for key in LEARNER_KEYS:
            if key in metrics:
                m[f"learner/{step}_{key}"] = float(metrics[key])
    if "kl_anchor" in half:
        m["charts/kl_anchor_half"] = float(half["kl_anchor"])
    if win is not None:
        m["charts/win_prob"] = win
    if s.game is not None:
        from nlhf.algorithms.equilibrium import kl

        pi = s.action_distribution("policy")
        m["game/kl_to_nash"] = float(kl(s.game["pi_star"], pi))
    return m


def end_iteration(s: "Session", k: int, it: "Iteration") -> None:
    """Win probability (when due), metrics, then the iteration counts as done; checkpoint when due."""
    cfg = s.cfg
    every = cfg.win_rate_every
    win = win_probability(s, k, it) if every and ((k + 1) % every == 0 or k + 1 == cfg.iterations) else None
    m = iteration_metrics(s, k, it, win)
    s.logger.log(k + 1, m)
    s.progress.update(k + 1, m)
    s.state.history.append(m)
    s.state.iteration = k + 1
    if cfg.save_every and (k + 1) % cfg.save_every == 0 and k + 1 < cfg.iterations:
        s.progress.phase("checkpoint")
        s.save_checkpoint(f"iter_{k + 1:05d}")


# ----------------------------------------------------------------------------- learner faults
@contextmanager
def learner_faults(s: "Session") -> Iterator[None]:
    """Turn a learner actor's death into a restart from the last complete checkpoint (while
    ``fault_tolerance.learner_restarts`` lasts) or into :class:`LearnerDied` naming the actor
    and the resume command. Other errors pass through."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        rank = s.learners.dead_rank(e) if s.learners is not None else None
        if rank is None:
            raise
        c = s.state.counters
        if c.learner_restarts < s.cfg.fault_tolerance.learner_restarts and s.last_checkpoint is not None:
            restarts = c.learner_restarts + 1
            s.note(f"learner rank {rank} died ({type(e).__name__}); restarting the learner group from "
                   f"{s.last_checkpoint.path} (restart {restarts}/{s.cfg.fault_tolerance.learner_restarts})")
            s.recover_learners()
            s.state.counters.learner_restarts = restarts
            return
        raise LearnerDied(f"learner rank {rank} died during iteration {s.state.iteration + 1} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {s.resume_hint()}") from None


# ----------------------------------------------------------------------------- the end
def finish(s: "Session") -> dict[str, Any]:
    """Final checkpoint, evaluation and ``summary.json``."""
    cfg = s.cfg
    s.progress.phase("checkpoint")
    ckpt = s.save_checkpoint("final")
    hist = s.state.history
    c = s.state.counters
    summary: dict[str, Any] = {
        "run_name": cfg.run_name,
        "run_id": s.state.run_id,
        "iterations": cfg.iterations,
        "algorithm": cfg.algorithm.model_dump(),
        "policy": s.policy_path,
        "engine_dtype": s.current.dtype,
        "learner_precision": s.learners.precision,
        "cluster": s.cluster,
        "hardware": describe_hardware(),  # the driver's machine: every figure is read with its CPU capability
        "checkpoint": str(ckpt.path),
        "resumed_from": str(s.resumed_from.path) if s.resumed_from else None,
        "preference_queries": c.queries,
        "training_comparisons": c.comparisons,
        "identical_pair_fraction": c.identical / c.comparisons if c.comparisons else None,
        "faults": {"rollout_restarts": c.rollout_restarts, "judge_retries": c.judge_retries,
                   "learner_restarts": c.learner_restarts},
        "final_metrics": hist[-1] if hist else {},
    }
    for key in ("rollout", "judge", "learn", "sync", "iteration"):
        vals = [h.get(f"time/{key}", 0.0) for h in hist]
        summary[f"mean_seconds_{key}"] = float(np.mean(vals)) if vals else 0.0
    for pool in ("current", "extrapolated"):
        vals = [h[f"perf/tokens_per_s_{pool}"] for h in hist if h.get(f"perf/tokens_per_s_{pool}")]
        summary[f"mean_tokens_per_s_{pool}"] = float(np.mean(vals)) if vals else 0.0
    wins = [h["charts/win_prob"] for h in hist if h.get("charts/win_prob") is not None]
    summary["mean_win_prob_vs_previous"] = float(np.mean(wins)) if wins else None
    summary["win_rate_vs_initial"] = final_win_rate(s)
    summary["eval_queries"] = c.eval_queries
    summary["sampling_seeds"] = s.state.seed_report()
    if s.game is not None:
        summary["game"] = game_summary(s)
    summary.update(peak_memory(s))
    summary["wall_seconds"] = time.time() - s.t_start
    (s.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    s.progress.phase("done")
    return summary


def peak_memory(s: "Session") -> dict[str, dict[str, float]]:
    """Peak memory (GiB) from one round of actor stats: ``peak_rss_gb`` of the driver and of
    every actor (learner ranks, rollout workers, a judge replica), and ``peak_private_gb`` /
    ``peak_shared_gb`` of every learner rank and rollout worker (sampled: private = the process's
    own pages, RssAnon; shared = pages of Ray's object store it mapped, RssShmem, i.e. the weight
    payloads, counted again in every process that touched them; :mod:`nlhf.telemetry.memory`)."""
    import resource

    rss = {"driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, **s.peak_rss_gb}
    private: dict[str, float] = {}
    shared: dict[str, float] = {}
    parts = [(f"learner_rank{st['rank']}", st) for st in s.learners.stats()]
    for name, pool in (("current", s.current), ("extrapolated", s.extrapolated)):
        if pool.slot != 1:  # shared engines are listed once, under the pool that owns them
            parts += [(f"rollout_{name}_{i}", info) for i, info in enumerate(pool.infos())]
    for key, st in parts:
        rss[key] = max(rss.get(key, 0.0), st["peak_rss_gb"])
        if "peak_private_gb" in st:
            private[key], shared[key] = st["peak_private_gb"], st["peak_shared_gb"]
    return {name: {k: round(v, 3) for k, v in d.items()}
            for name, d in (("peak_rss_gb", rss), ("peak_private_gb", private), ("peak_shared_gb", shared))}


def game_summary(s: "Session") -> dict[str, Any]:
    """Game mode: initial/final action distributions, pi*, KL(pi* || pi), exploitability."""
    from nlhf.algorithms.equilibrium import exploitability, kl

    assert s.game is not None
    P, ref, star = s.game["P"], s.game["pi_ref"], s.game["pi_star"]
    final = s.action_distribution("policy")
    return {
        "actions": s.game["actions"],
        "initial_distribution": ref.tolist(),
        "final_distribution": final.tolist(),
        "nash": star.tolist(),
        "kl_to_nash_initial": float(kl(star, ref)),
        "kl_to_nash": float(kl(star, final)),
        "exploitability": float(exploitability(final, P, ref, s.cfg.algorithm.beta)),
        "win_rate_vs_initial_exact": float(final @ P @ ref),
    }

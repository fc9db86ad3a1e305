"""The Nash Mirror Prox iteration as a Ray application (``nlhf train``).

One iteration k (``../shared/docs/nash-mp.md``, "Stochastic Nash-MP for language models"):

    prompts x                    -> current pool (pi_k)            -> responses y, y'
    judge P(y > y' | x)          -> learner half-step from theta_k -> theta_{k+1/2} -> extrapolated pool
    extrapolated pool            -> opponent responses y''
    judge P(y > y'' | x)         -> learner full step from theta_k -> theta_{k+1}   -> current pool

Everything about where processes run, how weights travel and how calls are counted lives in
:mod:`nlhf.pipeline` and :mod:`nlhf.session`; this file is the algorithm.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from nlhf.batch import StepBatch
from nlhf.config import TrainConfig
from nlhf.session import Session, opponent_pairs


@contextmanager
def timed(times: dict[str, float], phase: str, session: Session) -> Iterator[None]:
    """Add the wall time of the block to ``times[phase]`` and show the phase in the progress display."""
    session.progress.phase(phase)
    t0 = time.perf_counter()
    yield
    times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg.iterations`` Nash-MP iterations; return the run summary (also in ``summary.json``)."""
    with Session.start(cfg) as s:
        s.evaluate_initial_policy()
        for k in range(cfg.iterations):
            t: dict[str, float] = {}
            R = cfg.responses_per_prompt

            # 1. rollouts y_1..y_R ~ pi_k from the current pool
            with timed(t, "rollout", s):
                prompts = s.prompts.next(cfg.prompts_per_iteration)
                ys = s.current.generate(prompts, n=R, seed=s.seed(k, 0))
            y, pair = s.flatten(ys)

            # 2. half-step: opponent = another response of pi_k to the same prompt
            with timed(t, "judge", s):
                p_half = s.judge_pairs(prompts, ys, ys, shift=1)
            if cfg.algorithm.name == "online-ipo":  # baseline: online mirror descent keeps the half-step
                with timed(t, "learn", s):
                    half = full = s.learners.omd_step(StepBatch(y, p_half, pair))
            else:
                with timed(t, "learn", s):
                    half = s.learners.half_step(StepBatch(y, p_half, pair))

                # 3. theta_{k+1/2} -> extrapolated pool; opponent responses y'' ~ pi_{k+1/2}
                with timed(t, "sync", s):
                    s.sync.push("extrapolated")
                with timed(t, "rollout", s):
                    y_opp = s.extrapolated.generate(prompts, n=R, seed=s.seed(k, 1))
                with timed(t, "judge", s):
                    p_full = s.judge_pairs(prompts, ys, y_opp, shift=0)

                # 4. full step: restore theta_k, step against pi_{k+1/2} -> theta_{k+1}
                with timed(t, "learn", s):
                    full = s.learners.full_step(StepBatch(y, p_full, pair))

            # 5. theta_{k+1} -> current pool
            with timed(t, "sync", s):
                s.sync.push("current")

            # plumbing: how much did pi_{k+1} beat pi_k, metrics, checkpoints
            win = s.win_probability(k, prompts, ys) if s.should_measure_win(k) else None
            s.log(k, half, full, win, ys, t)
            if cfg.save_every and (k + 1) % cfg.save_every == 0:
                s.save_checkpoint(f"iter_{k + 1:05d}")
        return s.finish()


__all__ = ["opponent_pairs", "train"]

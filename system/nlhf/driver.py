"""The iteration of each algorithm, as a Ray application (``nlhf train``).

Nash Mirror Prox, iteration k (``../shared/docs/nash-mp.md``; Tiapkin et al., arXiv:2505.19731):

    prompts x                    -> current pool (pi_k)            -> responses y
    judge P(y > y' | x), y' ~ pi_k   -> learner half-step from theta_k -> theta_{k+1/2} -> extrapolated pool
    extrapolated pool            -> opponents y'' ~ pi_{k+1/2}
    judge P(y > y'' | x)         -> learner full step from theta_k -> theta_{k+1}   -> current pool

and, in the same engine, the baselines online IPO, EGPO and Nash-MD-PG. Who is judged against
whom is :mod:`nlhf.algorithms.pairing`; where processes run, how weights travel and how calls
are counted and retried lives in :mod:`nlhf.session` and :mod:`nlhf.pipeline`; metrics,
evaluation and the summary in :mod:`nlhf.reporting`. This file is the algorithm.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from nlhf import interrupts
from nlhf.algorithms import pairing
from nlhf.algorithms.pairing import Pairing
from nlhf.batch import Rollout, StepBatch
from nlhf.config import TrainConfig
from nlhf.data.prompts import Prompt
from nlhf.seeding import Phase
from nlhf.interrupts import Interrupted  # noqa: F401  (re-exported: nlhf.driver.Interrupted)
from nlhf.session import Session


@dataclass
class Iteration:
    """What one iteration produced, for metrics: its prompts, pi_k's responses y (``[prompt][sample]``),
    the learner metrics of each step, comparisons made, identical pairs among them, seconds per phase."""

    prompts: list[Prompt] = field(default_factory=list)
    responses: list[list[Rollout]] = field(default_factory=list)
    half: dict[str, float] = field(default_factory=dict)
    full: dict[str, float] = field(default_factory=dict)
    comparisons: int = 0
    identical: int = 0
    times: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(it: Iteration, phase: str, s: Session) -> Iterator[None]:
    """Add the wall time of the block to ``it.times[phase]`` and show the phase in the progress display."""
    s.progress.phase(phase)
    t0 = time.perf_counter()
    yield
    it.times[phase] = it.times.get(phase, 0.0) + time.perf_counter() - t0


def flat(groups: list[list[Rollout]]) -> list[Rollout]:
    """Prompt-major flat list of ``groups[prompt][sample]``."""
    return [y for g in groups for y in g]


def judge(s: Session, it: Iteration, prompts: list[Prompt], ys: list[list[Rollout]],
          opponents: list[list[Rollout]], pairs: Pairing) -> list[float]:
    """For every response y_i, the mean of P(y_i > o | x) over its opponents ``pairs.opponents[i]``
    (indices into ``opponents``)."""
    y, o = flat(ys), flat(opponents)
    R = len(ys[0])
    rows, cols = pairs.comparisons()
    with timed(it, "judge", s):
        probs, identical = s.judge.compare([prompts[i // R].text for i in rows], [y[i].response_text for i in rows],
                                           [o[j].response_text for j in cols], training=True)
    it.comparisons += len(rows)
    it.identical += identical
    return pairs.average(probs)


# ----------------------------------------------------------------------------- the algorithms
def nash_mp(s: Session, k: int, it: Iteration) -> None:
    """Nash Mirror Prox: half-step against pi_k, full step from theta_k against pi_{k+1/2}."""
    cfg = s.cfg
    G, R, regression = cfg.prompts_per_iteration, cfg.responses_per_prompt, cfg.algorithm.estimator == "regression"
    # 1. responses y ~ pi_k from the current pool
    with timed(it, "rollout", s):
        prompts = s.next_prompts()
        ys = s.current.generate(prompts, s.seeds(k, Phase.TRAIN, G, R))
    # 2. half-step from theta_k, opponents: other responses of pi_k to the same prompt
    pairs = pairing.self_play(G, R, with_partner=regression, opponents=cfg.algorithm.opponents_per_response)
    p_half = judge(s, it, prompts, ys, ys, pairs)
    with timed(it, "learn", s):
        it.half = s.learners.half_step(StepBatch(flat(ys), p_half, pairs.partner))
    # 3. theta_{k+1/2} -> extrapolated pool; opponents y'' ~ pi_{k+1/2}
    with timed(it, "sync", s):
        s.sync.push("extrapolated")
    with timed(it, "rollout", s):
        y_opp = s.extrapolated.generate(prompts, s.seeds(k, Phase.OPPONENT, G, R))
    # 4. full step: restore theta_k, opponents from pi_{k+1/2} -> theta_{k+1}
    pairs = pairing.against_other_pool(G, R, with_partner=regression, opponents=cfg.algorithm.opponents_per_response)
    p_full = judge(s, it, prompts, ys, y_opp, pairs)
    with timed(it, "learn", s):
        it.full = s.learners.full_step(StepBatch(flat(ys), p_full, pairs.partner))
    # 5. theta_{k+1} -> current pool
    with timed(it, "sync", s):
        s.sync.push("current")
    it.prompts, it.responses = prompts, ys


def online_ipo(s: Session, k: int, it: Iteration) -> None:
    """Online IPO / self-play mirror descent: one regression step on pairs of pi_k's responses."""
    cfg = s.cfg
    G, R = cfg.prompts_per_iteration, cfg.responses_per_prompt
    with timed(it, "rollout", s):
        prompts = s.next_prompts()
        ys = s.current.generate(prompts, s.seeds(k, Phase.TRAIN, G, R))
    pairs = pairing.online_ipo(G, R)  # each response is judged against its pair partner
    p = judge(s, it, prompts, ys, ys, pairs)
    with timed(it, "learn", s):
        it.full = s.learners.step(StepBatch(flat(ys), p, pairs.partner))
    with timed(it, "sync", s):
        s.sync.push("current")
    it.prompts, it.responses = prompts, ys


def egpo(s: Session, k: int, it: Iteration) -> None:
    """EGPO: extragradient in parameter space; the second gradient is taken at theta_{k+1/2} on
    pi_{k+1/2}'s own responses and applied from theta_k."""
    cfg = s.cfg
    G, R = cfg.prompts_per_iteration, cfg.responses_per_prompt
    pairs = pairing.self_play(G, R, with_partner=True, opponents=cfg.algorithm.opponents_per_response)
    with timed(it, "rollout", s):
        prompts = s.next_prompts()
        ys = s.current.generate(prompts, s.seeds(k, Phase.TRAIN, G, R))
    p_half = judge(s, it, prompts, ys, ys, pairs)
    with timed(it, "learn", s):
        it.half = s.learners.half_step(StepBatch(flat(ys), p_half, pairs.partner))
    with timed(it, "sync", s):
        s.sync.push("extrapolated")
    with timed(it, "rollout", s):
        y_half = s.extrapolated.generate(prompts, s.seeds(k, Phase.OPPONENT, G, R))
    p_full = judge(s, it, prompts, y_half, y_half, pairs)
    with timed(it, "learn", s):
        it.full = s.learners.full_step(StepBatch(flat(y_half), p_full, pairs.partner))
    with timed(it, "sync", s):
        s.sync.push("current")
    it.prompts, it.responses = prompts, ys


def nash_md_pg(s: Session, k: int, it: Iteration) -> None:
    """Nash-MD-PG: one policy-gradient step, opponents from the geometric mixture of pi_k and
    pi_ref (the extrapolated pool samples the mixture and holds pi_k)."""
    cfg = s.cfg
    G, R = cfg.prompts_per_iteration, cfg.responses_per_prompt
    with timed(it, "rollout", s):
        prompts = s.next_prompts()
        ys = s.current.generate(prompts, s.seeds(k, Phase.TRAIN, G, R))
        y_mix = s.extrapolated.generate(prompts, s.seeds(k, Phase.OPPONENT, G, R))
    pairs = pairing.against_other_pool(G, R, with_partner=False, opponents=cfg.algorithm.opponents_per_response)
    p = judge(s, it, prompts, ys, y_mix, pairs)
    with timed(it, "learn", s):
        it.full = s.learners.step(StepBatch(flat(ys), p))
    with timed(it, "sync", s):
        s.sync.push("current")
        s.sync.push("extrapolated")  # the mixture sampler needs pi_{k+1} too
    it.prompts, it.responses = prompts, ys


ALGORITHMS: dict[str, Callable[[Session, int, Iteration], None]] = {
    "nash-mp": nash_mp, "online-ipo": online_ipo, "egpo": egpo, "nash-md-pg": nash_md_pg,
}


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig, *, overwrite: bool = False, resume_command: str = "") -> dict:
    """Run ``cfg.iterations`` iterations of ``cfg.algorithm.name``; return the run summary
    (also in ``summary.json``). Resumes from the newest checkpoint when ``cfg.resume``.

    Raises:
        Interrupted: on Ctrl-C/SIGTERM, after printing where the run stopped and how to resume.
        nlhf.reporting.LearnerDied: a learner died (and no ``fault_tolerance.learner_restarts`` left).
    """
    from nlhf import reporting

    step = ALGORITHMS[cfg.algorithm.name]
    interrupts.reset()
    previous = {sig: signal.signal(sig, interrupts.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Session.start(cfg, overwrite=overwrite, resume_command=resume_command) as s:
            for sig in previous:  # ray.init may have installed its own handlers
                signal.signal(sig, interrupts.handler)
            try:
                reporting.evaluate_initial_policy(s)
                while s.state.iteration < cfg.iterations:
                    k = s.state.iteration
                    it = Iteration()
                    with reporting.learner_faults(s):
                        step(s, k, it)
                        reporting.end_iteration(s, k, it)
                return reporting.finish(s)
            except Interrupted as e:
                s.note(f"interrupted ({e}) during iteration {s.state.iteration + 1}; "
                       f"{s.state.iteration} iterations completed; {s.resume_hint()}")
                raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

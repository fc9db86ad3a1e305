"""Plain data records passed between the driver and the actors (picklable, no Ray import).

These are the only types the roles share besides the config tree: the rollout workers
produce :class:`Rollout`, the judge turns pairs of them into preference probabilities, and
the learners consume a :class:`StepBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rollout:
    """One sampled response y ~ pi(.|x) from a rollout pool.

    Attributes:
        prompt: the user prompt as plain text (what the judge reads).
        prompt_token_ids: the chat-templated prompt as token ids (what the learner scores).
        response_token_ids: the generated tokens, EOS included when the engine stopped on it.
        response_text: the decoded response (special tokens skipped).
        sampler_logprob: log pi_engine(y | x) in nats, the sum of the engine's per-token
            log-probabilities at sampling time. This is the *engine's* view of the behaviour
            policy (another precision and other kernels than the learner's): the learner forms
            importance ratios against its own log pi_k and uses this only to measure the
            engine-learner gap (and for the optional truncated correction of that gap).
        finished: True when generation stopped on EOS/stop rather than on max_tokens.
        sampler_token_logprobs: the engine's log-probability of each response token, nats,
            ``len == len(response_token_ids)`` (empty when the producer did not record them).
        seed: the sampling seed this response was drawn with (None: unseeded / greedy).
    """

    prompt: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_text: str
    sampler_logprob: float
    finished: bool = True
    sampler_token_logprobs: list[float] = field(default_factory=list)
    seed: int | None = None


@dataclass
class StepBatch:
    """The input of one learner update (a Nash-MP half or full step, or a baseline's step).

    ``rollouts[i]`` is a response y_i drawn from the policy at the point where the update's
    gradient is evaluated (pi_k for Nash-MP's both steps; pi_{k+1/2} for EGPO's second step).
    ``preference[i]`` is P(y_i > o_i | x_i) for y_i's judged **opponent** o_i (which pool the
    opponent comes from is the algorithm's business; see :mod:`nlhf.algorithms.pairing`).
    ``partner[i]`` is, for the pair-regression losses (Nash-MP's regression estimator, online
    IPO, EGPO), the index j != i of y_i's **pair partner** in ``rollouts`` (same prompt): the
    loss regresses log-ratios of (y_i, y_j). Empty for the policy-gradient losses.

    Raises:
        ValueError: the lists differ in length, a preference is outside [0, 1], or a partner
            index is outside the batch, equal to its own index, or on another prompt.
    """

    rollouts: list[Rollout]
    preference: list[float]
    partner: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.rollouts)
        if len(self.preference) != n:
            raise ValueError(f"StepBatch.preference has {len(self.preference)} entries for {n} rollouts")
        if self.partner and len(self.partner) != n:
            raise ValueError(f"StepBatch.partner has {len(self.partner)} entries for {n} rollouts")
        for i, p in enumerate(self.preference):
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"StepBatch.preference[{i}] = {p!r} is outside [0, 1]")
        for i, j in enumerate(self.partner):
            if not (0 <= j < n):
                raise ValueError(f"StepBatch.partner[{i}] = {j} is outside [0, {n})")
            if j == i:
                raise ValueError(f"StepBatch.partner[{i}] = {i}: a response cannot be its own pair partner")
            if self.rollouts[j].prompt_token_ids != self.rollouts[i].prompt_token_ids:
                raise ValueError(f"StepBatch.partner[{i}] = {j} answers another prompt")

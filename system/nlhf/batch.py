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
        sampler_logprob: log pi_sampler(y | x) in nats, the sum of the engine's per-token
            log-probabilities at sampling time (used for importance weights).
        finished: True when generation stopped on EOS/stop rather than on max_tokens.
    """

    prompt: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_text: str
    sampler_logprob: float
    finished: bool = True


@dataclass
class StepBatch:
    """The input of one proximal step (half-step or full step) of Nash-MP.

    ``rollouts[i]`` is y_i ~ pi_k; ``preference[i]`` is P(y_i > y'_i | x_i) for an opponent
    sample y'_i (from pi_k for the half-step, from pi_{k+1/2} for the full step);
    ``pair_index[i]`` is the index of another response to the same prompt (used by the
    regression estimator, which regresses log-ratios of pairs (y_i, y_{pair_index[i]})).

    Raises:
        ValueError: if the three lists differ in length or a preference is outside [0, 1].
    """

    rollouts: list[Rollout]
    preference: list[float]
    pair_index: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.rollouts)
        if len(self.preference) != n:
            raise ValueError(f"StepBatch.preference has {len(self.preference)} entries for {n} rollouts")
        if self.pair_index and len(self.pair_index) != n:
            raise ValueError(f"StepBatch.pair_index has {len(self.pair_index)} entries for {n} rollouts")
        for i, p in enumerate(self.preference):
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"StepBatch.preference[{i}] = {p!r} is outside [0, 1]")
        for i, j in enumerate(self.pair_index):
            if not (0 <= j < n):
                raise ValueError(f"StepBatch.pair_index[{i}] = {j} is outside [0, {n})")

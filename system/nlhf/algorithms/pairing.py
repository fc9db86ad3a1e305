"""Who is judged against whom: opponents and pair partners of a batch of responses.

A batch holds ``G`` prompts x ``R`` responses, flattened prompt-major (response ``r`` of prompt
``g`` has flat index ``g * R + r``). Every loss needs, for each response y_i, a judged
**opponent** o_i (the judge is asked P(y_i > o_i | x)); the pair-regression losses also need a
**pair partner** p_i, another response to the same prompt whose log-ratio with y_i is
regressed (nash-mp.md, "Stochastic Nash-MP for language models").

Independence is what makes the estimators unbiased:

- the policy-gradient losses need o_i independent of y_i: any other response to the prompt;
- the regression estimator's target ``(eta/beta) (P(y_i > o_i) - P(y_p > o_p))`` is an unbiased
  estimate of ``(eta/beta) (a(y_i) - a(y_p))`` only when both opponents are independent of
  *both* y_i and y_p. With the partner also serving as the opponent (the former
  ``opponent_pairs(..., 1)`` for both), R = 2 gives ``P(y_i > y_p) - P(y_p > y_i) =
  2 P(y_i > y_p) - 1``: the preference term is doubled and pi* is not the fixed point.
  Here partners are ``(2m, 2m+1)`` and opponents are two places further on, so the pair
  (0, 1) is judged against (2, 3): R must be even and >= 4.
- online IPO's loss is defined on the pair itself: its opponent *is* its partner.

Opponents either come from the same batch (``opponents_from == "same"``: self-play against
pi_k) or are the responses at the same flat index of another pool's batch (``"other"``:
pi_{k+1/2} for Nash-MP's full step, the geometric mixture for Nash-MD-PG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = ["Pairing", "self_play", "against_other_pool", "online_ipo", "regression_partner", "check_responses_per_prompt",
           "max_opponents",
           "QueryPlan", "plan_queries"]


@dataclass(frozen=True)
class Pairing:
    """For a flat batch of ``len(opponents)`` responses.

    Attributes:
        opponents: ``opponents[i]`` lists the flat indices of y_i's judged opponents, into this
            batch (``opponents_from == "same"``) or into the other pool's batch (``"other"``).
            The preference fed to the loss is the mean over them, an estimate of
            ``a(y_i) = P(y_i > mu)`` whose variance falls as 1/len(opponents[i]).
        partner: ``partner[i]`` is the flat index of y_i's pair partner in this batch (same
            prompt, != i); empty when the loss needs no partner.
        opponents_from: ``"same"`` or ``"other"``.
    """

    opponents: list[list[int]]
    partner: list[int]
    opponents_from: Literal["same", "other"]

    def comparisons(self) -> tuple[list[int], list[int]]:
        """Flat (response index, opponent index) of every comparison, response-major."""
        rows = [i for i, opp in enumerate(self.opponents) for _ in opp]
        cols = [j for opp in self.opponents for j in opp]
        return rows, cols

    def average(self, probabilities: Sequence[float]) -> list[float]:
        """Per response, the mean of its comparisons' probabilities (``probabilities`` in the
        order of :meth:`comparisons`).

        Raises:
            ValueError: not one probability per comparison.
        """
        counts = [len(o) for o in self.opponents]
        if len(probabilities) != sum(counts):
            raise ValueError(f"{len(probabilities)} probabilities for {sum(counts)} comparisons")
        out, t = [], 0
        for c in counts:
            out.append(float(sum(probabilities[t:t + c])) / c)
            t += c
        return out


def _check_shape(groups: int, responses: int) -> None:
    if groups < 1:
        raise ValueError(f"groups (prompts in the batch) must be >= 1, got {groups}")
    if responses < 2:
        raise ValueError(f"responses per prompt must be >= 2, got {responses}")


Opponents = int | Literal["all"]


def _count(opponents: Opponents, most: int, what: str, responses: int) -> int:
    """``opponents`` as a number: ``"all"`` is ``most``, the most this pairing allows.

    Raises:
        ValueError: a number outside [1, most].
    """
    if opponents == "all":
        return most
    if not isinstance(opponents, int) or isinstance(opponents, bool) or not 1 <= opponents <= most:
        raise ValueError(f"{what}: opponents per response must be in [1, {most}] with {responses} responses "
                         f"per prompt, got {opponents!r}")
    return opponents


def regression_partner(groups: int, responses: int) -> list[int]:
    """Pair partners ``(2m, 2m+1)`` within each prompt; ``responses`` must be even.

    Raises:
        ValueError: ``responses`` odd or < 2.
    """
    _check_shape(groups, responses)
    if responses % 2:
        raise ValueError(f"pair partners need an even number of responses per prompt, got {responses}")
    return [g * responses + (r ^ 1) for g in range(groups) for r in range(responses)]


def self_play(groups: int, responses: int, *, with_partner: bool, opponents: Opponents = 1) -> Pairing:
    """Opponents from the same batch (responses of the same policy to the same prompt).

    ``with_partner=False`` (policy-gradient losses): response r is judged against the next
    ``opponents`` responses of its prompt, ``(r + 1), ..., (r + opponents) mod R``; at most R - 1.
    ``with_partner=True`` (regression-type losses): partner ``r ^ 1``; both members of the pair
    ``(2m, 2m+1)`` are judged against the same ``opponents`` responses outside the pair,
    ``2m + 2, 2m + 3, ... mod R`` (EGPO's shared y''); needs R even and >= 4, at most R - 2.
    ``opponents="all"``: the most allowed (R - 1, or R - 2 with partners).

    Raises:
        ValueError: R too small (or odd) for independent opponents, or too many opponents.
    """
    _check_shape(groups, responses)
    R = responses
    if not with_partner:
        n = _count(opponents, R - 1, "self-play", R)
        return Pairing([[g * R + (r + j) % R for j in range(1, n + 1)] for g in range(groups) for r in range(R)],
                       [], "same")
    if R < 4 or R % 2:
        raise ValueError(f"a pair-regression step judged against its own batch needs an even number >= 4 of "
                         f"responses per prompt (partner and opponents independent), got {R}")
    n = _count(opponents, R - 2, "self-play with pair partners", R)
    opp = [[g * R + (2 * (r // 2) + 2 + j) % R for j in range(n)] for g in range(groups) for r in range(R)]
    return Pairing(opp, regression_partner(groups, R), "same")


def against_other_pool(groups: int, responses: int, *, with_partner: bool, opponents: Opponents = 1) -> Pairing:
    """Opponents from another pool's batch of the same shape (independent of this batch):
    response r of prompt g is judged against that pool's responses ``r, r + 1, ... mod R`` of
    prompt g (``opponents`` of them, at most R; ``"all"``: all R). Partners, when asked for, are
    ``r ^ 1`` (R even)."""
    _check_shape(groups, responses)
    R = responses
    n = _count(opponents, R, "opponents from the other pool", R)
    opp = [[g * R + (r + j) % R for j in range(n)] for g in range(groups) for r in range(R)]
    return Pairing(opp, regression_partner(groups, R) if with_partner else [], "other")


def online_ipo(groups: int, responses: int) -> Pairing:
    """Online IPO: each response is judged against its pair partner ``(r + 1) mod R``; needs R >= 2."""
    _check_shape(groups, responses)
    R = responses
    idx = [g * R + (r + 1) % R for g in range(groups) for r in range(R)]
    return Pairing([[j] for j in idx], list(idx), "same")


def max_opponents(algorithm: str, estimator: str, responses: int) -> int:
    """The most opponents per response an algorithm's pairing allows with ``responses`` per prompt."""
    if algorithm == "online-ipo":
        return 1
    if algorithm == "egpo" or (algorithm == "nash-mp" and estimator == "regression"):
        return responses - 2
    return responses - 1  # self-play pg (nash-mp half-step); cross-pool steps allow R, the tighter bound wins


def check_responses_per_prompt(algorithm: str, estimator: str, responses: int, opponents: Opponents = 1) -> None:
    """Refuse a ``responses_per_prompt`` (and ``opponents_per_response``) the algorithm cannot
    pair independently.

    Raises:
        ValueError: naming the algorithm, the estimator and the value.
    """
    needs_four = (algorithm == "nash-mp" and estimator == "regression") or algorithm == "egpo"
    if responses < 2:
        raise ValueError(f"responses_per_prompt must be >= 2, got {responses}")
    if needs_four and (responses < 4 or responses % 2):
        what = "egpo" if algorithm == "egpo" else "nash-mp with estimator 'regression'"
        raise ValueError(f"{what} needs an even responses_per_prompt >= 4 (pair partner and judged opponents "
                         f"must be independent responses), got {responses}")
    most = max_opponents(algorithm, estimator, responses)
    if opponents != "all" and not 1 <= opponents <= most:
        raise ValueError(f"algorithm.opponents_per_response: {opponents} is not in [1, {most}] for {algorithm} "
                         f"with {responses} responses per prompt")


# ----------------------------------------------------------------------------- judge queries
@dataclass(frozen=True)
class QueryPlan:
    """Which distinct pairs to send to the judge for a list of requested comparisons.

    Attributes:
        queries: position t0 (into the requested lists) of the first comparison of each
            distinct, non-identical unordered pair, in first-seen order; the judge is asked
            P(a_t0 > b_t0 | prompt_t0) once for each.
        source: ``source[t]`` is ``(q, flipped)``: comparison t reads query q (``1 - P`` when
            ``flipped``, i.e. it is the reverse of query q), or ``(-1, False)`` when both
            responses are identical (P = 1/2 exactly, no judge call).
    """

    queries: list[int]
    source: list[tuple[int, bool]]

    @property
    def num_identical(self) -> int:
        """Comparisons of a response with an identical one (no judge call, P = 1/2)."""
        return sum(1 for q, _ in self.source if q < 0)

    def assemble(self, probabilities: Sequence[float]) -> list[float]:
        """P for every requested comparison, from the judge's answers to :attr:`queries`.

        Raises:
            ValueError: ``len(probabilities) != len(queries)``.
        """
        if len(probabilities) != len(self.queries):
            raise ValueError(f"{len(probabilities)} judge answers for {len(self.queries)} queries")
        return [0.5 if q < 0 else (1.0 - float(probabilities[q]) if flip else float(probabilities[q]))
                for q, flip in self.source]


def plan_queries(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> QueryPlan:
    """Deduplicate comparisons (P(a_t > b_t | prompt_t) for every t) into judge queries.

    A comparison and its reverse are one query (the preference model is antisymmetric:
    P(b > a) = 1 - P(a > b)); a response compared with an identical text needs no query.

    Raises:
        ValueError: the three lists differ in length.
    """
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise ValueError(f"plan_queries: {len(prompts)} prompts, {len(responses_a)} a, {len(responses_b)} b")
    seen: dict[tuple[str, str, str], int] = {}
    queries: list[int] = []
    source: list[tuple[int, bool]] = []
    for t, (x, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
        if a == b:
            source.append((-1, False))
            continue
        key = (x, a, b) if a < b else (x, b, a)
        if key not in seen:
            seen[key] = len(queries)
            queries.append(t)
        q = seen[key]
        source.append((q, a != responses_a[queries[q]]))
    return QueryPlan(queries, source)

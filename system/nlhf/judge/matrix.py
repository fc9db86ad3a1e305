"""Exact judge of a matrix game: responses are single action tokens, P(a > b) = P[i, j].

Game mode (``nlhf game``) lets the policy answer one prompt with one of ``n`` action tokens;
the judge is then the known preference matrix, so the Nash equilibrium and the exploitability
of the policy can be computed exactly. The prompt is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nlhf.judge.base import Judge, JudgeError


class MatrixJudge(Judge):
    """P(a > b | x) = P[index(a), index(b)], where ``index(r)`` is the ``i`` with ``r.strip() == actions[i]``.

    Args:
        P: (n, n) preference matrix: entries in [0, 1], ``P + P.T == 1`` (so the diagonal is 1/2).
        actions: the ``n`` distinct action strings (non-empty, without surrounding whitespace).
    Raises:
        JudgeError: ``P`` is not a valid preference matrix, or ``actions`` does not match it.

    Attributes:
        truncations: always 0 (kept so every judge exposes the counter).
    """

    name = "matrix"

    def __init__(self, P: np.ndarray, actions: Sequence[str]) -> None:
        from nlhf.algorithms.games import validate_preference_matrix

        try:
            matrix = validate_preference_matrix(P)
        except ValueError as e:
            raise JudgeError(f"judge {self.name}: invalid preference matrix: {e}") from None
        actions = list(actions)
        n = matrix.shape[0]
        if len(actions) != n:
            raise JudgeError(f"judge {self.name}: {len(actions)} actions for a {n}x{n} matrix")
        for i, a in enumerate(actions):
            if not isinstance(a, str) or not a or a != a.strip():
                raise JudgeError(f"judge {self.name}: actions[{i}] = {a!r} must be a non-empty string without "
                                 "surrounding whitespace")
        if len(set(actions)) != n:
            dupes = sorted({a for a in actions if actions.count(a) > 1})
            raise JudgeError(f"judge {self.name}: actions must be distinct, repeated: {dupes}")
        self.P = matrix
        self.actions = actions
        self.index = {a: i for i, a in enumerate(actions)}
        self.truncations = 0

    def action_index(self, responses: Sequence[str], field: str, prompts: Sequence[str],
                     others: Sequence[str]) -> np.ndarray:
        """Indices (int64, shape (B,)) of ``responses``; raises JudgeError naming the first unknown pair."""
        out = np.empty(len(responses), dtype=np.int64)
        for k, r in enumerate(responses):
            i = self.index.get(r.strip())
            if i is None:
                shown = self.actions if len(self.actions) <= 12 else self.actions[:12] + ["..."]
                raise JudgeError(
                    f"judge {self.name}: {field}[{k}] = {r[:60]!r} is not an action (pair {k}: prompt "
                    f"{prompts[k][:60]!r}, other response {others[k][:60]!r}); actions: {shown}"
                )
            out[k] = i
        return out

    def _prefer(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        ia = self.action_index(responses_a, "responses_a", prompts, responses_b)
        ib = self.action_index(responses_b, "responses_b", prompts, responses_a)
        return self.P[ia, ib].copy()

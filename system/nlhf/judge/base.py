"""The judge interface: a pairwise preference model P(y > y' | x).

Every adapter (pairwise cross-encoder, Bradley-Terry reward model, LLM-as-judge, exact
matrix) implements :meth:`Judge.prefer`; :func:`validate_probabilities` guards its output so
that NaN or out-of-range values never flow into training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np


class JudgeError(ValueError):
    """A judge produced an invalid probability, or was asked an invalid question."""


def check_request(name: str, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> None:
    """Raise :class:`JudgeError` unless the three lists have one common length and hold strings.

    Empty responses are allowed (a policy may emit EOS at once); empty prompts are not.
    """
    n = len(prompts)
    if len(responses_a) != n or len(responses_b) != n:
        raise JudgeError(
            f"judge {name}: prompts, responses_a and responses_b must have the same length, "
            f"got {n}, {len(responses_a)}, {len(responses_b)}"
        )
    for field, values in (("prompts", prompts), ("responses_a", responses_a), ("responses_b", responses_b)):
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise JudgeError(f"judge {name}: {field}[{i}] is {type(v).__name__}, not a string")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise JudgeError(f"judge {name}: prompts[{i}] is empty")


def validate_probabilities(name: str, probs: np.ndarray, prompts: Sequence[str], responses_a: Sequence[str],
                           responses_b: Sequence[str]) -> np.ndarray:
    """Return ``probs`` as float64 of shape (batch,) or raise naming the judge and the first bad pair.

    Raises:
        JudgeError: wrong shape, NaN/inf, or a value outside [0, 1].
    """
    arr = np.asarray(probs, dtype=np.float64).reshape(-1)
    if arr.shape[0] != len(prompts):
        raise JudgeError(f"judge {name}: returned {arr.shape[0]} probabilities for {len(prompts)} pairs")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0))
    if bad.size:
        i = int(bad[0])
        raise JudgeError(
            f"judge {name}: invalid probability {arr[i]!r} for pair {i} "
            f"(prompt {prompts[i][:60]!r}, response_a {responses_a[i][:60]!r}, response_b {responses_b[i][:60]!r})"
        )
    return arr


class Judge(ABC):
    """A pairwise preference model. Subclasses implement :meth:`_prefer`."""

    name: str = "judge"

    @abstractmethod
    def _prefer(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        """Unchecked P(a > b | prompt), shape (batch,)."""

    def prefer(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> np.ndarray:
        """P(responses_a[i] > responses_b[i] | prompts[i]) for each i.

        Args:
            prompts, responses_a, responses_b: lists of equal length B (plain text).
        Returns:
            float64 array of shape (B,), each in [0, 1].
        Raises:
            JudgeError: mismatched lengths, an empty prompt, or an invalid output (naming the pair).
        """
        check_request(self.name, prompts, responses_a, responses_b)
        if len(prompts) == 0:
            return np.zeros(0, dtype=np.float64)
        out = self._prefer(list(prompts), list(responses_a), list(responses_b))
        return validate_probabilities(self.name, out, prompts, responses_a, responses_b)

"""Matrix preference games: generators and validation.

A preference game over ``n`` actions (responses to a single prompt) is a matrix ``P`` of shape
``(n, n)`` with ``P[i, j] = P(y_i > y_j)`` in [0, 1] and ``P + P.T == 1`` (so the diagonal is
1/2). It need not be transitive. ``P(pi > pi') = pi @ P @ pi'``. A reference policy ``pi_ref`` is
a strictly positive probability vector of shape ``(n,)``. See ``docs/nash-mp.md``
("Matrix games to test on") and Nash-MP, arXiv:2505.19731.

Every generator takes an explicit integer seed and draws from ``numpy.random.default_rng``.
"""

from __future__ import annotations

import numpy as np

COMPLEMENT_TOL = 1e-9
"""Tolerance on ``P + P.T == 1`` and on ``sum(pi_ref) == 1``."""


class GameError(ValueError):
    """A preference matrix, reference policy or game parameter is malformed.

    Subclasses ``ValueError`` so ``nlhf.cli.common.one_line_errors`` prints it as one line.
    """


def _check_n(n: int, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise GameError(f"number of actions must be an integer >= {minimum}, got {n!r}")
    return int(n)


def validate_preference_matrix(P: np.ndarray) -> np.ndarray:
    """Check that ``P`` is a complementary preference matrix and return it as float64.

    Args:
        P: array-like of shape ``(n, n)``, ``P[i, j] = P(y_i > y_j)``.

    Returns:
        A float64 copy of ``P``, shape ``(n, n)``.

    Raises:
        GameError: if ``P`` is not 2-D square with n >= 1, has a non-finite entry, has an entry
            outside [0, 1], or violates ``P[i, j] + P[j, i] = 1`` by more than 1e-9 (the message
            names the first offending entry, e.g. ``P[0,3] + P[3,0] = 1.2``).
    """
    try:
        A = np.array(P, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GameError(f"preference matrix is not numeric: {e}") from None
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise GameError(f"preference matrix must be square (n, n) with n >= 1, got shape {A.shape}")
    bad = np.argwhere(~np.isfinite(A))
    if bad.size:
        i, j = bad[0]
        raise GameError(f"preference matrix has a non-finite entry: P[{i},{j}] = {A[i, j]}")
    bad = np.argwhere((A < 0.0) | (A > 1.0))
    if bad.size:
        i, j = bad[0]
        raise GameError(f"preference matrix entry outside [0, 1]: P[{i},{j}] = {A[i, j]:.6g}")
    S = A + A.T
    bad = np.argwhere(np.abs(S - 1.0) > COMPLEMENT_TOL)
    if bad.size:
        i, j = bad[0]
        raise GameError(
            f"preference matrix is not complementary: P[{i},{j}] + P[{j},{i}] = {S[i, j]:.6g}"
            " (must be 1)"
        )
    return A


def validate_reference(pi_ref: np.ndarray, n: int) -> np.ndarray:
    """Check that ``pi_ref`` is a strictly positive distribution over ``n`` actions.

    Args:
        pi_ref: array-like of shape ``(n,)``.
        n: number of actions of the game.

    Returns:
        A float64 copy of ``pi_ref`` renormalised to sum to exactly 1 (up to rounding), shape ``(n,)``.

    Raises:
        GameError: wrong shape, non-finite or non-positive entry, or ``|sum - 1| > 1e-9``.
    """
    try:
        r = np.array(pi_ref, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GameError(f"reference policy is not numeric: {e}") from None
    if r.shape != (n,):
        raise GameError(f"reference policy must have shape ({n},), got {r.shape}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise GameError(f"reference policy has a non-finite entry: pi_ref[{bad[0]}] = {r[bad[0]]}")
    bad = np.flatnonzero(r <= 0.0)
    if bad.size:
        raise GameError(
            f"reference policy must be strictly positive: pi_ref[{bad[0]}] = {r[bad[0]]:.6g}"
        )
    s = float(r.sum())
    if abs(s - 1.0) > COMPLEMENT_TOL:
        raise GameError(f"reference policy does not sum to 1: sum = {s:.12g}")
    return r / s


def validate_beta(beta: float) -> float:
    """Return ``beta`` as float; raise ``GameError`` unless it is finite and > 0."""
    b = float(beta)
    if not np.isfinite(b) or b <= 0.0:
        raise GameError(f"beta must be a finite number > 0, got {beta!r}")
    return b


def random_game(n: int, seed: int) -> np.ndarray:
    """Random preference matrix (EGPO's generator, arXiv:2503.08942).

    Strict lower triangle i.i.d. U(0, 1), upper triangle ``1 - transpose``, diagonal 1/2.
    Generally intransitive.

    Args:
        n: number of actions (>= 1).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``P`` of shape ``(n, n)``, complementary.
    """
    n = _check_n(n)
    rng = np.random.default_rng(seed)
    lower = np.tril(rng.uniform(0.0, 1.0, size=(n, n)), k=-1)
    upper = np.triu(1.0 - lower.T, k=1)
    return lower + upper + 0.5 * np.eye(n)


def cyclic_game(n: int = 3, strength: float = 1.0) -> np.ndarray:
    """Rock-paper-scissors generalised to odd ``n`` (a balanced cyclic tournament).

    Action ``i`` beats the next ``(n - 1) / 2`` actions cyclically (``i+1, ..., i+(n-1)/2 mod n``)
    with probability ``(1 + strength) / 2`` and loses to the others with ``(1 - strength) / 2``.
    Every action wins against exactly half of the others, so the unregularised Nash equilibrium
    is uniform; with a non-uniform ``pi_ref`` the regularised one is not.

    Args:
        n: odd number of actions, >= 3.
        strength: in [0, 1]; 0 gives the all-1/2 game, 1 gives deterministic wins.

    Returns:
        ``P`` of shape ``(n, n)``.

    Raises:
        GameError: ``n`` even or < 3, ``strength`` outside [0, 1].
    """
    n = _check_n(n, minimum=3)
    if n % 2 == 0:
        raise GameError(f"cyclic game needs an odd number of actions, got n={n}")
    s = float(strength)
    if not (0.0 <= s <= 1.0):
        raise GameError(f"cyclic game strength must be in [0, 1], got {strength!r}")
    P = np.full((n, n), 0.5)
    half = (n - 1) // 2
    for i in range(n):
        for d in range(1, half + 1):
            j = (i + d) % n
            P[i, j] = 0.5 * (1.0 + s)
            P[j, i] = 0.5 * (1.0 - s)
    return P


def bradley_terry_game(scores: np.ndarray) -> np.ndarray:
    """Transitive preference matrix ``P[i, j] = sigmoid(scores[i] - scores[j])``.

    Args:
        scores: finite rewards of shape ``(n,)`` (nats of log-odds).

    Returns:
        ``P`` of shape ``(n, n)``, computed stably (no overflow for large score gaps).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size < 1 or not np.all(np.isfinite(s)):
        raise GameError(f"Bradley-Terry scores must be a finite 1-D array, got shape {s.shape}")
    d = s[:, None] - s[None, :]
    # sigmoid(d) = 1/2 (1 + tanh(d/2)): exact complement, no overflow.
    return 0.5 * (1.0 + np.tanh(0.5 * d))


def bradley_terry_game_from_seed(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Bradley-Terry game with scores ~ N(0, scale^2) from ``default_rng(seed)``; shape ``(n, n)``."""
    n = _check_n(n)
    rng = np.random.default_rng(seed)
    return bradley_terry_game(scale * rng.standard_normal(n))


def uniform_reference(n: int) -> np.ndarray:
    """Uniform reference policy, shape ``(n,)``."""
    n = _check_n(n)
    return np.full(n, 1.0 / n)


def softmax_reference(n: int, seed: int) -> np.ndarray:
    """Reference policy ``softmax(z)`` with logits ``z ~ N(0, 1)`` from ``default_rng(seed)``; shape ``(n,)``."""
    n = _check_n(n)
    z = np.random.default_rng(seed).standard_normal(n)
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


def make_game(kind: str, n: int, seed: int = 0, *, strength: float = 1.0, scale: float = 1.0) -> np.ndarray:
    """The preference matrix of a named game kind, shape (n, n): ``random`` (:func:`random_game`),
    ``cyclic`` (:func:`cyclic_game`, ``strength``; ``seed`` unused) or ``bradley-terry``
    (:func:`bradley_terry_game_from_seed`, ``scale``). Used by ``nlhf game make`` and game-mode training.

    Raises:
        GameError: an unknown kind, or the generator's own errors (e.g. an even n for ``cyclic``).
    """
    if kind == "random":
        return random_game(n, seed)
    if kind == "cyclic":
        return cyclic_game(n, strength)
    if kind == "bradley-terry":
        return bradley_terry_game_from_seed(n, seed, scale)
    raise GameError(f"unknown game kind {kind!r}; choose random, cyclic or bradley-terry")


__all__ = [
    "make_game",
    "GameError",
    "bradley_terry_game",
    "bradley_terry_game_from_seed",
    "cyclic_game",
    "random_game",
    "softmax_reference",
    "uniform_reference",
    "validate_beta",
    "validate_preference_matrix",
    "validate_reference",
]

"""The beta-regularised Nash equilibrium of a matrix preference game, and distances to it.

Regularised game (``docs/nash-mp.md``; Munos et al. arXiv:2312.00886; Nash-MP arXiv:2505.19731):

    P_beta(pi > pi') = P(pi > pi') - beta KL(pi || pi_ref) + beta KL(pi' || pi_ref)

Its unique, symmetric equilibrium ``pi*`` is the fixed point

    pi*(y) ∝ pi_ref(y) exp( (P pi*)(y) / beta ).

The best response to ``pi`` is ``BR(pi) ∝ pi_ref exp(P pi / beta)``, and since
``max_pi' [P(pi' > pi) - beta KL(pi' || pi_ref)] = beta log sum_y pi_ref(y) exp((P pi)(y)/beta)``
while ``P(pi > pi) = 1/2``, the exploitability has the closed form (derived)

    exploitability(pi) = max_pi' P_beta(pi' > pi) - 1/2 = beta KL(pi || BR(pi))   >= 0,

zero exactly at ``pi*``. All computations are in log space (logsumexp), so policies with
probabilities far below 1e-300 in linear space are handled. Policies are 1-D arrays of shape
``(n,)``; ``P`` has shape ``(n, n)``. KL divergences are in nats.
"""

from __future__ import annotations

import numpy as np

from nlhf.algorithms.games import (
    GameError,
    validate_beta,
    validate_preference_matrix,
    validate_reference,
)

_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------- log-space helpers
def log_normalise(logits: np.ndarray) -> np.ndarray:
    """Return ``logits - logsumexp(logits)``: log-probabilities of ``softmax(logits)``, same shape (last axis)."""
    z = np.asarray(logits, dtype=np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    return z - (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))


def _log_probs(p: np.ndarray, name: str) -> np.ndarray:
    """Log of a probability vector (zeros -> -inf), renormalised to sum to one."""
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise GameError(f"{name} must be a 1-D probability vector, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise GameError(f"{name} must have finite, non-negative entries")
    s = a.sum()
    if s <= 0:
        raise GameError(f"{name} has zero total mass")
    with np.errstate(divide="ignore"):
        return np.log(a) - np.log(s)


def kl_log(logp: np.ndarray, logq: np.ndarray) -> float:
    """``KL(p || q)`` in nats from normalised log-probabilities of shape ``(n,)``.

    Uses ``sum_p p (expm1(-d) + d)`` with ``d = log p - log q`` (each term >= 0), which stays
    accurate for KL values down to ~1e-30 where the textbook ``sum p d`` cancels to noise; mass
    of ``q`` outside the support of ``p`` is added exactly. ``inf`` if ``q = 0`` where ``p > 0``.
    """
    logp = np.asarray(logp, dtype=np.float64)
    logq = np.asarray(logq, dtype=np.float64)
    supp = np.isfinite(logp)
    if np.any(~np.isfinite(logq[supp])):
        return float("inf")
    d = logp[supp] - logq[supp]
    terms = np.exp(logp[supp]) * (np.expm1(-d) + d)
    outside = np.exp(logq[~supp]).sum() if np.any(~supp) else 0.0
    return float(max(terms.sum(), 0.0) + outside)


def log_best_response(logpi: np.ndarray, P: np.ndarray, log_ref: np.ndarray, beta: float) -> np.ndarray:
    """Log of ``BR(pi) ∝ pi_ref exp(P pi / beta)``; inputs/outputs of shape ``(n,)``. No validation."""
    return log_normalise(log_ref + (P @ np.exp(logpi)) / beta)


def exploitability_log(logpi: np.ndarray, P: np.ndarray, log_ref: np.ndarray, beta: float) -> float:
    """``beta KL(pi || BR(pi))`` from log-probabilities (see module docstring). No validation."""
    return beta * kl_log(logpi, log_best_response(logpi, P, log_ref, beta))


def span_log(logpi: np.ndarray, log_star: np.ndarray) -> float:
    """``max - min`` of ``log pi - log pi*`` (nats); ``inf`` if a support differs."""
    f = np.asarray(logpi, dtype=np.float64) - np.asarray(log_star, dtype=np.float64)
    if not np.all(np.isfinite(f)):
        return float("inf")
    return float(f.max() - f.min())


# --------------------------------------------------------------------------- public metrics
def kl(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(p || q) = sum_y p(y) log(p(y) / q(y))`` in nats.

    Args:
        p, q: probability vectors of shape ``(n,)`` (each renormalised to sum to 1 first).

    Returns:
        A float >= 0; ``inf`` when ``q(y) = 0 < p(y)`` for some ``y``.

    Raises:
        GameError: shapes differ, negative or non-finite entries, zero mass.
    """
    lp, lq = _log_probs(p, "p"), _log_probs(q, "q")
    if lp.shape != lq.shape:
        raise GameError(f"KL needs equal shapes, got {lp.shape} and {lq.shape}")
    return kl_log(lp, lq)


def _policy_in_game(pi: np.ndarray, P: np.ndarray, pi_ref: np.ndarray,
                    beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Validate a policy against a game: (log pi, P, log pi_ref, beta), or GameError."""
    P = validate_preference_matrix(P)
    ref = validate_reference(pi_ref, P.shape[0])
    beta = validate_beta(beta)
    lp = _log_probs(pi, "policy")
    if lp.shape != ref.shape:
        raise GameError(f"policy must have shape {ref.shape}, got {lp.shape}")
    return lp, P, np.log(ref), beta


def best_response(pi: np.ndarray, P: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Best response in the beta-regularised game: ``argmax_pi' P(pi' > pi) - beta KL(pi' || pi_ref)``.

    Closed form ``BR(pi)(y) ∝ pi_ref(y) exp((P pi)(y) / beta)`` (``docs/nash-mp.md``).

    Args:
        pi: opponent policy, shape ``(n,)``.
        P: preference matrix, shape ``(n, n)``.
        pi_ref: reference policy, shape ``(n,)``.
        beta: regularisation strength, > 0.

    Returns:
        Probability vector of shape ``(n,)``.

    Raises:
        GameError: malformed inputs.
    """
    lp, P, log_ref, beta = _policy_in_game(pi, P, pi_ref, beta)
    return np.exp(log_best_response(lp, P, log_ref, beta))


def exploitability(pi: np.ndarray, P: np.ndarray, pi_ref: np.ndarray, beta: float) -> float:
    """Exploitability ``max_pi' P_beta(pi' > pi) - 1/2`` of ``pi`` in the beta-regularised game.

    Computed in closed form as ``beta KL(pi || BR(pi))`` (module docstring), >= 0 and zero exactly
    at the regularised Nash equilibrium. Units: probability of winning (P is a probability).

    Args:
        pi: policy, shape ``(n,)``; P: shape ``(n, n)``; pi_ref: shape ``(n,)``; beta > 0.

    Raises:
        GameError: malformed inputs.
    """
    lp, P, log_ref, beta = _policy_in_game(pi, P, pi_ref, beta)
    return exploitability_log(lp, P, log_ref, beta)


def span_seminorm(pi: np.ndarray, pi_star: np.ndarray) -> float:
    """Span semi-norm ``max_y f(y) - min_y f(y)`` of ``f = log pi - log pi*`` (nats), shapes ``(n,)``.

    Invariant to normalisation; zero iff ``pi = pi*``; ``inf`` if either has a zero entry the
    other has not.
    """
    lp, ls = _log_probs(pi, "policy"), _log_probs(pi_star, "pi_star")
    if lp.shape != ls.shape:
        raise GameError(f"span needs equal shapes, got {lp.shape} and {ls.shape}")
    return span_log(lp, ls)


# --------------------------------------------------------------------------- the solver
def solve_nash_log(
    P: np.ndarray, log_ref: np.ndarray, beta: float, tol: float = 1e-13, max_iter: int = 200
) -> np.ndarray:
    """Log of the regularised Nash equilibrium (see :func:`solve_nash`); inputs assumed valid."""
    n = P.shape[0]
    # Fixed point in logits u (pi = softmax(u)): r(u) = u - log pi_ref - P softmax(u) / beta = const.
    # Newton on r with a backtracking line search on ||centred r||_2. The Jacobian
    # J = I - P (diag(pi) - pi pi^T) / beta = I - A S / beta (A = P - 1/2 antisymmetric, S psd)
    # has eigenvalues 1 - i*lambda, never singular. Fallback when the line search fails: steps of
    # the exact Nash-MP map with eta = 2 beta, a guaranteed contraction of KL(pi* || pi).
    floor = 64.0 * _EPS * (1.0 + np.max(np.abs(log_ref)) + 1.0 / beta)
    target = max(tol, floor)

    def residual(u: np.ndarray) -> np.ndarray:
        r = u - log_ref - (P @ np.exp(log_normalise(u))) / beta
        return r - r.mean()

    def mirror_prox(u: np.ndarray, iters: int) -> np.ndarray:
        eta = 2.0 * beta
        lp = log_normalise(u)
        for _ in range(iters):
            half = log_normalise((lp + eta * log_ref + (eta / beta) * (P @ np.exp(lp))) / (1 + eta))
            lp = log_normalise((lp + eta * log_ref + (eta / beta) * (P @ np.exp(half))) / (1 + eta))
        return lp

    u = log_normalise(log_ref + (P @ np.exp(log_ref)) / beta)  # one best-response step from pi_ref
    r = residual(u)
    res = float(r.max() - r.min())
    stalls = 0
    eye = np.eye(n)
    for _ in range(max_iter):
        if res <= target:
            break
        pi = np.exp(u)
        PS = P * pi[None, :] - np.outer(P @ pi, pi)  # P (diag(pi) - pi pi^T), O(n^2)
        d = np.linalg.solve(eye - PS / beta, -r)
        norm0 = float(np.linalg.norm(r))
        t, accepted = 1.0, False
        while t >= 2.0**-30:
            u_new = log_normalise(u + t * d)
            r_new = residual(u_new)
            if np.linalg.norm(r_new) <= (1.0 - 1e-4 * t) * norm0:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            if res < 1e-8:  # at the floating-point floor already
                break
            u = mirror_prox(u, 20)
            r = residual(u)
            res = float(r.max() - r.min())
            continue
        new_res = float(r_new.max() - r_new.min())
        stalls = stalls + 1 if new_res > 0.5 * res else 0
        u, r, res = u_new, r_new, new_res
        if stalls >= 3 and res < 1e-8:
            break
    if not res < max(1e-8, target):
        raise RuntimeError(f"solve_nash did not converge: fixed-point residual span {res:.3g} nats")
    return log_normalise(u)


def solve_nash(
    P: np.ndarray, pi_ref: np.ndarray, beta: float, tol: float = 1e-13, max_iter: int = 200
) -> np.ndarray:
    """The beta-regularised Nash equilibrium ``pi*`` of a preference matrix game, to machine precision.

    Solves the fixed point ``pi* ∝ pi_ref exp(P pi* / beta)`` (``docs/nash-mp.md``) by damped
    Newton in logit space (O(n^3) per step; a few steps), falling back to exact Nash-MP steps
    (eta = 2 beta) when the line search stalls.

    Args:
        P: preference matrix, shape ``(n, n)``.
        pi_ref: reference policy, shape ``(n,)``, strictly positive.
        beta: regularisation strength, > 0.
        tol: target for the fixed-point residual ``span(log pi - log BR(pi))`` in nats; the
            solver stops earlier only at the floating-point floor (~``64 eps (1 + 1/beta)``).
        max_iter: maximum number of Newton steps.

    Returns:
        ``pi*`` of shape ``(n,)``; its exploitability is ~1e-16 or below.

    Raises:
        GameError: malformed inputs.
        RuntimeError: no convergence within ``max_iter`` (residual span above 1e-8).
    """
    P = validate_preference_matrix(P)
    ref = validate_reference(pi_ref, P.shape[0])
    beta = validate_beta(beta)
    return np.exp(solve_nash_log(P, np.log(ref), beta, tol=tol, max_iter=max_iter))


__all__ = [
    "best_response",
    "exploitability",
    "exploitability_log",
    "kl",
    "kl_log",
    "log_best_response",
    "log_normalise",
    "solve_nash",
    "solve_nash_log",
    "span_log",
    "span_seminorm",
]

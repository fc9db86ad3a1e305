"""Exact (tabular) NLHF algorithms on matrix games: Nash-MP and its baselines.

Every algorithm below sees the game only through *preference queries*: one query is one
evaluation of ``a = P @ opponent`` (the win probabilities ``P(y > opponent)`` of every action
against a policy), the exact analogue of asking the judge about samples from ``opponent``.

- Nash-MP (Tiapkin et al., arXiv:2505.19731): two proximal steps per iteration, both anchored at
  ``pi_k`` (2 queries / iteration); closed form in :func:`nash_mp_step`.
- OMD / self-play / online IPO in expectation: the first half-step alone, iterated
  (1 query / iteration).
- Nash-MD (Munos et al., arXiv:2312.00886): geometric mixture with ``pi_ref``, then a mirror step
  against the mixture (1 query / iteration), ``lr_t = 2 / (beta (t + 2))``.
- EGPO (Zhou, Fazel, Du, arXiv:2503.08942): extragradient with multiplicative-weights steps on
  the KL-regularised game, in EGPO's step-size convention (2 queries / iteration); see
  :func:`run_egpo` for its exact relation to Nash-MP.

All iterates are kept as log-probabilities (shape ``(n,)``) and renormalised with logsumexp.

Why ``(1 + 2 beta)^(-N/2)`` holds exactly, with no constant (our derivation; the tests check it
at every iteration). Write ``A = P - 1/2`` (antisymmetric), ``g = A mu / beta`` for opponent ``mu``.
Each step maximises ``eta <pi, g> - eta KL(pi || pi_ref) - KL(pi || pi_k)``, which is
``(1 + eta)``-strongly concave relative to KL, so for any ``u``:
``(1 + eta) KL(u || pi_new) <= KL(u || pi_k) - KL(pi_new || pi_k) + eta [<g, pi_new - u> - KL(pi_new || pi_ref) + KL(u || pi_ref)]``.
Apply it to the full step with ``u = pi*`` and to the half-step with ``u = pi_{k+1}``, add, and use
(i) the Nash identity ``nu^T A pi* / beta - KL(nu || pi_ref) = -KL(pi* || pi_ref) - KL(nu || pi*)``
with ``nu = pi_{k+1/2}`` and ``nu^T A nu = 0``, and (ii) ``|x^T A y| <= ||x||_1 ||y||_1 / 2`` for
zero-sum ``x, y`` (entries of ``A`` lie in [-1/2, 1/2]) with Pinsker. The cross term is absorbed
when ``eta / (2 beta) <= 1``, leaving
``(1 + eta) KL(pi* || pi_{k+1}) <= KL(pi* || pi_k) - eta KL(pi_{k+1/2} || pi*)``.
Hence ``KL(pi* || pi_k) <= KL(pi* || pi_0) (1 + eta)^(-k)`` for every ``eta <= 2 beta`` and every
``n``; ``eta = 2 beta``, ``N = 2k`` gives the paper's rate. (Near ``pi*`` the observed
per-iteration factor is about ``(1 + eta)^(-2)``, twice as fast in log scale as the bound.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from nlhf.algorithms.equilibrium import (
    exploitability_log,
    kl_log,
    log_normalise,
    solve_nash_log,
    span_log,
)
from nlhf.algorithms.games import (
    GameError,
    validate_beta,
    validate_preference_matrix,
    validate_reference,
)

ALGORITHMS = ("nash-mp", "nash-md", "omd", "egpo")
"""Names accepted by :func:`run_algorithm` and ``nlhf game run --algorithm``."""


# --------------------------------------------------------------------------- the proximal step
def nash_mp_log_step(
    log_pi_k: np.ndarray, win_prob: np.ndarray, log_ref: np.ndarray, beta: float, eta: float
) -> np.ndarray:
    """Log-space proximal step (no validation): see :func:`nash_mp_step`.

    ``log pi_new = [log pi_k + eta log pi_ref + (eta / beta) a] / (1 + eta) - log Z``
    with ``a = win_prob = P @ opponent``. Arrays of shape ``(n,)`` (or ``(..., n)``).
    """
    return log_normalise((log_pi_k + eta * log_ref + (eta / beta) * win_prob) / (1.0 + eta))


def nash_mp_step(
    pi_k: np.ndarray,
    opponent: np.ndarray,
    P: np.ndarray,
    pi_ref: np.ndarray,
    beta: float,
    eta: float,
) -> np.ndarray:
    """One exact Nash-MP proximal step (``docs/nash-mp.md``, closed form derived there):

        argmax_pi  P(pi > opponent) - beta KL(pi || pi_ref) - (beta / eta) KL(pi || pi_k)
        = softmax( [log pi_k + eta log pi_ref + (eta / beta) P @ opponent] / (1 + eta) ).

    With ``opponent = pi_k`` this is the half-step (and one OMD step); with
    ``opponent = pi_{k+1/2}`` it is the full step. Costs one preference query.

    Args:
        pi_k: anchor policy, shape ``(n,)``, strictly positive.
        opponent: opponent policy, shape ``(n,)``.
        P: preference matrix, shape ``(n, n)`` (validate with ``validate_preference_matrix``
            once; only its shape is checked here).
        pi_ref: reference policy, shape ``(n,)``, strictly positive.
        beta: KL-to-reference strength, > 0.
        eta: step size, > 0 (proximal term weight ``beta / eta``; Nash-MP's theory: eta <= 2 beta).

    Returns:
        The new policy, shape ``(n,)``.

    Raises:
        GameError: shape mismatch, non-positive ``beta``/``eta``, non-positive anchor/reference.
    """
    beta = validate_beta(beta)
    eta = _validate_eta(eta)
    pi_k, opponent, pi_ref = (np.asarray(x, dtype=np.float64) for x in (pi_k, opponent, pi_ref))
    P = np.asarray(P, dtype=np.float64)
    n = pi_ref.shape[-1] if pi_ref.ndim else 0
    if P.shape != (n, n) or pi_k.shape != (n,) or opponent.shape != (n,) or pi_ref.shape != (n,):
        raise GameError(
            f"shape mismatch: pi_k {pi_k.shape}, opponent {opponent.shape}, P {P.shape}, "
            f"pi_ref {pi_ref.shape}"
        )
    if np.any(pi_k <= 0) or np.any(pi_ref <= 0):
        raise GameError("anchor policy and reference policy must be strictly positive")
    return np.exp(nash_mp_log_step(np.log(pi_k), P @ opponent, np.log(pi_ref), beta, eta))


def _validate_eta(eta: float, name: str = "eta") -> float:
    e = float(eta)
    if not np.isfinite(e) or e <= 0.0:
        raise GameError(f"{name} must be a finite number > 0, got {eta!r}")
    return e


def default_eta(algorithm: str, beta: float) -> float | None:
    """Default step for ``algorithm`` at regularisation ``beta``.

    ``nash-mp`` and ``omd``: ``2 beta`` (the largest step of Nash-MP's linear-rate theorem).
    ``egpo``: ``1 / (1 + beta)`` in EGPO's own step convention (equivalent to the Nash-MP step
    ``eta = beta``, see :func:`run_egpo`). ``nash-md``: ``None`` (the ``2 / (beta (t + 2))``
    schedule).
    """
    if algorithm in ("nash-mp", "omd"):
        return 2.0 * beta
    if algorithm == "egpo":
        return 1.0 / (1.0 + beta)
    if algorithm == "nash-md":
        return None
    raise GameError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


# --------------------------------------------------------------------------- traces
@dataclass
class GameTrace:
    """Convergence record of one exact run on a matrix game.

    Lists have one entry per iteration plus a first entry for the initial policy (queries 0).

    Attributes:
        algorithm: one of ``ALGORITHMS``.
        beta: regularisation strength.
        eta: step size used (``None`` for Nash-MD's ``2 / (beta (t + 2))`` schedule; for Nash-MD
            with a constant rate, that rate; for EGPO, EGPO's own step size).
        queries: cumulative preference queries after each iteration.
        kl_to_nash: ``KL(pi* || pi_k)`` in nats.
        exploitability: ``max_pi' P_beta(pi' > pi_k) - 1/2``.
        span: ``max - min`` of ``log pi_k - log pi*`` in nats.
        policy: final policy, length ``n``.
        nash: the regularised Nash equilibrium ``pi*``, length ``n``.
        extra: algorithm-specific settings (e.g. ``{"optimistic": true}``).
    """

    algorithm: str
    beta: float
    eta: float | None
    queries: list[int] = field(default_factory=list)
    kl_to_nash: list[float] = field(default_factory=list)
    exploitability: list[float] = field(default_factory=list)
    span: list[float] = field(default_factory=list)
    policy: list[float] = field(default_factory=list)
    nash: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-JSON dict with the fields above (lists of floats/ints)."""
        return asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "GameTrace":
        """Inverse of :meth:`to_json_dict`; raises ``GameError`` on missing/inconsistent fields."""
        required = ("algorithm", "beta", "eta", "queries", "kl_to_nash", "exploitability", "span")
        missing = [k for k in required if k not in d]
        if missing:
            raise GameError(f"run record lacks field(s): {', '.join(missing)}")
        try:
            t = cls(**{k: d[k] for k in d if k in cls.__dataclass_fields__})
            t.queries = [int(q) for q in t.queries]
            for key in ("kl_to_nash", "exploitability", "span", "policy", "nash"):
                setattr(t, key, [float(x) for x in getattr(t, key)])
            t.beta = float(t.beta)
            t.eta = None if t.eta is None else float(t.eta)
        except (TypeError, ValueError) as e:
            raise GameError(f"run record has a malformed field: {e}") from None
        m = len(t.queries)
        if not (len(t.kl_to_nash) == len(t.exploitability) == len(t.span) == m) or m == 0:
            raise GameError("run record lists (queries, kl_to_nash, exploitability, span) differ in length")
        return t


class _Recorder:
    """Records the three distances to ``pi*`` for log-policies; counts queries."""

    def __init__(self, trace: GameTrace, P: np.ndarray, log_ref: np.ndarray, log_star: np.ndarray):
        self.trace, self.P, self.log_ref, self.log_star = trace, P, log_ref, log_star
        self.queries = 0

    def query(self, pi_log: np.ndarray) -> np.ndarray:
        """One preference query: win probabilities ``P @ pi`` of every action, shape ``(n,)``."""
        self.queries += 1
        return self.P @ np.exp(pi_log)

    def record(self, log_pi: np.ndarray) -> None:
        t = self.trace
        t.queries.append(self.queries)
        t.kl_to_nash.append(kl_log(self.log_star, log_pi))
        t.exploitability.append(exploitability_log(log_pi, self.P, self.log_ref, t.beta))
        t.span.append(span_log(log_pi, self.log_star))

    def finish(self, log_pi: np.ndarray) -> GameTrace:
        self.trace.policy = np.exp(log_pi).tolist()
        self.trace.nash = np.exp(self.log_star).tolist()
        return self.trace


def _setup(
    algorithm: str,
    P: np.ndarray,
    pi_ref: np.ndarray,
    beta: float,
    eta: float | None,
    max_queries: int,
    pi0: np.ndarray | None,
    nash: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, _Recorder]:
    P = validate_preference_matrix(P)
    n = P.shape[0]
    ref = validate_reference(pi_ref, n)
    beta = validate_beta(beta)
    if isinstance(max_queries, bool) or int(max_queries) != max_queries or max_queries < 0:
        raise GameError(f"max_queries must be an integer >= 0, got {max_queries!r}")
    log_ref = np.log(ref)
    if nash is None:
        log_star = solve_nash_log(P, log_ref, beta)
    else:
        log_star = np.log(validate_reference(nash, n))
    log_pi = log_ref.copy() if pi0 is None else np.log(validate_reference(pi0, n))
    rec = _Recorder(GameTrace(algorithm=algorithm, beta=beta, eta=eta), P, log_ref, log_star)
    rec.record(log_pi)
    return P, log_ref, beta, log_pi, rec


# --------------------------------------------------------------------------- algorithms
def run_nash_mp(
    P: np.ndarray,
    pi_ref: np.ndarray,
    beta: float,
    eta: float,
    max_queries: int,
    pi0: np.ndarray | None = None,
    nash: np.ndarray | None = None,
) -> GameTrace:
    """Exact Nash Mirror Prox (arXiv:2505.19731; ``docs/nash-mp.md``), 2 queries per iteration.

        pi_{k+1/2} = step(anchor pi_k, opponent pi_k)
        pi_{k+1}   = step(anchor pi_k, opponent pi_{k+1/2})       (step = :func:`nash_mp_step`)

    Guarantee (derived in this module's docstring): for ``eta <= 2 beta``,
    ``KL(pi* || pi_{k+1}) <= KL(pi* || pi_k) / (1 + eta)``, so with ``eta = 2 beta`` and
    ``N = 2k`` queries ``KL(pi* || pi_k) <= KL(pi* || pi_0) (1 + 2 beta)^(-N/2)`` for any ``n``.

    Args:
        P: preference matrix ``(n, n)``; pi_ref: ``(n,)``; beta > 0; eta > 0.
        max_queries: query budget; runs ``max_queries // 2`` iterations.
        pi0: initial policy ``(n,)`` (default ``pi_ref``).
        nash: precomputed ``pi*`` ``(n,)`` (default: :func:`solve_nash`).

    Returns:
        A :class:`GameTrace`.
    """
    eta = _validate_eta(eta)
    P, log_ref, beta, log_pi, rec = _setup("nash-mp", P, pi_ref, beta, eta, max_queries, pi0, nash)
    while rec.queries + 2 <= max_queries:
        half = nash_mp_log_step(log_pi, rec.query(log_pi), log_ref, beta, eta)  # extrapolation
        log_pi = nash_mp_log_step(log_pi, rec.query(half), log_ref, beta, eta)  # update
        rec.record(log_pi)
    return rec.finish(log_pi)


def run_omd(
    P: np.ndarray,
    pi_ref: np.ndarray,
    beta: float,
    eta: float,
    max_queries: int,
    pi0: np.ndarray | None = None,
    nash: np.ndarray | None = None,
) -> GameTrace:
    """Online mirror descent / self-play (online IPO in expectation), 1 query per iteration.

    ``pi_{k+1} = nash_mp_step(anchor pi_k, opponent pi_k)``: Nash-MP's half-step alone. Same
    arguments as :func:`run_nash_mp`; returns a :class:`GameTrace`.
    """
    eta = _validate_eta(eta)
    P, log_ref, beta, log_pi, rec = _setup("omd", P, pi_ref, beta, eta, max_queries, pi0, nash)
    while rec.queries + 1 <= max_queries:
        log_pi = nash_mp_log_step(log_pi, rec.query(log_pi), log_ref, beta, eta)
        rec.record(log_pi)
    return rec.finish(log_pi)


def run_nash_md(
    P: np.ndarray,
    pi_ref: np.ndarray,
    beta: float,
    max_queries: int,
    lr: float | None = None,
    pi0: np.ndarray | None = None,
    nash: np.ndarray | None = None,
) -> GameTrace:
    """Exact Nash-MD (Munos et al., arXiv:2312.00886), 1 query per iteration:

        pi_mix  ∝ pi_t^(1 - lr_t beta) pi_ref^(lr_t beta)
        pi_{t+1} ∝ pi_mix exp(lr_t P @ pi_mix)

    Args:
        lr: constant learning rate with ``0 < lr beta <= 1``; ``None`` (default) uses
            ``lr_t = 2 / (beta (t + 2))``, t = 0, 1, ... (O(1/T) convergence of KL).
        Others as in :func:`run_nash_mp`.

    Returns:
        A :class:`GameTrace` (``eta`` holds ``lr``, ``None`` for the schedule).
    """
    if lr is not None:
        lr = _validate_eta(lr, "lr")
        if lr * float(beta) > 1.0:
            raise GameError(f"Nash-MD needs lr * beta <= 1, got lr={lr} beta={beta}")
    P, log_ref, beta, log_pi, rec = _setup("nash-md", P, pi_ref, beta, lr, max_queries, pi0, nash)
    t = 0
    while rec.queries + 1 <= max_queries:
        lr_t = 2.0 / (beta * (t + 2)) if lr is None else lr
        log_mix = log_normalise((1.0 - lr_t * beta) * log_pi + lr_t * beta * log_ref)
        log_pi = log_normalise(log_mix + lr_t * rec.query(log_mix))
        rec.record(log_pi)
        t += 1
    return rec.finish(log_pi)


def run_egpo(
    P: np.ndarray,
    pi_ref: np.ndarray,
    beta: float,
    eta: float,
    max_queries: int,
    optimistic: bool = False,
    pi0: np.ndarray | None = None,
    nash: np.ndarray | None = None,
) -> GameTrace:
    """Tabular EGPO (Zhou, Fazel, Du, arXiv:2503.08942): extragradient on the KL-regularised game.

    Multiplicative-weights extragradient (the entropy-regularised extragradient of Cen, Wei, Chi,
    arXiv:2105.15186, with the entropy replaced by KL to ``pi_ref``), in EGPO's step convention:

        log pi_{t+1/2} = (1 - eta beta) log pi_t + eta beta log pi_ref + eta P @ pi_t        - log Z
        log pi_{t+1}   = (1 - eta beta) log pi_t + eta beta log pi_ref + eta P @ pi_{t+1/2}  - log Z

    (2 queries per iteration). Relation to Nash-MP (derived): this is exactly Nash-MP's map with
    step ``eta_MP = eta beta / (1 - eta beta)``; equivalently Nash-MP with ``eta_MP`` is EGPO with
    ``eta = eta_MP / (beta (1 + eta_MP))``. So in the exact tabular setting the two methods
    differ only by step-size parametrisation and the theory that licenses a step; Nash-MP's
    ``eta_MP = 2 beta`` corresponds to EGPO's ``eta = 2 / (1 + 2 beta)``. The default used by
    ``run_algorithm`` / the CLI, ``eta = 1 / (1 + beta)``, corresponds to ``eta_MP = beta``.

    ``optimistic=True`` gives the optimistic (OMWU-style) variant: the extrapolation reuses the
    previous iteration's query ``P @ pi_{t-1/2}`` instead of querying ``P @ pi_t``, so each
    iteration costs 1 query (plus 1 at the start).

    Args:
        eta: EGPO's step size, with ``0 < eta beta < 1``.
        Others as in :func:`run_nash_mp`.

    Returns:
        A :class:`GameTrace` (``extra = {"optimistic": ...}``).

    Raises:
        GameError: malformed inputs or ``eta beta >= 1``.
    """
    eta = _validate_eta(eta)
    if eta * float(beta) >= 1.0:
        raise GameError(f"EGPO needs eta * beta < 1, got eta={eta} beta={beta}")
    P, log_ref, beta, log_pi, rec = _setup("egpo", P, pi_ref, beta, eta, max_queries, pi0, nash)
    rec.trace.extra = {"optimistic": bool(optimistic)}
    w = eta * beta

    def step(anchor: np.ndarray, win_prob: np.ndarray) -> np.ndarray:
        return log_normalise((1.0 - w) * anchor + w * log_ref + eta * win_prob)

    if not optimistic:
        while rec.queries + 2 <= max_queries:
            half = step(log_pi, rec.query(log_pi))
            log_pi = step(log_pi, rec.query(half))
            rec.record(log_pi)
    else:
        last: np.ndarray | None = None
        while rec.queries + (1 if last is not None else 2) <= max_queries:
            if last is None:
                last = rec.query(log_pi)
            half = step(log_pi, last)
            last = rec.query(half)
            log_pi = step(log_pi, last)
            rec.record(log_pi)
    return rec.finish(log_pi)


_RUNNERS: dict[str, Callable[..., GameTrace]] = {
    "nash-mp": run_nash_mp,
    "omd": run_omd,
    "egpo": run_egpo,
}


def run_algorithm(
    name: str,
    P: np.ndarray,
    pi_ref: np.ndarray,
    beta: float,
    max_queries: int,
    eta: float | None = None,
    pi0: np.ndarray | None = None,
    nash: np.ndarray | None = None,
) -> GameTrace:
    """Run the exact algorithm ``name`` in ``ALGORITHMS`` on a matrix game.

    ``eta=None`` uses :func:`default_eta`. For ``nash-md``, ``eta`` is a constant learning rate
    (``None``: the ``2 / (beta (t + 2))`` schedule). Returns a :class:`GameTrace`.

    Raises:
        GameError: unknown algorithm or malformed inputs.
    """
    if name not in ALGORITHMS:
        raise GameError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    beta = validate_beta(beta)
    if name == "nash-md":
        return run_nash_md(P, pi_ref, beta, max_queries, lr=eta, pi0=pi0, nash=nash)
    if eta is None:
        eta = default_eta(name, beta)
    return _RUNNERS[name](P, pi_ref, beta, eta, max_queries, pi0=pi0, nash=nash)


__all__ = [
    "ALGORITHMS",
    "GameTrace",
    "default_eta",
    "nash_mp_log_step",
    "nash_mp_step",
    "run_algorithm",
    "run_egpo",
    "run_nash_md",
    "run_nash_mp",
    "run_omd",
]

"""Stochastic estimators of one proximal (mirror-prox) step, and the baselines' losses.

Every function here takes batched **sequence** log-probabilities: tensors of shape ``(B,)``
holding ``log pi(y_i | x_i) = sum_t log pi(y_{i,t} | x_i, y_{i,<t})`` in nats.  A one-token
"language model" (a softmax over an action set) and a causal LM are therefore treated the same
way; the learner computes the per-sequence sums and calls these functions unchanged.

Conventions shared by all functions
-----------------------------------
``logp``          log pi_theta(y_i|x_i), the policy being trained; the only input that carries
                  gradient.
``logp_ref``      log pi_ref(y_i|x_i), the reference policy of the beta-regularised game.
``logp_anchor``   log pi_k(y_i|x_i), the proximal anchor of Nash-MP (both half and full step are
                  anchored at pi_k).
``logp_sampler``  log mu(y_i|x_i), the behaviour policy that generated ``y_i`` (pi_k in Nash-MP);
                  used for importance weighting when inner optimiser steps move pi_theta away
                  from it.
``preference``    ``preference[i] = P(y_i > y'_i | x_i)`` in [0, 1], the judge's probability that
                  ``y_i`` beats an opponent sample ``y'_i`` (what the opponent is drawn from is
                  the caller's business: pi_k, pi_{k+1/2}, the geometric mixture, ...).
``pair_index``    integer tensor ``(B,)``; sample ``i`` is paired with ``pair_index[i]`` in the
                  same batch (which should share the prompt ``x_i``).
``sample_weight`` optional ``(B,)`` non-negative, detached weight of each sample's term in the
                  batch mean (e.g. the learner's truncated correction ``min(pi_k/pi_engine, cap)``
                  of the engine-learner gap); a pair term ``(i, pair_index[i])`` is weighted by
                  ``sample_weight[i] * sample_weight[pair_index[i]]`` (the pair's joint density
                  ratio). None: all 1.

All reference/anchor/sampler log-probabilities and preferences are detached inside; passing
tensors that require grad is fine.  Every loss is a scalar to *minimise*.  Invalid inputs
(not 1-D, mismatched shapes, empty batch, NaN/inf, preference outside [0, 1], bad
``pair_index``, ``beta <= 0``, ``eta <= 0``, ``clip <= 0``) raise ``ValueError`` naming the
argument and its value.

Maths: ``/work/shared/docs/nash-mp.md``, section "Stochastic Nash-MP for language models"
(Tiapkin et al., arXiv:2505.19731).  Proximal objective for opponent ``mu`` and anchor ``pi_k``:

    J(theta) = E_{y~pi_theta, y'~mu}[P(y > y')] - beta KL(pi_theta||pi_ref)
               - (beta/eta) KL(pi_theta||pi_k)

whose exact maximiser is
``log pi_new = [log pi_k + eta log pi_ref + (eta/beta) a(y)] / (1 + eta) - log Z``, with
``a(y) = P(y > mu)``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

__all__ = [
    "LossOutput",
    "proximal_pg_loss",
    "proximal_regression_loss",
    "proximal_loss",
    "online_ipo_loss",
    "egpo_loss",
    "nash_md_pg_loss",
    "geometric_mixture_logits",
]

# Importance ratios are formed as exp(min(log_ratio, LOG_RATIO_CAP)).  Sequence log-prob
# differences can be tens of nats; without the cap exp() overflows to inf and the clipped
# surrogate's backward produces 0 * inf = NaN.  Beyond the cap the sample gets no gradient.
LOG_RATIO_CAP = 20.0
DUAL_CLIP = 3.0
"""Dual-clip constant c of :func:`_clipped_pg` (Ye et al. 2020 use c = 3): a term with a negative
weight is at least ``c * w``."""


class LossOutput(NamedTuple):
    """A loss to minimise and detached scalar diagnostics.

    ``loss``: 0-dim tensor (differentiable w.r.t. whatever produced ``logp``).
    ``metrics``: plain Python floats, keyed by name (see each loss for the keys).
    """

    loss: torch.Tensor
    metrics: dict[str, float]


# --------------------------------------------------------------------------- validation


def _check_logp(name: str, t: object, batch: int | None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D of shape (B,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({batch},) like logp")
    if not torch.is_floating_point(t):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite, got {name}[{i}] = {float(t[i])}")
    return t


def _check_preference(preference: object, batch: int) -> torch.Tensor:
    p = _check_logp("preference", preference, batch)
    p = p.detach()
    out = (p < 0) | (p > 1)
    if bool(out.any()):
        i = int(out.nonzero()[0, 0])
        raise ValueError(f"preference must lie in [0, 1], got preference[{i}] = {float(p[i])}")
    return p


def _check_pair_index(pair_index: object, batch: int) -> torch.Tensor:
    if not isinstance(pair_index, torch.Tensor):
        raise ValueError(f"pair_index must be a torch.Tensor, got {type(pair_index).__name__}")
    if pair_index.dim() != 1 or pair_index.shape[0] != batch:
        raise ValueError(f"pair_index has shape {tuple(pair_index.shape)}, expected ({batch},) like logp")
    if pair_index.dtype.is_floating_point or pair_index.dtype.is_complex or pair_index.dtype == torch.bool:
        raise ValueError(f"pair_index must be an integer tensor, got dtype {pair_index.dtype}")
    bad = (pair_index < 0) | (pair_index >= batch)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"pair_index must lie in [0, {batch}), got pair_index[{i}] = {int(pair_index[i])}")
    return pair_index.long()


def _check_positive(name: str, value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _check_clip(clip: object) -> float | None:
    if clip is None:
        return None
    return _check_positive("clip", clip)


def _check_sample_weight(sample_weight: object, batch: int) -> torch.Tensor | None:
    if sample_weight is None:
        return None
    w = _check_logp("sample_weight", sample_weight, batch).detach()
    bad = w < 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"sample_weight must be >= 0, got sample_weight[{i}] = {float(w[i])}")
    return w


def _same_device(logp: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device}, but logp is on {logp.device}")


# --------------------------------------------------------------------------- shared cores


def _clipped_pg(
    logp: torch.Tensor, logp_sampler: torch.Tensor, weight: torch.Tensor, clip: float | None,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance-weighted REINFORCE surrogate with a PPO-style pessimistic clip and a dual clip.

    ``weight`` is detached.  With ``rho = pi_theta / mu`` the per-sample objective is
    ``min(rho * w, clip(rho, 1 - clip, 1 + clip) * w)`` (``rho * w`` when ``clip`` is None);
    the loss is minus its batch mean (each term times ``sample_weight`` when given).  Its gradient is ``-mean(w * rho * grad log pi_theta)``
    over the samples whose clipped branch is not selected, zero for the others.

    Dual clip (Ye et al. 2020, arXiv:1912.09729, eq. 5): for ``w < 0`` the pessimistic bound alone
    keeps ``rho * w`` however large ``rho`` is, and a sequence-level ratio of a language model
    reaches ``e^20`` after one optimiser step, so one sample's gradient would swamp the batch.
    With ``clip`` set, such terms are floored at ``DUAL_CLIP * w`` (and then carry no gradient).
    """
    log_rho = (logp - logp_sampler).clamp(max=LOG_RATIO_CAP)
    rho = torch.exp(log_rho)
    unclipped = rho * weight
    if clip is None:
        objective = unclipped
        clipped_mask = torch.zeros_like(weight, dtype=torch.bool)
    else:
        lo = max(1.0 - clip, 0.0)
        clipped = rho.clamp(min=lo, max=1.0 + clip) * weight
        objective = torch.minimum(unclipped, clipped)
        # The clipped branch is the one taken (and has no gradient) when it is strictly lower.
        clipped_mask = (clipped < unclipped).detach()
        floor = DUAL_CLIP * weight
        dual = (weight < 0) & (objective < floor).detach()
        objective = torch.where(dual, floor, objective)
        clipped_mask = clipped_mask | dual
    loss = -(objective if sample_weight is None else objective * sample_weight).mean()
    with torch.no_grad():
        r = rho.detach()
        metrics = {
            "ratio_mean": float(r.mean()),
            "ratio_max": float(r.max()),
            "ratio_min": float(r.min()),
            "clip_frac": float(clipped_mask.float().mean()),
        }
    return loss, metrics


def _pg_weight(
    preference: torch.Tensor,
    log_ratio_ref: torch.Tensor,
    log_ratio_anchor: torch.Tensor | None,
    beta: float,
    eta: float | None,
) -> torch.Tensor:
    """w(y) = (P(y > y') - 1/2) - beta log(pi/pi_ref)(y) [- (beta/eta) log(pi/pi_k)(y)], detached."""
    w = (preference - 0.5) - beta * log_ratio_ref
    if log_ratio_anchor is not None and eta is not None:
        w = w - (beta / eta) * log_ratio_anchor
    return w.detach()


def _pair_regression(h_theta: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                     pair_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    residual = h_theta - target.detach()
    sq = residual.pow(2)
    if sample_weight is not None:
        sq = sq * (sample_weight * sample_weight[pair_index])
    loss = sq.mean()
    with torch.no_grad():
        metrics = {
            "target_mean": float(target.mean()),
            "target_abs_mean": float(target.abs().mean()),
            "h_abs_mean": float(h_theta.detach().abs().mean()),
            "residual_rms": float(residual.detach().pow(2).mean().sqrt()),
        }
    return loss, metrics


# --------------------------------------------------------------------------- Nash-MP estimators


def _pg_metrics(loss: torch.Tensor, w: torch.Tensor, preference: torch.Tensor, log_ratio_ref: torch.Tensor,
                log_ratio_anchor: torch.Tensor | None, clip_metrics: dict[str, float]) -> dict[str, float]:
    """Metrics shared by the policy-gradient losses (``kl_anchor`` only when there is an anchor)."""
    out = {
        "loss": float(loss.detach()),
        "pg_weight_mean": float(w.mean()),
        "pg_weight_std": float(w.std(unbiased=False)),
        "preference_mean": float(preference.mean()),
        "kl_ref": float(log_ratio_ref.mean()),
    }
    if log_ratio_anchor is not None:
        out["kl_anchor"] = float(log_ratio_anchor.mean())
    return {**out, **clip_metrics}


def proximal_pg_loss(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    logp_anchor: torch.Tensor,
    logp_sampler: torch.Tensor,
    preference: torch.Tensor,
    *,
    beta: float,
    eta: float,
    clip: float | None = 0.2,
    sample_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Policy-gradient estimator of one Nash-MP proximal step (Nash-MD-PG style, 1/2 baseline).

    Implements the policy-gradient estimator of nash-mp.md ("Stochastic Nash-MP for language
    models"; Tiapkin et al. arXiv:2505.19731, proximal steps of Nash Mirror Prox) for the
    objective ``J(theta) = E_{y~pi_theta}[P(y > mu)] - beta KL(pi_theta||pi_ref)
    - (beta/eta) KL(pi_theta||pi_k)``.  Per sample (detached)::

        w(y) = (P(y > y') - 1/2) - beta log(pi_theta/pi_ref)(y) - (beta/eta) log(pi_theta/pi_k)(y)

    Since ``E_{pi_theta}[grad log pi_theta] = 0``, ``E_{y~pi_theta}[w(y) grad log pi_theta(y)]``
    equals ``grad J`` exactly (the KLs' ``+1`` terms and the 1/2 baseline drop out).  ``y`` is
    drawn from ``mu`` (``logp_sampler``), so with ``rho = pi_theta/mu`` the surrogate is::

        loss = -mean_i min( rho_i w_i, clip(rho_i, 1 - clip, 1 + clip) w_i )

    (``clip=None``: ``loss = -mean_i rho_i w_i``, an unbiased estimator of ``-grad J``.)  The
    gradient is ``-mean_i w_i rho_i grad log pi_theta(y_i)`` over samples whose ratio has not left
    the trust region in the direction ``w_i`` pushes it (PPO's pessimistic bound), zero for the
    others; when ``pi_theta == mu`` (``rho = 1``, first inner step) it is exactly the plain
    REINFORCE gradient ``-mean_i w_i grad log pi_theta(y_i)``.  The clip only slows a step that
    moves far from ``mu``; a fixed point ``pi_k = pi*`` stays one.  Ratios are formed from
    ``min(log rho, 20)`` to avoid overflow.

    Args:
        logp: (B,) log pi_theta(y|x), requires grad.
        logp_ref: (B,) log pi_ref(y|x).
        logp_anchor: (B,) log pi_k(y|x), the proximal anchor.
        logp_sampler: (B,) log mu(y|x) of the policy that generated y.
        preference: (B,) P(y_i > y'_i | x_i) in [0, 1] against an opponent sample.
        beta: KL-regularisation strength of the game, > 0.
        eta: proximal step size, > 0 (the anchor KL is weighted by beta/eta).
        clip: PPO clip range epsilon > 0 (ratios clipped to [max(1 - clip, 0), 1 + clip]), or None
            for plain importance weighting.
        sample_weight: optional (B,) detached weights >= 0 of the samples' terms.

    Returns:
        LossOutput; metrics ``loss, pg_weight_mean, pg_weight_std, preference_mean, kl_ref,
        kl_anchor, ratio_mean, ratio_min, ratio_max, clip_frac``.  ``kl_ref``/``kl_anchor`` are
        the sample means of ``log(pi_theta/pi_ref)``/``log(pi_theta/pi_k)`` (KL estimates when
        ``mu == pi_theta``).

    Raises:
        ValueError: on invalid inputs (see module docstring).
    """
    logp = _check_logp("logp", logp, None)
    batch = logp.shape[0]
    logp_ref = _check_logp("logp_ref", logp_ref, batch).detach()
    logp_anchor = _check_logp("logp_anchor", logp_anchor, batch).detach()
    logp_sampler = _check_logp("logp_sampler", logp_sampler, batch).detach()
    preference = _check_preference(preference, batch)
    sample_weight = _check_sample_weight(sample_weight, batch)
    _same_device(logp, logp_ref=logp_ref, logp_anchor=logp_anchor, logp_sampler=logp_sampler, preference=preference)
    beta = _check_positive("beta", beta)
    eta = _check_positive("eta", eta)
    clip = _check_clip(clip)

    with torch.no_grad():
        log_ratio_ref = logp.detach() - logp_ref
        log_ratio_anchor = logp.detach() - logp_anchor
        w = _pg_weight(preference, log_ratio_ref, log_ratio_anchor, beta, eta)
    loss, metrics = _clipped_pg(logp, logp_sampler, w, clip, sample_weight)
    return LossOutput(loss, _pg_metrics(loss, w, preference, log_ratio_ref, log_ratio_anchor, metrics))


def proximal_regression_loss(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    logp_anchor: torch.Tensor,
    preference: torch.Tensor,
    pair_index: torch.Tensor,
    *,
    beta: float,
    eta: float,
    sample_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Regression (IPO/EGPO-style) estimator of one Nash-MP proximal step.

    Derived from the closed form of the proximal step (nash-mp.md, "Exact (tabular) Nash-MP"
    and "Stochastic Nash-MP for language models"; Tiapkin et al. arXiv:2505.19731)::

        log pi_new(y) = [log pi_k(y) + eta log pi_ref(y) + (eta/beta) a(y)] / (1 + eta) - log Z

    For pairs ``(i, j = pair_index[i])`` with ``h_pi = log pi(y_i) - log pi(y_j)`` (Z cancels)::

        target_i = [h_anchor + eta h_ref + (eta/beta) (preference[i] - preference[j])] / (1 + eta)
        loss     = mean_i (h_theta_i - target_i)^2

    ``preference[i]`` is a one-sample estimate of ``a(y_i) = P(y_i > mu)``; as the opponents are
    independent of the pair, ``E[target | y_i, y_j]`` is the exact closed-form log-ratio, so the
    population minimiser is the exact proximal step on the support of the sampler.  Self-pairs
    (``pair_index[i] == i``) have zero residual and contribute no gradient (they still count in
    the mean).

    Args:
        logp: (B,) log pi_theta(y|x), requires grad.
        logp_ref: (B,) log pi_ref(y|x).
        logp_anchor: (B,) log pi_k(y|x).
        preference: (B,) P(y_i > y'_i | x_i) in [0, 1] against an opponent sample.
        pair_index: (B,) integer tensor, partner of each sample in the batch (same prompt).
        beta: > 0.  eta: > 0.
        sample_weight: optional (B,) detached weights >= 0; pair term i is weighted by
            ``sample_weight[i] * sample_weight[pair_index[i]]``.

    Returns:
        LossOutput; metrics ``loss, target_mean, target_abs_mean, h_abs_mean, residual_rms,
        preference_mean, kl_ref, kl_anchor`` (``kl_*``: sample means of the log-ratios).

    Raises:
        ValueError: on invalid inputs (see module docstring).
    """
    logp = _check_logp("logp", logp, None)
    batch = logp.shape[0]
    logp_ref = _check_logp("logp_ref", logp_ref, batch).detach()
    logp_anchor = _check_logp("logp_anchor", logp_anchor, batch).detach()
    preference = _check_preference(preference, batch)
    pair_index = _check_pair_index(pair_index, batch)
    sample_weight = _check_sample_weight(sample_weight, batch)
    _same_device(logp, logp_ref=logp_ref, logp_anchor=logp_anchor, preference=preference, pair_index=pair_index)
    beta = _check_positive("beta", beta)
    eta = _check_positive("eta", eta)

    j = pair_index
    h_theta = logp - logp[j]
    with torch.no_grad():
        h_anchor = logp_anchor - logp_anchor[j]
        h_ref = logp_ref - logp_ref[j]
        gap = preference - preference[j]
        target = (h_anchor + eta * h_ref + (eta / beta) * gap) / (1.0 + eta)
    loss, metrics = _pair_regression(h_theta, target, sample_weight, pair_index)
    with torch.no_grad():
        metrics = {
            "loss": float(loss.detach()),
            **metrics,
            "preference_mean": float(preference.mean()),
            "kl_ref": float((logp.detach() - logp_ref).mean()),
            "kl_anchor": float((logp.detach() - logp_anchor).mean()),
        }
    return LossOutput(loss, metrics)


def proximal_loss(
    estimator: Literal["pg", "regression"],
    *,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    logp_anchor: torch.Tensor,
    logp_sampler: torch.Tensor | None = None,
    preference: torch.Tensor,
    pair_index: torch.Tensor | None = None,
    beta: float,
    eta: float,
    clip: float | None = 0.2,
    sample_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Loss of one Nash-MP proximal step with the chosen estimator (the learner's entry point).

    ``"pg"`` calls :func:`proximal_pg_loss` (needs ``logp_sampler``; ``pair_index`` ignored),
    ``"regression"`` calls :func:`proximal_regression_loss` (needs ``pair_index``;
    ``logp_sampler`` and ``clip`` ignored).  All tensors are (B,); see those functions
    (``sample_weight`` is passed to either).

    Raises:
        ValueError: unknown ``estimator``, a required tensor is None, or invalid inputs.
    """
    if estimator == "pg":
        if logp_sampler is None:
            raise ValueError("logp_sampler is required for estimator='pg', got None")
        return proximal_pg_loss(
            logp, logp_ref, logp_anchor, logp_sampler, preference, beta=beta, eta=eta, clip=clip,
            sample_weight=sample_weight,
        )
    if estimator == "regression":
        if pair_index is None:
            raise ValueError("pair_index is required for estimator='regression', got None")
        return proximal_regression_loss(logp, logp_ref, logp_anchor, preference, pair_index, beta=beta, eta=eta,
                                        sample_weight=sample_weight)
    raise ValueError(f"estimator must be 'pg' or 'regression', got {estimator!r}")


# --------------------------------------------------------------------------- baselines


def _reference_pair_regression(logp: torch.Tensor, logp_ref: torch.Tensor, preference: torch.Tensor,
                               pair_index: torch.Tensor, beta: float, *, against_opponent: bool,
                               sample_weight: torch.Tensor | None = None) -> LossOutput:
    """Shared body of :func:`online_ipo_loss` (``against_opponent=False``: target
    ``(preference[i] - 1/2)/beta``) and :func:`egpo_loss` (``True``: target
    ``(preference[i] - preference[j])/beta``); regresses the reference-relative log-ratio of
    each pair ``(i, j = pair_index[i])`` onto the target."""
    logp = _check_logp("logp", logp, None)
    batch = logp.shape[0]
    logp_ref = _check_logp("logp_ref", logp_ref, batch).detach()
    preference = _check_preference(preference, batch)
    pair_index = _check_pair_index(pair_index, batch)
    sample_weight = _check_sample_weight(sample_weight, batch)
    _same_device(logp, logp_ref=logp_ref, preference=preference, pair_index=pair_index)
    beta = _check_positive("beta", beta)

    j = pair_index
    h = (logp - logp[j]) - (logp_ref - logp_ref[j])
    target = ((preference - preference[j]) if against_opponent else (preference - 0.5)) / beta
    loss, metrics = _pair_regression(h, target, sample_weight, pair_index)
    metrics = {
        "loss": float(loss.detach()),
        **metrics,
        "preference_mean": float(preference.mean()),
        "kl_ref": float((logp.detach() - logp_ref).mean()),
    }
    return LossOutput(loss, metrics)


def online_ipo_loss(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    preference: torch.Tensor,
    pair_index: torch.Tensor,
    *,
    beta: float,
    sample_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Online IPO (Calandriello et al., arXiv:2403.08635) on pairs sampled from the current policy.

    Here ``preference[i] = P(y_i > y_j | x_i)`` is the judge's probability *for the pair itself*,
    ``j = pair_index[i]`` (both responses drawn from the current, stop-gradient policy).  IPO
    regresses the reference-relative log-ratio onto the ``1/(2 beta)``-scaled preference gap
    ``P(y_i > y_j) - P(y_j > y_i) = 2 preference[i] - 1``::

        h_i    = [log pi_theta(y_i) - log pi_theta(y_j)] - [log pi_ref(y_i) - log pi_ref(y_j)]
        loss   = mean_i (h_i - (preference[i] - 1/2) / beta)^2

    (with a hard label the target is ``+-1/(2 beta)``, the original IPO loss).  Its population
    minimiser against a fixed sampler ``mu`` is ``pi ∝ pi_ref exp(P(y > mu)/beta)``; iterated with
    fresh samples this is online mirror descent / self-play (nash-mp.md).

    Args:
        logp: (B,) log pi_theta(y|x), requires grad.  logp_ref: (B,).
        preference: (B,) P(y_i > y_{pair_index[i]}) in [0, 1].
        pair_index: (B,) integer partner indices.  beta: > 0.
        sample_weight: optional (B,) detached weights >= 0 (pair term i weighted by
            ``sample_weight[i] * sample_weight[pair_index[i]]``).

    Returns:
        LossOutput; metrics ``loss, target_mean, target_abs_mean, h_abs_mean, residual_rms,
        preference_mean, kl_ref``.

    Raises:
        ValueError: on invalid inputs.
    """
    return _reference_pair_regression(logp, logp_ref, preference, pair_index, beta, against_opponent=False,
                                      sample_weight=sample_weight)


def egpo_loss(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    preference: torch.Tensor,
    pair_index: torch.Tensor,
    *,
    beta: float,
    sample_weight: torch.Tensor | None = None,
) -> LossOutput:
    """EGPO's online-IPO loss (Zhou, Fazel, Du, arXiv:2503.08942), evaluated at either
    extragradient point.

    EGPO takes extragradient steps in *parameter* space, ``theta_{k+1/2} = theta_k - lr g(theta_k)``,
    ``theta_{k+1} = theta_k - lr g(theta_{k+1/2})``, where ``g(theta)`` is the gradient of this loss
    on samples from the stop-gradient policy ``pi_theta`` at the point where it is evaluated (the
    caller does the two steps and the restore).  For pairs ``(i, j = pair_index[i])`` and
    ``preference[i] = P(y_i > y''_i)`` against an opponent ``y''_i`` from that same policy::

        h_i  = [log pi_theta(y_i) - log pi_theta(y_j)] - [log pi_ref(y_i) - log pi_ref(y_j)]
        loss = mean_i (h_i - (preference[i] - preference[j]) / beta)^2

    Its expectation is the online-IPO loss ``(h - (P(y > pi) - P(y' > pi))/beta)^2`` whose
    gradient at ``pi_theta`` is the game's mirror-descent direction; it is the ``eta -> inf`` limit
    of :func:`proximal_regression_loss`.

    Args / Returns / Raises: as :func:`online_ipo_loss`, except ``preference`` is against an
    opponent sample, not the partner.
    """
    return _reference_pair_regression(logp, logp_ref, preference, pair_index, beta, against_opponent=True,
                                      sample_weight=sample_weight)


def nash_md_pg_loss(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    logp_sampler: torch.Tensor,
    preference: torch.Tensor,
    *,
    beta: float,
    clip: float | None = 0.2,
    sample_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Nash-MD-PG (Munos et al., arXiv:2312.00886): REINFORCE with the 1/2 baseline and KL to ref.

    ``y_i`` is sampled from ``mu`` (``logp_sampler``, normally the current policy) and its
    opponent ``y'_i`` from the geometric mixture ``pi_mix ∝ pi_theta^(1-m) pi_ref^m`` (see
    :func:`geometric_mixture_logits`); ``preference[i] = P(y_i > y'_i)``.  Per sample (detached)::

        w(y) = (P(y > y') - 1/2) - beta log(pi_theta/pi_ref)(y)

    and the loss is the same importance-weighted, PPO-clipped surrogate as
    :func:`proximal_pg_loss` (plain REINFORCE ``-mean w grad log pi_theta`` when
    ``pi_theta == mu``); it is the ``eta -> inf`` limit of that loss.

    Args:
        logp, logp_ref, logp_sampler, preference: (B,) as in :func:`proximal_pg_loss`.
        beta: > 0.  clip: epsilon > 0 or None.
        sample_weight: optional (B,) detached weights >= 0 of the samples' terms.

    Returns:
        LossOutput; metrics ``loss, pg_weight_mean, pg_weight_std, preference_mean, kl_ref,
        ratio_mean, ratio_min, ratio_max, clip_frac``.

    Raises:
        ValueError: on invalid inputs.
    """
    logp = _check_logp("logp", logp, None)
    batch = logp.shape[0]
    logp_ref = _check_logp("logp_ref", logp_ref, batch).detach()
    logp_sampler = _check_logp("logp_sampler", logp_sampler, batch).detach()
    preference = _check_preference(preference, batch)
    sample_weight = _check_sample_weight(sample_weight, batch)
    _same_device(logp, logp_ref=logp_ref, logp_sampler=logp_sampler, preference=preference)
    beta = _check_positive("beta", beta)
    clip = _check_clip(clip)

    with torch.no_grad():
        log_ratio_ref = logp.detach() - logp_ref
        w = _pg_weight(preference, log_ratio_ref, None, beta, None)
    loss, metrics = _clipped_pg(logp, logp_sampler, w, clip, sample_weight)
    return LossOutput(loss, _pg_metrics(loss, w, preference, log_ratio_ref, None, metrics))


def geometric_mixture_logits(logits: torch.Tensor, ref_logits: torch.Tensor, mixture: float) -> torch.Tensor:
    """Next-token log-probabilities of Nash-MD's geometric mixture (Munos et al., arXiv:2312.00886).

    Returns ``log_softmax((1 - m) log_softmax(logits) + m log_softmax(ref_logits))`` over the
    last (vocabulary) dimension: the token-level geometric mixture
    ``pi_mix ∝ pi_theta^(1-m) pi_ref^m`` that Nash-MD-PG samples opponents from.  For a one-token
    policy it is the exact sequence-level mixture.

    Args:
        logits, ref_logits: (..., V) unnormalised logits of the same shape.
        mixture: m in [0, 1].

    Raises:
        ValueError: shapes differ or ``mixture`` outside [0, 1].
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"ref_logits has shape {tuple(ref_logits.shape)}, expected {tuple(logits.shape)}")
    m = float(mixture)
    if not (0.0 <= m <= 1.0):
        raise ValueError(f"mixture must lie in [0, 1], got {mixture!r}")
    mixed = (1.0 - m) * torch.log_softmax(logits, dim=-1) + m * torch.log_softmax(ref_logits, dim=-1)
    return torch.log_softmax(mixed, dim=-1)

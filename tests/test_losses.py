"""Tests for nlhf.algorithms.losses: the stochastic proximal-step estimators of Nash-MP.

The bridge between the exact maths (nash-mp.md) and the language-model learner: a one-token
"language model" (a softmax over n logits) is trained with torch on sampled responses, with
exactly the loss calls the learner makes on sequence log-probabilities.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from nlhf.algorithms.losses import (
    LossOutput,
    egpo_loss,
    geometric_mixture_logits,
    nash_md_pg_loss,
    online_ipo_loss,
    proximal_loss,
    proximal_pg_loss,
    proximal_regression_loss,
)

torch.set_num_threads(1)
DT = torch.float64

# Hyper-parameters of the stochastic Nash-MP runs (reported to the learner): beta = 0.2,
# eta = 2 beta (the paper's theory setting), Adam lr 0.05, M = 20 inner steps per proximal
# step, 2048 sampled responses per iteration, 30 iterations (= 60 preference batches).
BETA, ETA = 0.2, 0.4
N_ACTIONS = 10


# --------------------------------------------------------------------------- helpers


def _game(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, pi_ref, pi*_beta) for the seeded n=10 random preference game."""
    from nlhf.algorithms.equilibrium import solve_nash
    from nlhf.algorithms.games import random_game, softmax_reference

    P = np.asarray(random_game(N_ACTIONS, seed), dtype=np.float64)
    pi_ref = np.asarray(softmax_reference(N_ACTIONS, seed), dtype=np.float64)
    pi_star = np.asarray(solve_nash(P, pi_ref, BETA), dtype=np.float64)
    return P, pi_ref, pi_star


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    from nlhf.algorithms.equilibrium import kl

    return float(kl(p, q))


def _closed_form_step(log_anchor, log_ref, a, beta, eta):
    """log pi_new = [log pi_k + eta log pi_ref + (eta/beta) a] / (1 + eta) - log Z."""
    return torch.log_softmax((log_anchor + eta * log_ref + (eta / beta) * a) / (1.0 + eta), dim=0)


def _all_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch indices (y_i) and pair_index covering every ordered pair (y, y') of n actions."""
    y = torch.arange(n).repeat_interleave(n)  # y_b = b // n
    partner_action = torch.arange(n).repeat(n)  # y'_b = b % n
    # The batch entry holding action k as its own y is any b with b // n == k; take b = k * n.
    pair_index = partner_action * n
    return y, pair_index


def _minimise(loss_fn, theta0: torch.Tensor) -> torch.Tensor:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _span(x: torch.Tensor) -> float:
    return float(x.max() - x.min())


@pytest.fixture(scope="module")
def small():
    """A small random problem: P (n x n), log pi_ref, log pi_k, log pi_theta logits, opponent."""
    g = torch.Generator().manual_seed(7)
    n = 6
    low = torch.rand(n, n, generator=g, dtype=DT).tril(-1)
    P = low + (1 - low.T).triu(1) + 0.5 * torch.eye(n, dtype=DT)
    log_ref = torch.log_softmax(torch.randn(n, generator=g, dtype=DT), 0)
    log_anchor = torch.log_softmax(torch.randn(n, generator=g, dtype=DT), 0)
    theta = torch.randn(n, generator=g, dtype=DT)
    opponent = torch.softmax(torch.randn(n, generator=g, dtype=DT), 0)
    sampler = torch.softmax(torch.randn(n, generator=g, dtype=DT), 0)
    return dict(n=n, P=P, log_ref=log_ref, log_anchor=log_anchor, theta=theta, opponent=opponent, sampler=sampler)


# --------------------------------------------------------------------------- regression estimator


def test_regression_minimiser_is_the_exact_proximal_step(small):
    n, P = small["n"], small["P"]
    a = P @ small["opponent"]  # a(y) = P(y > opponent)
    y, pair_index = _all_pairs(n)
    beta, eta = 0.15, 0.7

    def loss_fn(theta):
        logp = torch.log_softmax(theta, 0)
        return proximal_regression_loss(
            logp[y], small["log_ref"][y], small["log_anchor"][y], a[y], pair_index, beta=beta, eta=eta
        ).loss

    theta = _minimise(loss_fn, torch.zeros(n, dtype=DT))
    expected = _closed_form_step(small["log_anchor"], small["log_ref"], a, beta, eta)
    torch.testing.assert_close(torch.log_softmax(theta, 0), expected, atol=1e-8, rtol=0)
    assert loss_fn(theta).item() < 1e-14


def test_regression_minimiser_matches_closed_form_on_sampler_support(small):
    """Pairs only among a subset S: the log-ratios inside S are the exact proximal step's."""
    n, P = small["n"], small["P"]
    a = P @ small["opponent"]
    support = torch.tensor([0, 2, 3, 5])
    m = len(support)
    yy, pi = _all_pairs(m)
    y = support[yy]
    beta, eta = 0.2, 0.4

    def loss_fn(theta):
        logp = torch.log_softmax(theta, 0)
        return proximal_regression_loss(
            logp[y], small["log_ref"][y], small["log_anchor"][y], a[y], pi, beta=beta, eta=eta
        ).loss

    theta = _minimise(loss_fn, torch.zeros(n, dtype=DT))
    got = torch.log_softmax(theta, 0)[support]
    expected = _closed_form_step(small["log_anchor"], small["log_ref"], a, beta, eta)[support]
    assert _span(got - expected) < 1e-8  # equal up to the normaliser


def test_regression_minimiser_with_sampled_opponent_preferences(small):
    """Per-sample preferences P[y, y''] against sampled opponents y'' (not a(y)): the minimiser
    over the opponent distribution (uniform, enumerated exactly) is still the closed-form step
    with a(y) = E_{y''} P[y, y'']."""
    n, P = small["n"], small["P"]
    beta, eta = 0.2, 1.0
    # Batch entry b <-> (y, o, y2, o2): response y with opponent o, paired with the entry
    # (y2, o2, y, o) whose response y2 had opponent o2.  Every combination appears once.
    y, o, y2, o2 = (t.reshape(-1) for t in torch.meshgrid(*[torch.arange(n)] * 4, indexing="ij"))
    pair_index = ((y2 * n + o2) * n + y) * n + o
    preference = P[y, o]

    def loss_fn(theta):
        logp = torch.log_softmax(theta, 0)
        return proximal_regression_loss(
            logp[y], small["log_ref"][y], small["log_anchor"][y], preference, pair_index, beta=beta, eta=eta
        ).loss

    theta = _minimise(loss_fn, torch.zeros(n, dtype=DT))
    expected = _closed_form_step(small["log_anchor"], small["log_ref"], P.mean(1), beta, eta)
    torch.testing.assert_close(torch.log_softmax(theta, 0), expected, atol=1e-8, rtol=0)


# --------------------------------------------------------------------------- policy-gradient estimator


def _proximal_objective(theta, a, log_ref, log_anchor, beta, eta):
    """J(theta) = E_pi[a] - beta KL(pi||pi_ref) - (beta/eta) KL(pi||pi_k), computed exactly."""
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp()
    return (pi * a).sum() - beta * (pi * (logp - log_ref)).sum() - (beta / eta) * (pi * (logp - log_anchor)).sum()


def _expected_pg_grad(small, theta, log_sampler, weights_y, *, beta, eta, clip, fn="prox"):
    """E_{y ~ weights_y, y' ~ opponent}[grad of the one-sample loss], summed exactly."""
    n, P, opp = small["n"], small["P"], small["opponent"]
    total = torch.zeros(n, dtype=DT)
    for yv in range(n):
        for yo in range(n):
            th = theta.clone().requires_grad_(True)
            logp = torch.log_softmax(th, 0)
            idx = torch.tensor([yv])
            pref = P[yv, yo].reshape(1)
            if fn == "prox":
                out = proximal_pg_loss(logp[idx], small["log_ref"][idx], small["log_anchor"][idx],
                                       log_sampler[idx], pref, beta=beta, eta=eta, clip=clip)
            else:
                out = nash_md_pg_loss(logp[idx], small["log_ref"][idx], log_sampler[idx], pref, beta=beta, clip=clip)
            (g,) = torch.autograd.grad(out.loss, th)
            total += weights_y[yv] * opp[yo] * g
    return total


@pytest.mark.parametrize("clip", [None, 0.2])
def test_pg_gradient_on_policy_equals_proximal_objective_gradient(small, clip):
    beta, eta = 0.2, 0.5
    theta = small["theta"]
    logp = torch.log_softmax(theta, 0)
    a = small["P"] @ small["opponent"]
    got = _expected_pg_grad(small, theta, logp, logp.exp(), beta=beta, eta=eta, clip=clip)
    th = theta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(-_proximal_objective(th, a, small["log_ref"], small["log_anchor"], beta, eta), th)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_pg_gradient_off_policy_is_importance_corrected(small):
    """Samples from a different behaviour policy mu, no clipping: still the exact gradient."""
    beta, eta = 0.1, 0.2
    theta = small["theta"]
    mu = small["sampler"]
    a = small["P"] @ small["opponent"]
    got = _expected_pg_grad(small, theta, mu.log(), mu, beta=beta, eta=eta, clip=None)
    th = theta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(-_proximal_objective(th, a, small["log_ref"], small["log_anchor"], beta, eta), th)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_pg_on_policy_gradient_is_plain_reinforce():
    g = torch.Generator().manual_seed(0)
    B = 32
    logp = torch.randn(B, generator=g, dtype=DT).requires_grad_(True)
    ref, anchor = torch.randn(B, generator=g, dtype=DT), torch.randn(B, generator=g, dtype=DT)
    pref = torch.rand(B, generator=g, dtype=DT)
    out = proximal_pg_loss(logp, ref, anchor, logp.detach(), pref, beta=0.1, eta=0.3, clip=0.2)
    (grad,) = torch.autograd.grad(out.loss, logp)
    w = (pref - 0.5) - 0.1 * (logp.detach() - ref) - (0.1 / 0.3) * (logp.detach() - anchor)
    torch.testing.assert_close(grad, -w / B)
    assert out.metrics["clip_frac"] == 0.0 and out.metrics["ratio_mean"] == pytest.approx(1.0)
    assert out.metrics["pg_weight_mean"] == pytest.approx(float(w.mean()))


def test_pg_clip_stops_only_the_push_beyond_the_trust_region():
    # Sample 0: ratio e^0.5 > 1.2 and w > 0 (pushing further up)   -> clipped, zero gradient.
    # Sample 1: ratio e^0.5 > 1.2 and w < 0 (pulling back down)     -> kept, gradient w * rho.
    # Sample 2: ratio e^-0.5 < 0.8 and w < 0 (pushing further down) -> clipped, zero gradient.
    # Sample 3: ratio 1 -> plain REINFORCE.
    logp = torch.tensor([0.5, 0.5, -0.5, 0.0], dtype=DT, requires_grad=True)
    sampler = torch.zeros(4, dtype=DT)
    ref = logp.detach().clone()  # zero KL terms: w = preference - 1/2
    pref = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=DT)
    out = proximal_pg_loss(logp, ref, ref, sampler, pref, beta=0.1, eta=0.1, clip=0.2)
    (grad,) = torch.autograd.grad(out.loss, logp)
    rho = math.exp(0.5)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.5 * rho / 4, 0.0, -0.5 / 4], dtype=DT))
    assert out.metrics["clip_frac"] == pytest.approx(0.5)
    # clip=None: no sample is clipped.
    out = proximal_pg_loss(logp, ref, ref, sampler, pref, beta=0.1, eta=0.1, clip=None)
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad, torch.tensor([-0.5 * rho, 0.5 * rho, 0.5 / rho, -0.5], dtype=DT) / 4)


def test_pg_dual_clip_bounds_a_negative_weight_at_a_huge_ratio():
    # Sample 0: ratio e^5 and w < 0: the pessimistic bound alone keeps rho * w (gradient ~74 w);
    #           the dual clip floors the term at 3 w, with no gradient.
    # Sample 1: ratio 2 and w < 0: below the dual clip, kept (gradient w * rho).
    logp = torch.tensor([5.0, math.log(2.0)], dtype=DT, requires_grad=True)
    sampler = torch.zeros(2, dtype=DT)
    ref = logp.detach().clone()
    pref = torch.tensor([0.0, 0.0], dtype=DT)  # w = -1/2 for both
    out = proximal_pg_loss(logp, ref, ref, sampler, pref, beta=0.1, eta=0.1, clip=0.2)
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.5 * 2.0 / 2], dtype=DT))
    torch.testing.assert_close(out.loss, torch.tensor(-(3 * -0.5 + 2.0 * -0.5) / 2, dtype=DT))
    assert out.metrics["clip_frac"] == pytest.approx(0.5)


def test_pg_huge_log_ratio_stays_finite():
    logp = torch.tensor([500.0, -500.0, 0.0], dtype=DT, requires_grad=True)
    zeros = torch.zeros(3, dtype=DT)
    pref = torch.tensor([0.0, 1.0, 0.5], dtype=DT)
    for clip in (0.2, None):
        out = proximal_pg_loss(logp, zeros, zeros, zeros, pref, beta=0.1, eta=0.1, clip=clip)
        (grad,) = torch.autograd.grad(out.loss, logp)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_nash_md_pg_gradient(small):
    """Nash-MD-PG's expected gradient is that of E_pi[P(y > pi_mix)] - beta KL(pi||pi_ref)."""
    beta = 0.3
    theta = small["theta"]
    logp = torch.log_softmax(theta, 0)
    a = small["P"] @ small["opponent"]
    got = _expected_pg_grad(small, theta, logp, logp.exp(), beta=beta, eta=None, clip=0.2, fn="md")
    th = theta.clone().requires_grad_(True)
    lp = torch.log_softmax(th, 0)
    J = (lp.exp() * a).sum() - beta * (lp.exp() * (lp - small["log_ref"])).sum()
    (want,) = torch.autograd.grad(-J, th)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_geometric_mixture_logits():
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(3, 7, generator=g, dtype=DT), torch.randn(3, 7, generator=g, dtype=DT)
    m = 0.25
    pi, pr = torch.softmax(logits, -1), torch.softmax(ref, -1)
    want = pi ** (1 - m) * pr ** m
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(geometric_mixture_logits(logits, ref, m).exp(), want)
    with pytest.raises(ValueError, match="mixture"):
        geometric_mixture_logits(logits, ref, 1.5)


# --------------------------------------------------------------------------- baselines


def test_online_ipo_minimiser_is_the_regularised_best_response(small):
    """All pairs under a uniform sampler, preference = P[y, y']: pi ∝ pi_ref exp(P(y > unif)/beta)."""
    n, P = small["n"], small["P"]
    y, pair_index = _all_pairs(n)
    partner = pair_index // n
    beta = 0.25

    def loss_fn(theta):
        logp = torch.log_softmax(theta, 0)
        return online_ipo_loss(logp[y], small["log_ref"][y], P[y, partner], pair_index, beta=beta).loss

    theta = _minimise(loss_fn, torch.zeros(n, dtype=DT))
    expected = small["log_ref"] + P.mean(1) / beta
    assert _span(torch.log_softmax(theta, 0) - expected) < 1e-8


def test_egpo_loss_minimiser_and_limit(small):
    n, P = small["n"], small["P"]
    a = P @ small["opponent"]
    y, pair_index = _all_pairs(n)
    beta = 0.25

    def loss_fn(theta):
        logp = torch.log_softmax(theta, 0)
        return egpo_loss(logp[y], small["log_ref"][y], a[y], pair_index, beta=beta).loss

    theta = _minimise(loss_fn, torch.zeros(n, dtype=DT))
    assert _span(torch.log_softmax(theta, 0) - (small["log_ref"] + a / beta)) < 1e-8
    # eta -> infinity limit of the proximal regression loss (anchor term vanishes).
    logp = torch.log_softmax(small["theta"], 0)[y]
    prox = proximal_regression_loss(logp, small["log_ref"][y], small["log_anchor"][y], a[y], pair_index,
                                    beta=beta, eta=1e9).loss
    eg = egpo_loss(logp, small["log_ref"][y], a[y], pair_index, beta=beta).loss
    assert prox.item() == pytest.approx(eg.item(), rel=1e-6)


def test_proximal_loss_dispatch(small):
    n = small["n"]
    y, pair_index = _all_pairs(n)
    logp = torch.log_softmax(small["theta"], 0)[y]
    common = dict(logp=logp, logp_ref=small["log_ref"][y], logp_anchor=small["log_anchor"][y],
                  logp_sampler=logp.detach(), preference=(small["P"] @ small["opponent"])[y],
                  pair_index=pair_index, beta=0.2, eta=0.4)
    pg = proximal_loss("pg", **common)
    reg = proximal_loss("regression", **common)
    assert isinstance(pg, LossOutput) and pg.loss.dim() == 0
    assert pg.loss.item() == proximal_pg_loss(common["logp"], common["logp_ref"], common["logp_anchor"],
                                              common["logp_sampler"], common["preference"], beta=0.2, eta=0.4).loss.item()
    assert reg.loss.item() == proximal_regression_loss(common["logp"], common["logp_ref"], common["logp_anchor"],
                                                       common["preference"], pair_index, beta=0.2, eta=0.4).loss.item()
    assert all(isinstance(v, float) for v in {**pg.metrics, **reg.metrics}.values())
    with pytest.raises(ValueError, match="estimator"):
        proximal_loss("ppo", **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pair_index"):
        proximal_loss("regression", **{**common, "pair_index": None})
    with pytest.raises(ValueError, match="logp_sampler"):
        proximal_loss("pg", **{**common, "logp_sampler": None})


# --------------------------------------------------------------------------- validation


def _valid(B=4):
    z = torch.zeros(B, dtype=DT)
    return dict(logp=z.clone().requires_grad_(True), logp_ref=z, logp_anchor=z, logp_sampler=z,
                preference=torch.full((B,), 0.5, dtype=DT), pair_index=torch.arange(B).flip(0), beta=0.1, eta=0.2)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("logp_ref", torch.zeros(3, dtype=DT), "logp_ref"),
        ("logp", torch.zeros(4, 1, dtype=DT), "logp"),
        ("logp_anchor", torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=DT), r"logp_anchor\[1\] = nan"),
        ("logp_sampler", torch.tensor([0.0, 0.0, float("-inf"), 0.0], dtype=DT), "logp_sampler"),
        ("preference", torch.tensor([0.5, 1.5, 0.5, 0.5], dtype=DT), r"preference\[1\] = 1.5"),
        ("preference", torch.tensor([0.5, 0.5, -0.1, 0.5], dtype=DT), "preference"),
        ("preference", torch.tensor([0.5, 0.5, float("nan"), 0.5], dtype=DT), "preference"),
        ("beta", 0.0, "beta.*0.0"),
        ("beta", -1.0, "beta"),
        ("eta", 0.0, "eta.*0.0"),
        ("eta", float("nan"), "eta"),
        ("pair_index", torch.tensor([0, 1, 2, 4]), r"pair_index\[3\] = 4"),
        ("pair_index", torch.tensor([0.0, 1.0, 2.0, 3.0]), "pair_index"),
        ("pair_index", torch.tensor([0, 1]), "pair_index"),
    ],
)
def test_invalid_inputs_raise(field, value, match):
    kw = _valid()
    kw[field] = value
    pg_fields = {"logp", "logp_ref", "logp_anchor", "logp_sampler", "preference", "beta", "eta"}
    reg_fields = {"logp", "logp_ref", "logp_anchor", "preference", "pair_index", "beta", "eta"}
    if field in pg_fields:
        with pytest.raises(ValueError, match=match):
            proximal_pg_loss(*(kw[k] for k in ("logp", "logp_ref", "logp_anchor", "logp_sampler", "preference")),
                             beta=kw["beta"], eta=kw["eta"])
    if field in reg_fields:
        with pytest.raises(ValueError, match=match):
            proximal_regression_loss(*(kw[k] for k in ("logp", "logp_ref", "logp_anchor", "preference", "pair_index")),
                                     beta=kw["beta"], eta=kw["eta"])


def test_invalid_inputs_raise_in_baselines():
    kw = _valid()
    with pytest.raises(ValueError, match="beta"):
        online_ipo_loss(kw["logp"], kw["logp_ref"], kw["preference"], kw["pair_index"], beta=0)
    with pytest.raises(ValueError, match="preference"):
        egpo_loss(kw["logp"], kw["logp_ref"], kw["preference"] + 1, kw["pair_index"], beta=0.1)
    with pytest.raises(ValueError, match="logp_sampler"):
        nash_md_pg_loss(kw["logp"], kw["logp_ref"], kw["logp_sampler"][:2], kw["preference"], beta=0.1)
    with pytest.raises(ValueError, match="clip"):
        proximal_pg_loss(kw["logp"], kw["logp_ref"], kw["logp_anchor"], kw["logp_sampler"], kw["preference"],
                         beta=0.1, eta=0.1, clip=-0.2)


# --------------------------------------------------------------------------- stochastic Nash-MP


def _stochastic_nash_mp(estimator: str, P: np.ndarray, pi_ref: np.ndarray, *, seed: int = 0,
                        iters: int = 30, batch: int = 2048, inner_steps: int = 20, lr: float = 0.05) -> np.ndarray:
    """Stochastic Nash-MP (nash-mp.md, steps 1-4) on a one-token LM; returns pi after `iters`."""
    g = torch.Generator().manual_seed(seed)
    Pt = torch.tensor(P, dtype=torch.float32)
    log_ref = torch.log(torch.tensor(pi_ref, dtype=torch.float32))
    theta = torch.nn.Parameter(log_ref.clone())  # the "LM": logits over the vocabulary, init at pi_ref
    opt = torch.optim.Adam([theta], lr=lr)
    pair_index = torch.roll(torch.arange(batch), batch // 2)  # pair response i with i + B/2

    def sample(logp: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(logp.exp(), batch, replacement=True, generator=g)

    def proximal_step(y, log_anchor, opponents):
        preference = Pt[y, opponents]  # the judge's probability P(y > y'')
        for _ in range(inner_steps):
            logp = torch.log_softmax(theta, 0)
            out = proximal_loss(estimator, logp=logp[y], logp_ref=log_ref[y], logp_anchor=log_anchor[y],
                                logp_sampler=log_anchor[y], preference=preference, pair_index=pair_index,
                                beta=BETA, eta=ETA)
            opt.zero_grad()
            out.loss.backward()
            opt.step()

    for _ in range(iters):
        # 1. Responses from the current policy pi_k.
        with torch.no_grad():
            log_k = torch.log_softmax(theta, 0)
        theta_k, opt_state_k = theta.detach().clone(), copy.deepcopy(opt.state_dict())
        y = sample(log_k)
        # 2. Half-step against opponents from pi_k.
        proximal_step(y, log_k, sample(log_k))
        # 3. Opponents from the extrapolated policy pi_{k+1/2}.
        with torch.no_grad():
            opponents = sample(torch.log_softmax(theta, 0))
            # 4. Restore theta_k (weights and optimiser state), full step against pi_{k+1/2}.
            theta.copy_(theta_k)
        opt.load_state_dict(opt_state_k)
        proximal_step(y, log_k, opponents)
    return torch.softmax(theta.detach(), 0).double().numpy()


@pytest.mark.parametrize("game_seed", [0, 4])  # 4: the farthest start among seeds 0-5 (KL 0.20)
@pytest.mark.parametrize("estimator", ["pg", "regression"])
def test_stochastic_nash_mp_converges_to_the_equilibrium(estimator, game_seed):
    P, pi_ref, pi_star = _game(seed=game_seed)
    assert _kl(pi_star, pi_ref) > 0.05  # the start (pi_0 = pi_ref) is far from the equilibrium
    pi = _stochastic_nash_mp(estimator, P, pi_ref, seed=0)
    # Observed over game seeds 0-5 and two sampling seeds: KL in [2e-4, 2.1e-3].
    assert _kl(pi_star, pi) < 1e-2


# --------------------------------------------------------------------------- pairing of the regression estimator


def _paired_nash_mp(P: np.ndarray, pi_ref: np.ndarray, *, half_opponents: str, seed: int = 0, iters: int = 30,
                    groups: int = 512, responses: int = 4, inner_steps: int = 20, lr: float = 0.05) -> np.ndarray:
    """Stochastic Nash-MP with the regression estimator and the batch layout the driver uses:
    ``groups`` prompts x ``responses`` responses, pair partners ``(2m, 2m+1)``
    (:func:`nlhf.algorithms.pairing.regression_partner`), judged preferences ``P[y_i, o_i]``.

    ``half_opponents``: ``"independent"``: the half-step's opponents are
    :func:`nlhf.algorithms.pairing.self_play` ``(with_partner=True)`` (two places further on, so
    both opponents of a pair lie outside it); ``"partner"``: the former scheme, each response
    judged against its own pair partner. The full step's opponents are responses of pi_{k+1/2}
    (:func:`~nlhf.algorithms.pairing.against_other_pool`) in both cases."""
    from nlhf.algorithms.pairing import against_other_pool, self_play

    g = torch.Generator().manual_seed(seed)
    Pt = torch.tensor(P, dtype=torch.float32)
    log_ref = torch.log(torch.tensor(pi_ref, dtype=torch.float32))
    theta = torch.nn.Parameter(log_ref.clone())
    opt = torch.optim.Adam([theta], lr=lr)
    half = self_play(groups, responses, with_partner=True)
    full = against_other_pool(groups, responses, with_partner=True)
    partner = torch.tensor(half.partner)
    half_opp = torch.tensor([o[0] for o in half.opponents] if half_opponents == "independent" else half.partner)
    full_opp = torch.tensor([o[0] for o in full.opponents])
    n = groups * responses

    def proximal_step(y, log_anchor, preference):
        for _ in range(inner_steps):
            logp = torch.log_softmax(theta, 0)
            out = proximal_regression_loss(logp[y], log_ref[y], log_anchor[y], preference, partner, beta=BETA, eta=ETA)
            opt.zero_grad()
            out.loss.backward()
            opt.step()

    for _ in range(iters):
        with torch.no_grad():
            log_k = torch.log_softmax(theta, 0)
        theta_k, opt_state_k = theta.detach().clone(), copy.deepcopy(opt.state_dict())
        y = torch.multinomial(log_k.exp(), n, replacement=True, generator=g)
        proximal_step(y, log_k, Pt[y, y[half_opp]])
        with torch.no_grad():
            y_half = torch.multinomial(torch.softmax(theta, 0), n, replacement=True, generator=g)
            theta.copy_(theta_k)
        opt.load_state_dict(opt_state_k)
        proximal_step(y, log_k, Pt[y, y_half[full_opp]])
    return torch.softmax(theta.detach(), 0).double().numpy()


@pytest.mark.parametrize("game_seed", [0, 4])
def test_regression_estimator_with_independent_opponents_reaches_the_equilibrium(game_seed):
    """Issue 8.3, sampled: R = 4, partners (2m, 2m+1), half-step opponents two places further on
    (``pairing.self_play(G, R, with_partner=True)``): the regression estimator lands within KL
    1e-2 of pi*. Measured (game 0 / 4): 8.2e-4 / 2.0e-3; judging each response against its own
    partner instead gave 4.7e-4 / 3.3e-3, i.e. this bar does not separate the pairings (the
    half-step only shapes the full step's opponents); the exact test below does."""
    P, pi_ref, pi_star = _game(seed=game_seed)
    assert _kl(pi_star, _paired_nash_mp(P, pi_ref, half_opponents="independent")) < 1e-2


@pytest.mark.parametrize("half_opponents", ["independent", "partner"])
def test_equilibrium_is_a_fixed_point_of_the_regression_half_step(half_opponents):
    """Issue 8.3, exact: at pi_k = pi*, the population minimiser of the half-step regression loss
    (every (y, y_partner, opponents) combination enumerated, weighted by its probability under
    pi*) must be pi* again. With opponents independent of the pair it is (to 1e-7); judging
    each response against its own partner doubles the preference term and moves away
    (measured on game 0: KL(pi* || minimiser) 1.5e-13 vs 7.0e-3)."""
    P, pi_ref, pi_star = _game(seed=0)
    P, log_ref = torch.tensor(P, dtype=DT), torch.log(torch.tensor(pi_ref, dtype=DT))
    pi = torch.tensor(pi_star, dtype=DT)
    n = len(pi)
    if half_opponents == "independent":
        # entry b <-> (y, o, y2, o2): response y judged against o, paired with entry (y2, o2, y, o)
        y, o, y2, o2 = (t.reshape(-1) for t in torch.meshgrid(*[torch.arange(n)] * 4, indexing="ij"))
        pair_index = ((y2 * n + o2) * n + y) * n + o
        prob = pi[y] * pi[o] * pi[y2] * pi[o2]
    else:  # entry b <-> (y, y2): y judged against its partner y2
        y, y2 = (t.reshape(-1) for t in torch.meshgrid(*[torch.arange(n)] * 2, indexing="ij"))
        o, pair_index, prob = y2, y2 * n + y, pi[y] * pi[y2]
    weight = prob.sqrt()  # a pair term is weighted by weight[i] * weight[pair] = its probability

    def loss_fn(theta):
        logp = torch.log_softmax(theta, 0)
        return proximal_regression_loss(logp[y], log_ref[y], torch.log(pi)[y], P[y, o], pair_index,
                                        beta=BETA, eta=ETA, sample_weight=weight).loss

    got = torch.softmax(_minimise(loss_fn, torch.zeros(n, dtype=DT)), 0).numpy()
    kl = _kl(pi_star, got)
    if half_opponents == "independent":
        assert kl < 1e-7
    else:
        assert kl > 1e-3

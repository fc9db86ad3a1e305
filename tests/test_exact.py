"""Exact Nash-MP and baselines on matrix games, and the equilibrium solver they are measured
against. The KL bound tested here, ``KL(pi* || pi_k) <= KL_0 (1 + eta)^(-k)`` for every
``eta <= 2 beta`` (so ``KL_0 (1 + 2 beta)^(-N/2)`` at ``eta = 2 beta``), is derived in the
docstring of ``nlhf.algorithms.exact``; it is checked at every iteration, with no slack factor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import brentq

from nlhf.algorithms.equilibrium import best_response, exploitability, kl, solve_nash
from nlhf.algorithms.exact import (
    GameTrace,
    nash_mp_step,
    run_algorithm,
    run_egpo,
    run_nash_md,
    run_nash_mp,
    run_omd,
)
from nlhf.algorithms.games import (
    GameError,
    cyclic_game,
    random_game,
    softmax_reference,
    uniform_reference,
)

KL_NOISE = 1e-26  # KL(pi* || pi) floor set by the float64 precision of pi* itself


def _iterations_to(trace: GameTrace, level: float) -> int:
    """Queries needed before KL(pi* || pi_k) <= level (raises if never)."""
    k = np.asarray(trace.kl_to_nash)
    hit = np.flatnonzero(k <= level)
    assert hit.size, f"{trace.algorithm} never reached KL {level:g} (last {k[-1]:.3g})"
    return trace.queries[hit[0]]


# --------------------------------------------------------------------------- solver
@pytest.mark.parametrize(
    "n, beta, ref_seed",
    [(3, 0.01, None), (10, 0.01, 1), (10, 0.5, None), (50, 0.1, 2), (200, 0.003, 3), (40, 4.0, 4)],
)
def test_solve_nash_machine_precision(n, beta, ref_seed):
    P = cyclic_game(3) if n == 3 else random_game(n, n)
    ref = uniform_reference(n) if ref_seed is None else softmax_reference(n, ref_seed)
    pi = solve_nash(P, ref, beta)
    assert pi.shape == (n,) and pi.sum() == pytest.approx(1.0, abs=1e-14) and np.all(pi > 0)
    assert exploitability(pi, P, ref, beta) < 1e-12
    # fixed point pi* ∝ pi_ref exp(P pi* / beta), checked in log space
    f = np.log(pi) - np.log(ref) - P @ pi / beta
    assert f.max() - f.min() < 1e-10
    np.testing.assert_allclose(best_response(pi, P, ref, beta), pi, rtol=1e-9, atol=0)


def test_solve_nash_matches_independent_1d_root():
    # n = 2: pi = (p, 1-p) solves log(p/(1-p)) = log(r0/r1) + ((P pi)_0 - (P pi)_1) / beta.
    P = np.array([[0.5, 0.8], [0.2, 0.5]])
    ref, beta = np.array([0.3, 0.7]), 0.25

    def g(p):
        pi = np.array([p, 1 - p])
        a = P @ pi
        return np.log(p / (1 - p)) - np.log(ref[0] / ref[1]) - (a[0] - a[1]) / beta

    p = brentq(g, 1e-12, 1 - 1e-12, xtol=1e-15)
    np.testing.assert_allclose(solve_nash(P, ref, beta), [p, 1 - p], rtol=1e-12)


def test_solve_nash_rejects_bad_beta():
    with pytest.raises(GameError, match="beta"):
        solve_nash(random_game(3, 0), uniform_reference(3), 0.0)


# --------------------------------------------------------------------------- the proximal step
def test_nash_mp_step_is_the_argmax_of_the_proximal_objective():
    P, ref, beta, eta = random_game(5, 2), softmax_reference(5, 3), 0.2, 0.3
    rng = np.random.default_rng(0)
    pi_k, opp = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5))

    def objective(pi):
        return pi @ P @ opp - beta * kl(pi, ref) - (beta / eta) * kl(pi, pi_k)

    new = nash_mp_step(pi_k, opp, P, ref, beta, eta)
    best = objective(new)
    assert best >= max(objective(nu) for nu in rng.dirichlet(np.ones(5), size=2000))
    for nu in rng.dirichlet(np.ones(5), size=20):  # local optimality along every direction tried
        assert best >= objective(0.999 * new + 0.001 * nu)
    with pytest.raises(GameError, match="eta"):
        nash_mp_step(pi_k, opp, P, ref, beta, -1.0)
    with pytest.raises(GameError, match="shape"):
        nash_mp_step(pi_k[:4], opp, P, ref, beta, eta)


# --------------------------------------------------------------------------- Nash-MP
@pytest.mark.parametrize("n", [10, 1000])
def test_nash_mp_lands_on_pi_star(n):
    P, ref, beta = random_game(n, 0), softmax_reference(n, 1), 0.1
    tr = run_nash_mp(P, ref, beta, eta=2 * beta, max_queries=300)
    assert tr.kl_to_nash[-1] < 1e-10
    assert tr.exploitability[-1] < 1e-12 and tr.span[-1] < 1e-5
    assert tr.exploitability[-1] < 1e-8 * tr.exploitability[0]
    assert tr.span[-1] < 1e-4 * tr.span[0]
    np.testing.assert_allclose(tr.policy, tr.nash, rtol=1e-5)
    assert tr.queries[:3] == [0, 2, 4] and tr.queries[-1] == 300


GAMES = {
    "random": lambda: (random_game(20, 11), softmax_reference(20, 12)),
    "random-uniform": lambda: (random_game(20, 13), uniform_reference(20)),
    "cyclic": lambda: (cyclic_game(7), softmax_reference(7, 14)),
}


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("game", sorted(GAMES))
def test_nash_mp_kl_bound_every_iteration(beta, game):
    P, ref = GAMES[game]()
    tr = run_nash_mp(P, ref, beta, eta=2 * beta, max_queries=400)
    k, N = np.asarray(tr.kl_to_nash), np.asarray(tr.queries, dtype=float)
    bound = k[0] * (1 + 2 * beta) ** (-N / 2)
    assert np.all(k <= bound * (1 + 1e-9) + KL_NOISE), (k / bound).max()
    assert k[-1] < k[0]


@pytest.mark.parametrize("eta_over_beta", [0.5, 1.0, 2.0])
def test_nash_mp_per_iteration_contraction(eta_over_beta):
    # the derivation gives KL_{k+1} <= KL_k / (1 + eta) for any eta <= 2 beta
    P, ref = GAMES["cyclic"]()
    beta = 0.05
    eta = eta_over_beta * beta
    k = np.asarray(run_nash_mp(P, ref, beta, eta=eta, max_queries=600).kl_to_nash)
    live = k[:-1] > 1e-20
    assert np.all(k[1:][live] <= k[:-1][live] / (1 + eta) * (1 + 1e-9))


def test_bound_check_is_not_vacuous():
    # beyond the theorem's range (eta = 10 beta on a strongly cyclic game) the bound fails
    P, ref = GAMES["cyclic"]()
    beta = 0.01
    tr = run_nash_mp(P, ref, beta, eta=10 * beta, max_queries=200)
    k, N = np.asarray(tr.kl_to_nash), np.asarray(tr.queries, dtype=float)
    assert np.any(k > k[0] * (1 + 2 * beta) ** (-N / 2))


def test_nash_mp_rate_does_not_degrade_with_n():
    beta, level = 0.1, 1e-8
    cost = {}
    for n in (10, 1000):
        tr = run_nash_mp(random_game(n, 5), softmax_reference(n, 6), beta, 2 * beta, 400)
        cost[n] = _iterations_to(tr, level * tr.kl_to_nash[0])
    theory = 2 * int(np.ceil(np.log(1 / level) / np.log(1 + 2 * beta)))  # queries from the bound
    assert cost[10] <= theory and cost[1000] <= theory
    assert cost[1000] <= 1.5 * cost[10] + 4, cost


@pytest.mark.parametrize("game", ["random", "cyclic"])
def test_nash_mp_needs_fewer_queries_than_nash_md(game):
    P, ref = GAMES[game]()
    beta = 0.1
    pi_star = solve_nash(P, ref, beta)
    mp = _iterations_to(run_nash_mp(P, ref, beta, 2 * beta, 400, nash=pi_star), 1e-6)
    md = run_nash_md(P, ref, beta, 4000, nash=pi_star)
    k = np.asarray(md.kl_to_nash)
    md_cost = md.queries[np.flatnonzero(k <= 1e-6)[0]] if np.any(k <= 1e-6) else np.inf
    assert mp < md_cost, (mp, md_cost)
    assert md.queries[:3] == [0, 1, 2]
    assert k[-1] < k[0]  # Nash-MD converges too, only slower


# --------------------------------------------------------------------------- baselines
def test_omd_converges_on_random_game_but_cycles_on_cyclic_game():
    beta = 0.1
    P, ref = GAMES["random"]()
    assert run_omd(P, ref, beta, 2 * beta, 300).kl_to_nash[-1] < 1e-10
    # small beta, strongly cyclic: self-play spirals out while Nash-MP converges
    P, ref = GAMES["cyclic"]()
    beta = 0.01
    omd = run_omd(P, ref, beta, 2 * beta, 1000)
    mp = run_nash_mp(P, ref, beta, 2 * beta, 1000)
    assert omd.kl_to_nash[-1] > omd.kl_to_nash[0]
    assert mp.kl_to_nash[-1] < 1e-3 * mp.kl_to_nash[0]


def test_egpo_is_nash_mp_with_reparametrised_step():
    P, ref = GAMES["random"]()
    beta, eta_mp = 0.1, 0.2
    eta_egpo = eta_mp / (beta * (1 + eta_mp))
    pi_star = solve_nash(P, ref, beta)
    eg = run_egpo(P, ref, beta, eta_egpo, 100, nash=pi_star)
    mp = run_nash_mp(P, ref, beta, eta_mp, 100, nash=pi_star)
    np.testing.assert_allclose(eg.kl_to_nash[:30], mp.kl_to_nash[:30], rtol=1e-8)
    assert eg.queries == mp.queries


def test_egpo_default_and_optimistic_variant_converge():
    P, ref = GAMES["cyclic"]()
    beta = 0.1
    eg = run_algorithm("egpo", P, ref, beta, 400)
    assert eg.eta == pytest.approx(1 / (1 + beta))
    assert eg.kl_to_nash[-1] < 1e-12
    opt = run_egpo(P, ref, beta, 0.5 / (1 + beta), 400, optimistic=True)
    assert opt.queries[:3] == [0, 2, 3]  # one query per iteration after the first
    assert opt.kl_to_nash[-1] < 1e-10
    with pytest.raises(GameError, match="eta \\* beta < 1"):
        run_egpo(P, ref, beta, 10.0, 10)


def test_run_algorithm_dispatch_and_trace_json():
    P, ref = GAMES["random-uniform"]()
    for name in ("nash-mp", "nash-md", "omd", "egpo"):
        tr = run_algorithm(name, P, ref, 0.1, 11)
        assert tr.algorithm == name
        assert len(tr.queries) == len(tr.kl_to_nash) == len(tr.exploitability) == len(tr.span)
        assert tr.queries[-1] <= 11 and tr.queries == sorted(tr.queries)
        d = json.loads(json.dumps(tr.to_json_dict()))
        assert GameTrace.from_json_dict(d) == tr
    assert run_algorithm("nash-mp", P, ref, 0.1, 11).eta == pytest.approx(0.2)
    assert run_algorithm("nash-mp", P, ref, 0.1, 11).queries[-1] == 10  # 2 per iteration
    assert run_algorithm("nash-md", P, ref, 0.1, 11).eta is None
    with pytest.raises(GameError, match="unknown algorithm"):
        run_algorithm("ppo", P, ref, 0.1, 10)
    with pytest.raises(GameError, match="beta"):
        run_algorithm("nash-mp", P, ref, -0.1, 10)

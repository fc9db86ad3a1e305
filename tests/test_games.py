"""Matrix games: generators, validation, and the equilibrium metrics (KL, best response,
exploitability, span). Pure numpy, well under a second."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from nlhf.algorithms.equilibrium import (
    best_response,
    exploitability,
    kl,
    span_seminorm,
)
from nlhf.algorithms.games import (
    GameError,
    bradley_terry_game,
    bradley_terry_game_from_seed,
    cyclic_game,
    random_game,
    softmax_reference,
    uniform_reference,
    validate_preference_matrix,
    validate_reference,
)


# --------------------------------------------------------------------------- validation
def test_validate_accepts_generated_games():
    for P in (random_game(7, 0), cyclic_game(5), bradley_terry_game_from_seed(6, 1)):
        out = validate_preference_matrix(P)
        assert out.dtype == np.float64 and out.shape == P.shape


@pytest.mark.parametrize(
    "bad, needle",
    [
        (np.ones((3, 4)) / 2, "square"),
        (np.full(3, 0.5), "square"),
        (np.zeros((0, 0)), "square"),
        ([["a", "b"], ["c", "d"]], "not numeric"),
    ],
)
def test_validate_rejects_shape_and_type(bad, needle):
    with pytest.raises(GameError, match=needle):
        validate_preference_matrix(bad)


def test_validate_names_non_complementary_entry():
    P = random_game(5, 0)
    P[0, 3] = min(1.0, P[0, 3] + 0.2)
    P[3, 0] = 1.0 - P[0, 3] + 0.2  # sum 1.2, both still in [0, 1]
    with pytest.raises(GameError, match=r"not complementary: P\[0,3\] \+ P\[3,0\] = 1\.2"):
        validate_preference_matrix(P)


def test_validate_tolerance_is_1e9():
    P = random_game(4, 3)
    P[1, 2] += 5e-10
    validate_preference_matrix(P)  # within tolerance
    P[1, 2] += 2e-9
    with pytest.raises(GameError, match="complementary"):
        validate_preference_matrix(P)


def test_validate_rejects_nan_and_out_of_range():
    P = random_game(4, 1)
    P[2, 1] = np.nan
    with pytest.raises(GameError, match=r"non-finite entry: P\[2,1\]"):
        validate_preference_matrix(P)
    Q = random_game(4, 1)
    Q[0, 1], Q[1, 0] = 1.3, -0.3
    with pytest.raises(GameError, match=r"outside \[0, 1\]"):
        validate_preference_matrix(Q)


def test_validate_reference():
    assert np.isclose(validate_reference(softmax_reference(5, 0), 5).sum(), 1.0)
    with pytest.raises(GameError, match="does not sum to 1"):
        validate_reference(np.array([0.5, 0.6]), 2)
    with pytest.raises(GameError, match="strictly positive"):
        validate_reference(np.array([1.0, 0.0]), 2)
    with pytest.raises(GameError, match=r"shape \(3,\)"):
        validate_reference(np.array([0.5, 0.5]), 3)
    with pytest.raises(GameError, match="non-finite"):
        validate_reference(np.array([np.nan, 0.5]), 2)


def test_game_error_is_value_error():
    assert issubclass(GameError, ValueError)


# --------------------------------------------------------------------------- generators
def test_random_game_structure_and_seeding():
    P = random_game(30, 7)
    assert np.max(np.abs(P + P.T - 1.0)) < 1e-15
    assert np.all(np.diag(P) == 0.5)
    lower = P[np.tril_indices(30, -1)]
    assert lower.min() >= 0 and lower.max() < 1
    assert 0.4 < lower.mean() < 0.6  # U(0, 1)
    np.testing.assert_array_equal(P, random_game(30, 7))
    assert not np.array_equal(P, random_game(30, 8))


def test_random_game_is_generally_intransitive():
    P = random_game(12, 0)
    beats = P > 0.5
    # some 3-cycle a > b > c > a exists
    cyc = np.einsum("ab,bc,ca->", beats.astype(int), beats.astype(int), beats.astype(int))
    assert cyc > 0


@pytest.mark.parametrize("n", [3, 5, 9])
def test_cyclic_game_is_balanced_and_intransitive(n):
    P = cyclic_game(n, strength=0.8)
    validate_preference_matrix(P)
    wins = (P > 0.5).sum(axis=1)
    assert np.all(wins == (n - 1) // 2)  # every action beats exactly half the others
    for i in range(n):  # i beats i+1 cyclically
        assert P[i, (i + 1) % n] == pytest.approx(0.9)
    # uniform is a Nash equilibrium of the unregularised game: P @ uniform == 1/2 everywhere
    np.testing.assert_allclose(P @ uniform_reference(n), 0.5)


def test_cyclic_game_rejects_even_n_and_bad_strength():
    with pytest.raises(GameError, match="odd"):
        cyclic_game(4)
    with pytest.raises(GameError, match="strength"):
        cyclic_game(3, strength=1.5)


def test_bradley_terry_is_transitive_sigmoid():
    s = np.array([0.0, 1.0, -2.0, 40.0])
    P = bradley_terry_game(s)
    validate_preference_matrix(P)
    assert P[1, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert P[3, 2] == pytest.approx(1.0) and P[2, 3] >= 0.0
    order = np.argsort(-s)
    for a, b in zip(order[:-1], order[1:]):
        assert P[a, b] > 0.5
    np.testing.assert_array_equal(bradley_terry_game_from_seed(5, 2), bradley_terry_game_from_seed(5, 2))


def test_references():
    r = softmax_reference(6, 3)
    assert r.shape == (6,) and np.all(r > 0) and r.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(r, softmax_reference(6, 3))
    assert not np.allclose(r, softmax_reference(6, 4))
    np.testing.assert_allclose(uniform_reference(4), 0.25)
    with pytest.raises(GameError):
        uniform_reference(0)


# --------------------------------------------------------------------------- metrics
def test_kl_matches_definition_and_is_accurate_when_tiny():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
    assert kl(p, q) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
    assert kl(p, p) == 0.0
    # second-order regime: KL(p || p e^{d}/Z) ~ Var_p(d) / 2, far below the textbook formula's noise
    d = 1e-9 * rng.standard_normal(8)
    q2 = p * np.exp(d)
    q2 /= q2.sum()
    var = float(np.sum(p * d**2) - np.sum(p * d) ** 2)
    assert kl(p, q2) == pytest.approx(var / 2, rel=1e-3)
    assert kl(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == np.inf


def test_best_response_closed_form_beats_random_policies():
    P, ref, beta = random_game(6, 1), softmax_reference(6, 2), 0.2
    pi = np.random.default_rng(3).dirichlet(np.ones(6))

    def value(nu):  # P(nu > pi) - beta KL(nu || pi_ref)
        return nu @ P @ pi - beta * kl(nu, ref)

    br = best_response(pi, P, ref, beta)
    others = np.random.default_rng(4).dirichlet(np.ones(6), size=2000)
    assert value(br) >= max(value(nu) for nu in others)
    assert value(br) >= value(0.99 * br + 0.01 * others[0])


def test_exploitability_closed_form_equals_definition():
    P, ref, beta = random_game(6, 5), softmax_reference(6, 6), 0.3
    pi = np.random.default_rng(7).dirichlet(np.ones(6))
    # max_pi' P_beta(pi' > pi) - 1/2 = beta logsumexp(log ref + P pi / beta) + beta KL(pi||ref) - 1/2
    direct = beta * logsumexp(np.log(ref) + P @ pi / beta) + beta * kl(pi, ref) - 0.5
    assert exploitability(pi, P, ref, beta) == pytest.approx(direct, rel=1e-10)
    assert exploitability(pi, P, ref, beta) > 0
    # and no policy does better than the best response
    br = best_response(pi, P, ref, beta)
    gain = br @ P @ pi - beta * kl(br, ref) + beta * kl(pi, ref) - 0.5
    assert gain == pytest.approx(direct, rel=1e-10)


def test_span_seminorm():
    p = np.array([0.2, 0.3, 0.5])
    assert span_seminorm(p, p) == 0.0
    q = np.array([0.25, 0.25, 0.5])
    f = np.log(p) - np.log(q)
    assert span_seminorm(p, q) == pytest.approx(f.max() - f.min())
    assert span_seminorm(3 * p, q) == pytest.approx(f.max() - f.min())  # normalisation-invariant
    assert span_seminorm(np.array([0.0, 0.5, 0.5]), q) == np.inf


def test_make_game_names_the_generators() -> None:
    from nlhf.algorithms.games import (GameError, bradley_terry_game_from_seed, cyclic_game, make_game,
                                       random_game)

    np.testing.assert_array_equal(make_game("random", 7, 3), random_game(7, 3))
    np.testing.assert_array_equal(make_game("cyclic", 5), cyclic_game(5))
    np.testing.assert_array_equal(make_game("bradley-terry", 6, 2), bradley_terry_game_from_seed(6, 2))
    with pytest.raises(GameError, match="unknown game kind 'rps'"):
        make_game("rps", 3)

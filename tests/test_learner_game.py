"""Every algorithm's learner operations, in-process, on the one-token game: a tiny random Llama
whose responses are single action tokens (softmax restricted to them) is trained against an
exact preference matrix, and KL(pi* || pi) to the beta-regularised Nash equilibrium must fall.

Each iteration samples the batch from the learner's own policy and gives every response its
expected preference against the opponent policy the algorithm prescribes,
``a(y) = sum_o P[y, o] mu(o)`` (pi_k, pi_{k+1/2}, or the geometric mixture); online IPO gets
the preference against its pair partner itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _learner_util import learner, make_cfg  # noqa: E402
from nlhf.algorithms.pairing import regression_partner  # noqa: E402
from nlhf.batch import Rollout, StepBatch  # noqa: E402

BETA, N, G, R = 0.2, 6, 12, 4  # beta, actions, prompts (copies of the one prompt) x responses per batch
ITERS = 12


@pytest.fixture(scope="module")
def game(tiny_model_dir):
    from transformers import AutoTokenizer

    from nlhf.algorithms.games import random_game

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    actions = [tok.convert_tokens_to_ids(c) for c in "ABCDEF"[:N]]
    prompt = tok.encode("Choose one letter.")
    return dict(P=np.asarray(random_game(N, 3), dtype=np.float64), actions=actions, prompt=prompt)


def _policy(w, game) -> np.ndarray:
    rs = [Rollout("x", game["prompt"], [a], "", 0.0) for a in game["actions"]]
    p = np.exp(np.asarray(w.sequence_logprobs(rs), dtype=np.float64))
    return p / p.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


def _sample(pi: np.ndarray, gen: np.random.Generator, game) -> tuple[list[Rollout], np.ndarray]:
    y = gen.choice(N, size=G * R, p=pi)
    rs = []
    for a in y:
        lp = float(np.log(pi[a]))
        rs.append(Rollout("x", game["prompt"], [game["actions"][a]], "", lp, sampler_token_logprobs=[lp]))
    return rs, y


def _run(name: str, estimator: str, game, model_dir, learner_cfg: dict | None = None) -> tuple[float, float]:
    from nlhf.algorithms.equilibrium import solve_nash

    P = game["P"]
    cfg = make_cfg({"optimizer": {"lr": 3e-3}, "micro_batch_size": 48, **(learner_cfg or {})},
                   {"name": name, "estimator": estimator, "beta": BETA, "eta": 2 * BETA, "inner_steps": 4},
                   responses_per_prompt=R)
    gen = np.random.default_rng(0)
    partner = regression_partner(G, R)
    with learner(cfg, model_dir, action_token_ids=game["actions"]) as w:
        pi_ref = _policy(w, game)
        pi_star = np.asarray(solve_nash(P, pi_ref, BETA), dtype=np.float64)
        start = _kl(pi_star, pi_ref)
        for _ in range(ITERS):
            pi_k = _policy(w, game)
            rs, y = _sample(pi_k, gen, game)
            if name == "online-ipo":
                w.step(StepBatch(rs, [float(P[y[i], y[partner[i]]]) for i in range(len(y))], partner))
            elif name == "nash-md-pg":
                m = cfg.algorithm.mixture
                mix = pi_k ** (1 - m) * pi_ref ** m
                w.step(StepBatch(rs, list(P[y] @ (mix / mix.sum())), partner))
            elif name == "nash-mp":
                w.half_step(StepBatch(rs, list(P[y] @ pi_k), partner))
                pi_half = _policy(w, game)
                w.full_step(StepBatch(rs, list(P[y] @ pi_half), partner))
            else:  # egpo: the second gradient is on samples of pi_{k+1/2}
                w.half_step(StepBatch(rs, list(P[y] @ pi_k), partner))
                pi_half = _policy(w, game)
                rs_h, y_h = _sample(pi_half, gen, game)
                w.full_step(StepBatch(rs_h, list(P[y_h] @ pi_half), partner))
        end = _kl(pi_star, _policy(w, game))
    return start, end


@pytest.mark.parametrize("name,estimator", [("nash-mp", "pg"), ("nash-mp", "regression"), ("online-ipo", "pg"),
                                            ("egpo", "pg"), ("nash-md-pg", "pg")])
def test_each_algorithm_moves_towards_the_equilibrium(game, tiny_model_dir, name, estimator):
    start, end = _run(name, estimator, game, tiny_model_dir)
    print(f"{name}/{estimator}: KL(pi*||pi) {start:.4f} -> {end:.4f}")
    assert start > 0.05
    assert end < start / 5  # observed: 3e-5 (nash-mp regression) to 0.014 (online-ipo) from 0.139


def test_lora_nash_mp_moves_towards_the_equilibrium(game, tiny_model_dir):
    """The same game with a LoRA adapter (rank 8, alpha 16, every linear layer of the decoder)
    in place of full fine-tuning, under the same bound. Measured from 0.139: full fine-tuning
    4e-4; LoRA 5.1e-3 to 5.2e-3 at lr 3e-3, 1e-2 and 3e-2 alike (AVX512)."""
    start, end = _run("nash-mp", "pg", game, tiny_model_dir,
                      {"lora": {"rank": 8, "alpha": 16.0}, "optimizer": {"lr": 1e-2}})
    print(f"nash-mp/pg LoRA: KL(pi*||pi) {start:.4f} -> {end:.4f}")
    assert start > 0.05
    assert end < start / 5

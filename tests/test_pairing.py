"""Opponent pairing: ``algorithm.opponents_per_response: all`` judges each response against
every opponent its step's pairing allows, and never against itself or its pair partner."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlhf.algorithms import pairing

GAME = str(Path(__file__).resolve().parents[1] / "configs" / "game-cpu.yaml")


@pytest.mark.parametrize("G, R", [(1, 2), (2, 4), (3, 6)])
def test_all_opponents_of_each_step(G, R):
    half = pairing.self_play(G, R, with_partner=False, opponents="all")
    full = pairing.against_other_pool(G, R, with_partner=False, opponents="all")
    for i in range(G * R):
        g = i // R
        same_prompt = set(range(g * R, (g + 1) * R))
        assert sorted(half.opponents[i]) == sorted(same_prompt - {i})  # the R - 1 others, never itself
        assert sorted(full.opponents[i]) == sorted(same_prompt)  # all R responses of the other pool
    assert half.opponents == pairing.self_play(G, R, with_partner=False, opponents=R - 1).opponents
    assert full.opponents == pairing.against_other_pool(G, R, with_partner=False, opponents=R).opponents


def test_all_opponents_with_pair_partners_stay_outside_the_pair():
    G, R = 2, 6
    p = pairing.self_play(G, R, with_partner=True, opponents="all")
    for i, (opp, partner) in enumerate(zip(p.opponents, p.partner)):
        assert len(opp) == R - 2
        assert i not in opp and partner not in opp
        assert all(j // R == i // R for j in opp)


def test_training_comparisons_of_a_nash_mp_iteration():
    """2 prompts x 4 responses: the half step's 3 opponents per response are 12 distinct pairs
    (each judged once), the full step's 4 per response 32 pairs: 44 training queries."""
    G, R = 2, 4
    half = pairing.self_play(G, R, with_partner=False, opponents="all")
    full = pairing.against_other_pool(G, R, with_partner=False, opponents="all")
    rows, cols = half.comparisons()
    assert len({frozenset((a, b)) for a, b in zip(rows, cols)}) == 12
    assert len(full.comparisons()[0]) == 32


@pytest.mark.parametrize("bad", [0, 5, "every", True])
def test_bad_opponent_count_names_the_value(bad):
    with pytest.raises(ValueError, match=rf"in \[1, 4\].*got {bad!r}"):
        pairing.against_other_pool(1, 4, with_partner=False, opponents=bad)


def test_config_accepts_all_and_names_the_field_otherwise():
    from nlhf.config import ConfigError, load_train_config

    cfg = load_train_config(GAME, ["algorithm.opponents_per_response=all"])
    assert cfg.algorithm.opponents_per_response == "all"
    with pytest.raises(ConfigError, match=r"opponents_per_response.*'every'"):
        load_train_config(GAME, ["algorithm.opponents_per_response=every"])

"""Pure maths of NLHF (numpy/torch, no Ray): matrix games, the regularised Nash equilibrium and
its distances, and exact Nash-MP with its baselines. See ``docs/nash-mp.md``.

Submodules: ``games`` (generators, validation), ``equilibrium`` (``solve_nash``, KL,
exploitability, span), ``exact`` (``nash_mp_step``, ``run_nash_mp``, ``run_nash_md``,
``run_omd``, ``run_egpo``, ``run_algorithm``, ``GameTrace``).
"""

from nlhf.algorithms.equilibrium import (
    best_response,
    exploitability,
    kl,
    solve_nash,
    span_seminorm,
)
from nlhf.algorithms.exact import (
    ALGORITHMS,
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
    bradley_terry_game,
    bradley_terry_game_from_seed,
    cyclic_game,
    random_game,
    softmax_reference,
    uniform_reference,
    validate_preference_matrix,
    validate_reference,
)

__all__ = [
    "ALGORITHMS",
    "GameError",
    "GameTrace",
    "best_response",
    "bradley_terry_game",
    "bradley_terry_game_from_seed",
    "cyclic_game",
    "exploitability",
    "kl",
    "nash_mp_step",
    "random_game",
    "run_algorithm",
    "run_egpo",
    "run_nash_md",
    "run_nash_mp",
    "run_omd",
    "softmax_reference",
    "solve_nash",
    "span_seminorm",
    "uniform_reference",
    "validate_preference_matrix",
    "validate_reference",
]

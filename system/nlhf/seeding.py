"""Sampling seeds: one per response, derived from (run seed, phase, iteration, prompt, sample).

Every response a run samples gets its own seed from ``numpy.random.SeedSequence`` keyed by
where it is drawn, so no two draws of a run share Monte-Carlo noise: opponents never reuse the
seeds of the responses they are judged against, iterations never overlap, and the held-out
evaluations of the initial and the final policy use seeds disjoint from each other and from
training. (The former scheme, ``base + 10 k + phase`` plus ``i * n`` per prompt plus vLLM's child
index, let 12,288 game-mode samples share about 1,134 seeds.)

Seeds are 62-bit integers (vLLM seeds a ``torch.Generator`` per request); with 2^62 values a
collision among a run's ~10^5 draws has probability ~10^-9, and tests check distinctness.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["Phase", "sample_seeds"]


class Phase(IntEnum):
    """Where in a run a response is sampled (part of its seed's key)."""

    TRAIN = 0  # y ~ pi_k from the current pool
    OPPONENT = 1  # opponents from the extrapolated (or mixture) pool
    WIN_PROB = 2  # a fresh response of pi_{k+1} for the per-iteration win probability
    EVAL_INITIAL = 3  # the initial policy on the held-out prompts
    EVAL_FINAL = 4  # the final policy on the held-out prompts
    EVAL_OTHER = 5  # `nlhf eval` of a checkpoint against a baseline


def sample_seeds(run_seed: int, phase: Phase | int, iteration: int, num_prompts: int, samples: int) -> list[list[int]]:
    """Seeds for ``num_prompts`` x ``samples`` responses: ``out[p][s]`` for prompt ``p`` (its
    position in the call) and sample ``s``, at ``iteration`` (0-based; evaluations use 0).

    Each seed is the first 62 bits of ``SeedSequence(run_seed, spawn_key=(phase, iteration, p, s))``.

    Raises:
        ValueError: a negative argument.
    """
    for name, v in (("run_seed", run_seed), ("phase", int(phase)), ("iteration", iteration),
                    ("num_prompts", num_prompts), ("samples", samples)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    out = []
    for p in range(num_prompts):
        row = []
        for s in range(samples):
            words = np.random.SeedSequence(run_seed, spawn_key=(int(phase), iteration, p, s)).generate_state(2, np.uint64)
            row.append(int(words[0] >> np.uint64(2)))
        out.append(row)
    return out

"""Sampling primitives of the mixture rollout worker (:mod:`nlhf.rollout.mixture`): the
geometric mixture's next-token log-probs, vLLM's temperature / top-p processing, and the
per-sample inverse-CDF draw. Pure torch; see :mod:`nlhf.rollout.mixture` for the equations."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nlhf.algorithms.losses import geometric_mixture_logits


def mixture_logprobs(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mixture: float,
                     actions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token log-probs of the geometric mixture, float32.

    Args:
        policy_logits, ref_logits: (R, V) logits of the policy and the reference policy.
        mixture: m in [0, 1] (the weight of the reference).
        actions: game mode: (A,) token ids; both models are restricted to them first.

    Returns:
        (R, V), or (R, A) in game mode: ``log_softmax((1-m) log_softmax(z) + m log_softmax(z_ref))``.
    """
    if actions is not None:
        policy_logits, ref_logits = policy_logits[:, actions], ref_logits[:, actions]
    return geometric_mixture_logits(policy_logits.float(), ref_logits.float(), mixture)


def processed_logprobs(logprobs: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log q: temperature, then vLLM's top-p nucleus, renormalised (see the module docstring).

    Args:
        logprobs: (R, V) normalised log-probs (the mixture's).
        temperature: > 0; top_p: in (0, 1].

    Returns:
        (R, V) log-probs, ``-inf`` outside the nucleus.
    """
    x = logprobs if temperature == 1.0 else torch.log_softmax(logprobs / temperature, dim=-1)
    if top_p >= 1.0:
        return x
    sorted_x, order = x.sort(dim=-1, descending=False)
    cumulative = sorted_x.exp().cumsum(dim=-1)
    outside = cumulative <= 1.0 - top_p
    outside[:, -1] = False  # the most probable token stays
    sorted_x = sorted_x.masked_fill(outside, float("-inf"))
    return torch.log_softmax(torch.empty_like(x).scatter_(-1, order, sorted_x), dim=-1)


def draw_tokens(logq: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One draw per row by inverse CDF, row r's uniform from ``generators[r]`` (a CPU generator).

    Args:
        logq: (R, V) log-probs to sample from (any device).
        generators: R generators; each advances by exactly one float64 uniform.

    Returns:
        (R,) long indices into the last dimension; a token of probability 0 is never drawn.
    """
    u = torch.tensor([float(torch.rand((), generator=g, dtype=torch.float64)) for g in generators],
                     dtype=torch.float64, device=logq.device)
    cdf = logq.double().exp().cumsum(dim=-1)  # (R, V)
    target = (u * cdf[:, -1]).unsqueeze(-1)  # (R, 1), strictly below the total mass
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logq.shape[-1] - 1)

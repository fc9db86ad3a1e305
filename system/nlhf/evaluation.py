"""Win rate of one policy against another on held-out prompts, with a 95% confidence interval.

For P held-out prompts and S samples per prompt, sample ``s`` of the policy is judged against
sample ``s`` of the baseline (independent draws with seeds disjoint from training, see
:mod:`nlhf.seeding`). The win rate is the mean judge probability; its confidence interval
treats prompts as the independent units (the S comparisons of one prompt are correlated): the
per-prompt means are averaged and the standard error is their standard deviation / sqrt(P),
95% normal interval ``mean +- 1.96 se``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nlhf.batch import Rollout

__all__ = ["win_rate_report", "comparisons"]


def comparisons(policy: Sequence[Sequence[Rollout]], baseline: Sequence[Sequence[Rollout]]
                ) -> tuple[list[str], list[str], list[str]]:
    """Flatten ``policy[p][s]`` vs ``baseline[p][s]`` into (prompts, responses_a, responses_b), prompt-major.

    Raises:
        ValueError: the two sides differ in prompts or in samples per prompt.
    """
    if len(policy) != len(baseline):
        raise ValueError(f"{len(policy)} prompts for the policy but {len(baseline)} for the baseline")
    x, a, b = [], [], []
    for p, (ga, gb) in enumerate(zip(policy, baseline)):
        if len(ga) != len(gb):
            raise ValueError(f"prompt {p}: {len(ga)} policy samples but {len(gb)} baseline samples")
        for ya, yb in zip(ga, gb):
            x.append(ya.prompt)
            a.append(ya.response_text)
            b.append(yb.response_text)
    return x, a, b


def win_rate_report(probabilities: Sequence[float], num_prompts: int, *, policy: Sequence[Sequence[Rollout]] = (),
                    baseline: Sequence[Sequence[Rollout]] = ()) -> dict[str, Any]:
    """Win rate and 95% CI from prompt-major judge probabilities of shape (num_prompts * S,).

    With ``policy``/``baseline`` rollouts also reports mean response lengths (tokens) and the
    fraction of comparisons whose two responses are identical.

    Returns:
        ``{"win_rate", "ci95_low", "ci95_high", "se", "num_prompts", "samples_per_prompt",
        "num_comparisons", ...lengths}``.

    Raises:
        ValueError: the number of probabilities is not a multiple of ``num_prompts``, or is 0.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if num_prompts < 1 or probs.size == 0 or probs.size % num_prompts:
        raise ValueError(f"{probs.size} probabilities do not split into {num_prompts} prompts")
    per_prompt = probs.reshape(num_prompts, -1).mean(axis=1)
    mean = float(per_prompt.mean())
    se = float(per_prompt.std(ddof=1) / np.sqrt(num_prompts)) if num_prompts > 1 else float("nan")
    out: dict[str, Any] = {
        "win_rate": mean, "ci95_low": mean - 1.96 * se, "ci95_high": mean + 1.96 * se, "se": se,
        "num_prompts": num_prompts, "samples_per_prompt": probs.size // num_prompts, "num_comparisons": int(probs.size),
    }
    if policy and baseline:
        flat_a = [y for g in policy for y in g]
        flat_b = [y for g in baseline for y in g]
        out["policy_mean_len"] = float(np.mean([len(y.response_token_ids) for y in flat_a]))
        out["baseline_mean_len"] = float(np.mean([len(y.response_token_ids) for y in flat_b]))
        out["identical_fraction"] = float(np.mean([ya.response_text == yb.response_text for ya, yb in zip(flat_a, flat_b)]))
    return out

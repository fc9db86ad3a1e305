"""``nlhf judge eval``: agreement of a trained judge with human labels on LLMBar-format files.

Each labelled pair (``input, output_1, output_2, label``) is asked in both orders,
``P(output_1 > output_2)`` and ``P(output_2 > output_1)``. An order counts as correct when
``P > 1/2`` picks the labelled winner (``P == 1/2`` is never correct). Reported per file:

* ``accuracy``: pairs correct in BOTH orders (the headline number);
* ``accuracy_12`` / ``accuracy_21``: each order alone; ``accuracy_per_order``: their mean;
* ``consistency``: pairs whose two answers name the same winner.

Label ties (anything but 1 or 2) are excluded and counted in ``ties_excluded``. Baselines
(``baselines=True``): ``longer_wins`` (P = 1 for the response with more characters, 1/2 on equal
length) and ``random`` (an independent seeded uniform P for every question, so about 1/2 per
order and 1/4 in both orders).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nlhf.data.preferences import load_llmbar
from nlhf.judge.pairwise import PairwiseJudge

PreferFn = Callable[[list[str], list[str], list[str]], np.ndarray]


def agreement(p_12: np.ndarray, p_21: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement metrics for ``n`` labelled pairs.

    Args:
        p_12: P(output_1 > output_2), shape (n,).
        p_21: P(output_2 > output_1), shape (n,).
        labels: 1 or 2 (the better output), shape (n,).
    Returns:
        dict with n, accuracy (both orders), accuracy_12, accuracy_21, accuracy_per_order, consistency.
    """
    one = labels == 1
    ok_12 = np.where(one, p_12 > 0.5, p_12 < 0.5)
    ok_21 = np.where(one, p_21 < 0.5, p_21 > 0.5)
    same_winner = ((p_12 > 0.5) & (p_21 < 0.5)) | ((p_12 < 0.5) & (p_21 > 0.5))
    n = int(len(labels))

    def r(x: np.ndarray) -> float:
        return round(float(np.mean(x)), 4) if n else float("nan")

    return {"n": n, "accuracy": r(ok_12 & ok_21), "accuracy_12": r(ok_12), "accuracy_21": r(ok_21),
            "accuracy_per_order": r(np.concatenate([ok_12, ok_21])), "consistency": r(same_winner)}


def longer_wins(prompts: list[str], a: list[str], b: list[str]) -> np.ndarray:
    """Baseline judge: 1 if ``a`` has more characters than ``b``, 0 if fewer, 1/2 if equal; (B,)."""
    la = np.array([len(x) for x in a])
    lb = np.array([len(x) for x in b])
    return np.where(la > lb, 1.0, np.where(la < lb, 0.0, 0.5))


def random_judge(seed: int = 0) -> PreferFn:
    """Baseline judge: an independent uniform P for every question, from a generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    return lambda prompts, a, b: rng.uniform(size=len(prompts))


def _both_orders(fn: PreferFn, prompts: list[str], o1: list[str], o2: list[str]) -> tuple[np.ndarray, np.ndarray]:
    n = len(prompts)
    p = np.asarray(fn(prompts + prompts, o1 + o2, o2 + o1), dtype=np.float64)
    return p[:n], p[n:]


def evaluate_judge(judge_dir: str | Path, data_files: Sequence[str], baselines: bool = True, seed: int = 0,
                   max_length: int | None = None, batch_size: int = 32) -> dict:
    """Agreement of the judge in ``judge_dir`` with the labels of each LLMBar-format file.

    Args:
        judge_dir: folder written by ``nlhf judge train`` (any head).
        data_files: LLMBar-format JSON files.
        baselines: also score ``longer_wins`` and a seeded ``random`` judge.
        seed: seed of the random baseline (re-seeded per file).
        max_length: token budget (default: the judge's training length).
    Returns:
        ``{"judge", "head", "max_length", "files": {file name: {"path", "ties_excluded",
        "judge": metrics, "longer_wins": metrics, "random": metrics, "truncated_pairs",
        "seconds"}}, "overall": {...pooled over files...}}``; metrics as in :func:`agreement`.
    Raises:
        FileNotFoundError: a missing judge folder or data file.
    """
    judge = PairwiseJudge.from_folder(judge_dir, max_length=max_length, batch_size=batch_size)
    out: dict = {"judge": str(judge_dir), "head": judge.head, "max_length": judge.max_length, "files": {}}
    pooled: dict[str, list[np.ndarray]] = {}
    for f in data_files:
        t0 = time.time()
        pairs, ties = load_llmbar(f)
        prompts = [p.prompt for p in pairs]
        o1 = [p.output_1 for p in pairs]
        o2 = [p.output_2 for p in pairs]
        labels = np.array([p.label for p in pairs])
        before = judge.truncations
        judges: dict[str, PreferFn] = {"judge": judge.prefer}
        if baselines:
            judges["longer_wins"] = longer_wins
            judges["random"] = random_judge(seed)
        entry: dict = {"path": str(f), "ties_excluded": ties}
        for name, fn in judges.items():
            p12, p21 = _both_orders(fn, prompts, o1, o2)
            entry[name] = agreement(p12, p21, labels)
            pooled.setdefault(name, []).append(np.stack([p12, p21, labels]))
        entry["truncated_pairs"] = judge.truncations - before
        entry["seconds"] = round(time.time() - t0, 1)
        out["files"][Path(f).name] = entry
    out["overall"] = {name: agreement(*np.concatenate(v, axis=1)) for name, v in pooled.items()} if pooled else {}
    return out

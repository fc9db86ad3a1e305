"""Pick and build the judge named by a :class:`~nlhf.config.JudgeConfig`.

Heavy libraries (torch, transformers, vLLM) are imported only by the adapter that needs them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nlhf.config import JudgeConfig
from nlhf.judge.base import Judge, JudgeError

KINDS = ("pairwise", "bradley-terry", "llm", "matrix")


def _folder(cfg: JudgeConfig) -> Path:
    """The judge's local folder; a hub id (``bradley-terry``, ``llm``) resolves to its snapshot in
    ``$NLHF_CACHE/hub`` or the HF cache, downloaded there when online (see :mod:`nlhf.references`)."""
    if cfg.path is None:
        raise JudgeError(f"judge {cfg.kind}: judge.path is required for judge.kind {cfg.kind!r}")
    from nlhf.references import is_hub_id, resolve_reference

    if cfg.kind != "pairwise" and is_hub_id(cfg.path):
        return Path(resolve_reference("judge.path", cfg.path, os.environ.get("NLHF_CACHE"), check_only=False))
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        hint = " (train it first: nlhf judge train --config ...)" if cfg.kind == "pairwise" else ""
        raise FileNotFoundError(f"judge {cfg.kind}: judge.path is not a folder: {cfg.path}{hint}")
    return path


def build_judge(cfg: JudgeConfig, *, matrix: np.ndarray | None = None,
                actions: Sequence[str] | None = None) -> Judge:
    """Build the judge ``cfg.kind`` names, in this process.

    Args:
        cfg: the judge section. ``path``, ``max_length``, ``on_overlong`` and ``batch_size`` are
            passed to the folder-based adapters (``pairwise``, ``bradley-terry``, ``llm``).
        matrix: (n, n) preference matrix, required for ``kind == "matrix"`` (ignored otherwise).
        actions: the n action strings of the matrix game, required with ``matrix``.
    Returns:
        a :class:`Judge`; every adapter also has an int ``truncations`` counter, and ``llm`` a
        ``close()`` that must be called before the process ends.
    Raises:
        JudgeError: missing ``matrix``/``actions``/``path``, or an adapter refused its inputs.
        FileNotFoundError: ``path`` is not a folder.
        ConfigError: ``path`` is a hub id that cannot be resolved (e.g. not cached while offline).
    """
    kind = cfg.kind
    if kind == "matrix":
        if matrix is None or actions is None:
            raise JudgeError("judge matrix: build_judge needs matrix= and actions= for judge.kind 'matrix'")
        from nlhf.judge.matrix import MatrixJudge

        return MatrixJudge(np.asarray(matrix, dtype=np.float64), list(actions))
    if kind == "bradley-terry":
        from nlhf.judge.bradley_terry import BradleyTerryJudge

        return BradleyTerryJudge.from_folder(_folder(cfg), max_length=cfg.max_length, on_overlong=cfg.on_overlong,
                                             batch_size=cfg.batch_size)
    if kind == "llm":
        import torch

        from nlhf.judge.llm import LLMJudge

        dtype = "auto" if torch.cuda.is_available() else "float32"
        return LLMJudge(_folder(cfg), max_length=cfg.max_length, on_overlong=cfg.on_overlong,
                        batch_size=cfg.batch_size, dtype=dtype)
    if kind == "pairwise":
        from nlhf.judge.pairwise import PairwiseJudge

        return PairwiseJudge.from_folder(_folder(cfg), max_length=cfg.max_length, on_overlong=cfg.on_overlong,
                                         batch_size=cfg.batch_size)
    raise JudgeError(f"judge: unknown judge.kind {kind!r}; expected one of {KINDS}")

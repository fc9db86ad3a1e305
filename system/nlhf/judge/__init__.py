"""nlhf.judge: preference models P(y > y' | x) behind one interface, and their Ray Serve service.

``Judge``, ``JudgeError`` and ``build_judge`` import only numpy and the config; the adapters
(``MatrixJudge``, ``BradleyTerryJudge``, ``LLMJudge``, ``PairwiseJudge``) and the service
(``start_judge_service``, ``serve_judge``) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from nlhf.judge.base import Judge, JudgeError, check_request, validate_probabilities
from nlhf.judge.factory import build_judge

_LAZY = {
    "MatrixJudge": "nlhf.judge.matrix",
    "BradleyTerryJudge": "nlhf.judge.bradley_terry",
    "LLMJudge": "nlhf.judge.llm",
    "PairwiseJudge": "nlhf.judge.pairwise",
    "start_judge_service": "nlhf.judge.serve",
    "serve_judge": "nlhf.judge.serve",
}

__all__ = ["Judge", "JudgeError", "build_judge", "check_request", "validate_probabilities", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nlhf.judge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

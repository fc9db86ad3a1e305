"""Run telemetry: ``metrics.jsonl``, TensorBoard, Ray/Prometheus metrics, progress, plots.

- :class:`nlhf.telemetry.metrics.RunLogger` and :func:`~nlhf.telemetry.metrics.read_metrics`
- :class:`nlhf.telemetry.progress.Progress`
- :func:`nlhf.telemetry.plots.plot_run`

Imports are lazy so that ``import nlhf.telemetry`` pulls in neither Ray nor matplotlib.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunLogger", "read_metrics", "Progress", "plot_run"]

_WHERE = {
    "RunLogger": "nlhf.telemetry.metrics",
    "read_metrics": "nlhf.telemetry.metrics",
    "Progress": "nlhf.telemetry.progress",
    "plot_run": "nlhf.telemetry.plots",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'nlhf.telemetry' has no attribute {name!r}")

"""The vLLM rollout worker (:class:`RolloutWorker`) and its weight-receiving engine extension
(:class:`nlhf.rollout.extension.WeightReceiver`). Importing this package does not import vLLM."""

from nlhf.rollout.worker import RolloutWorker

__all__ = ["RolloutWorker"]

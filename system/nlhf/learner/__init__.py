"""The DeepSpeed learner and the Ray group of learner ranks.

Modules: :mod:`~nlhf.learner.logprobs` (sequence and per-token log-probs, exact KL to the
reference), :mod:`~nlhf.learner.scoring` (the batch scored at theta_k, alone or fused with the first
inner step), :mod:`~nlhf.learner.update` (inner steps, post-step metrics),
:mod:`~nlhf.learner.snapshot` (theta_k kept in memory or on disk, restored bit for bit),
:mod:`~nlhf.learner.export` (weights for the engines, HF checkpoints, trainer state),
:mod:`~nlhf.learner.worker` (one rank: the algorithms' operations), :mod:`~nlhf.learner.group`
(the Ray group), :mod:`~nlhf.learner.memory` (peak RSS measurement).

``LearnerWorker`` and ``LearnerGroup`` are imported lazily (DeepSpeed and Ray are heavy)."""

from nlhf.learner.logprobs import score_rollouts, sequence_logprobs

__all__ = ["LearnerGroup", "LearnerWorker", "score_rollouts", "sequence_logprobs"]


def __getattr__(name: str):
    if name == "LearnerWorker":
        from nlhf.learner.worker import LearnerWorker

        return LearnerWorker
    if name == "LearnerGroup":
        from nlhf.learner.group import LearnerGroup

        return LearnerGroup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

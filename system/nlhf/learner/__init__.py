"""The DeepSpeed learner: sequence log-probs, the Nash-MP half/full step, checkpoints, and the
Ray group of learner ranks.

``LearnerWorker`` and ``LearnerGroup`` are imported lazily (DeepSpeed and Ray are heavy)."""

from nlhf.learner.logprobs import sequence_logprobs

__all__ = ["LearnerGroup", "LearnerWorker", "sequence_logprobs"]


def __getattr__(name: str):
    if name == "LearnerWorker":
        from nlhf.learner.worker import LearnerWorker

        return LearnerWorker
    if name == "LearnerGroup":
        from nlhf.learner.group import LearnerGroup

        return LearnerGroup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Everything the driver must restore to resume a run, in one serialisable object.

A checkpoint (``checkpoints/iter_N/``) holds three things: the policy as an HF folder, the
learner's trainer state (optimiser, EMA anchor, RNG: written by the learner group), and this
:class:`RunState` as ``run_state.json``. Reading this class tells what the driver's part of a
checkpoint is; actor handles and other live objects are never part of it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlhf.batch import Rollout

RUN_STATE_FILE = "run_state.json"
FORMAT_VERSION = 1


def _rollout_to_dict(r: Rollout) -> dict[str, Any]:
    return dataclasses.asdict(r)


def _rollout_from_dict(d: dict[str, Any]) -> Rollout:
    return Rollout(**d)


@dataclass
class Counters:
    """Running totals of a run (all since iteration 0).

    ``queries``: training preference queries, i.e. distinct judged pairs that feed a loss (a
    pair and its reverse count once; a response compared with an identical one needs none).
    ``comparisons``: training comparisons the losses read (including identical and repeated
    pairs); ``identical``: those between identical responses. ``eval_queries``: judge calls of
    the evaluations (per-iteration win probability, initial/final held-out win rate).
    """

    queries: int = 0
    comparisons: int = 0
    identical: int = 0
    eval_queries: int = 0
    judge_requests: int = 0
    sync_bytes: float = 0.0
    sync_seconds: float = 0.0
    sync_reload_seconds: float = 0.0  # engine-side reload time (the busy part of sync_seconds)
    rollout_restarts: int = 0
    judge_retries: int = 0
    learner_restarts: int = 0


@dataclass
class RunState:
    """The driver's resumable state.

    Attributes:
        run_id: unique id of this run (kept across resumes; names its Serve apps).
        iteration: number of iterations completed (the next one to run is ``iteration``).
        sampler: :meth:`nlhf.data.prompts.PromptSampler.state_dict` of the training prompts.
        counters: :class:`Counters`.
        weight_versions: the weight version each rollout pool must hold (0: initial weights).
        seeds: every sampling seed used so far, per phase name (checked for collisions).
        history: the metrics of every completed iteration (also ``metrics.jsonl``).
        eval_initial: the initial policy's responses on the held-out prompts, ``[prompt][sample]``.
        eval_initial_win: per-iteration evaluation bookkeeping (unused when empty).
    """

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    iteration: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    weight_versions: dict[str, int] = field(default_factory=lambda: {"current": 0, "extrapolated": 0})
    seeds: dict[str, list[int]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_initial: list[list[Rollout]] = field(default_factory=list)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (rollouts as plain dicts)."""
        return {
            "format_version": FORMAT_VERSION,
            "run_id": self.run_id,
            "iteration": self.iteration,
            "sampler": self.sampler,
            "counters": dataclasses.asdict(self.counters),
            "weight_versions": dict(self.weight_versions),
            "seeds": {k: list(v) for k, v in self.seeds.items()},
            "history": self.history,
            "eval_initial": [[_rollout_to_dict(r) for r in g] for g in self.eval_initial],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: an unknown format version or missing keys.
        """
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"run state format {d.get('format_version')!r} is not {FORMAT_VERSION}")
        try:
            return cls(
                run_id=str(d["run_id"]),
                iteration=int(d["iteration"]),
                sampler=dict(d["sampler"]),
                counters=Counters(**d["counters"]),
                weight_versions={k: int(v) for k, v in d["weight_versions"].items()},
                seeds={k: [int(x) for x in v] for k, v in d["seeds"].items()},
                history=list(d["history"]),
                eval_initial=[[_rollout_from_dict(r) for r in g] for g in d["eval_initial"]],
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"run state is incomplete or malformed: {e}") from None

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/run_state.json``; returns its path."""
        path = Path(folder) / RUN_STATE_FILE
        path.write_text(json.dumps(self.to_dict(), allow_nan=True))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "RunState":
        """Read ``folder/run_state.json``.

        Raises:
            FileNotFoundError: no run state there. ValueError: see :meth:`from_dict`.
        """
        return cls.from_dict(json.loads((Path(folder) / RUN_STATE_FILE).read_text()))

    # ------------------------------------------------------------------ seeds
    def record_seeds(self, phase: str, seeds: list[list[int]]) -> None:
        """Remember the seeds of one call (flattened) under ``phase``."""
        self.seeds.setdefault(phase, []).extend(int(s) for row in seeds for s in row)

    def seed_report(self) -> dict[str, Any]:
        """Totals and collisions of every seed used: ``{"total", "distinct", "per_phase",
        "eval_disjoint"}`` (``eval_disjoint``: initial and final evaluation seeds share none with
        each other or with any other phase)."""
        everything = [s for v in self.seeds.values() for s in v]
        ev_i = set(self.seeds.get("EVAL_INITIAL", []))
        ev_f = set(self.seeds.get("EVAL_FINAL", []))
        others = {s for k, v in self.seeds.items() if k not in ("EVAL_INITIAL", "EVAL_FINAL") for s in v}
        return {
            "total": len(everything),
            "distinct": len(set(everything)),
            "per_phase": {k: len(v) for k, v in self.seeds.items()},
            "eval_disjoint": not (ev_i & ev_f) and not (ev_i & others) and not (ev_f & others),
        }

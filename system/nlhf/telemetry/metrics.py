"""Per-iteration run metrics: ``metrics.jsonl``, TensorBoard and Ray's metrics pipeline.

The driver calls :meth:`RunLogger.log` once per iteration with a flat dict of floats under
CleanRL-style grouped names (``charts/win_prob``, ``losses/half_step``, ``time/rollout``, ...).
Every key goes to ``metrics.jsonl`` and to TensorBoard; the keys listed in
:data:`RAY_METRICS` are also mirrored into ``ray.util.metrics`` objects, which Ray exports
to Prometheus (and so to the Ray dashboard's Metrics tab and Grafana).

Prometheus names: Ray 2.60 exports a custom metric ``foo`` as ``ray_foo`` (namespace
``ray``, added by the dashboard agent's OpenTelemetry recorder). Counters are exported as
``ray_<name>_total`` (our counter names already end in ``_total``, so no doubling),
histograms as ``ray_<name>_bucket`` / ``_sum`` / ``_count``. Ray 2.60 rebuilds a
histogram's ``_sum`` from bucket midpoints (an approximation), so the exact per-phase times
are also exported as the gauge ``nlhf_phase_last_seconds``. :func:`prometheus_names`
gives the exported names, so dashboards and tests cannot drift from this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: Prefix Ray's metrics agent puts in front of every custom metric it exports.
RAY_PROMETHEUS_NAMESPACE = "ray"

# Buckets for per-phase wall times: 10 ms .. ~1.5 h.
PHASE_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


@dataclass(frozen=True)
class RayMetricSpec:
    """One ``ray.util.metrics`` object that :class:`RunLogger` registers.

    ``kind`` is ``"gauge"``, ``"counter"`` or ``"histogram"``; every metric carries the
    ``run`` tag plus ``tag_keys``.
    """

    name: str
    kind: str
    description: str
    tag_keys: tuple[str, ...] = ()

    @property
    def all_tag_keys(self) -> tuple[str, ...]:
        """Tag keys including the ``run`` tag every nlhf metric has."""
        return ("run", *self.tag_keys)


#: Every Ray metric RunLogger registers (names are global inside a Ray cluster).
RAY_METRICS: tuple[RayMetricSpec, ...] = (
    RayMetricSpec("nlhf_iteration", "gauge", "Last finished Nash-MP iteration."),
    RayMetricSpec("nlhf_preference_queries_total", "counter", "Preference (judge) queries so far."),
    RayMetricSpec("nlhf_win_prob", "gauge", "P(pi_{k+1} > pi_k) under the judge."),
    RayMetricSpec("nlhf_kl_ref", "gauge", "KL(pi_k || pi_ref)."),
    RayMetricSpec("nlhf_kl_anchor", "gauge", "KL to the mirror-prox anchor pi_k."),
    RayMetricSpec("nlhf_response_length", "gauge", "Mean response length in tokens."),
    RayMetricSpec("nlhf_loss", "gauge", "Learner loss per proximal step.", ("step",)),
    RayMetricSpec("nlhf_tokens_per_second", "gauge", "Rollout throughput per vLLM pool.", ("pool",)),
    RayMetricSpec("nlhf_phase_seconds", "histogram", "Wall time of one phase of an iteration.", ("phase",)),
    RayMetricSpec("nlhf_phase_last_seconds", "gauge", "Wall time of each phase in the last iteration.", ("phase",)),
    RayMetricSpec("nlhf_iteration_seconds", "gauge", "Wall time of the last iteration."),
    RayMetricSpec("nlhf_judge_requests_total", "counter", "Batched requests sent to the judge service."),
    RayMetricSpec("nlhf_judge_latency_seconds", "gauge", "Mean judge request latency in the last iteration."),
    RayMetricSpec("nlhf_weight_sync_seconds", "gauge", "Weight sync wall time in the last iteration."),
    RayMetricSpec("nlhf_weight_sync_bytes_total", "counter", "Bytes of weights sent to rollout pools."),
    RayMetricSpec("nlhf_eval_queries_total", "counter", "Judge queries of the evaluations (win probability, held-out win rate)."),
    RayMetricSpec("nlhf_identical_pair_fraction", "gauge", "Fraction of training comparisons between identical responses."),
    RayMetricSpec("nlhf_logprob_gap", "gauge", "Mean |log pi_engine - log pi_learner| per response token at theta_k."),
    RayMetricSpec("nlhf_grad_norm", "gauge", "Pre-clip gradient norm of the last inner step.", ("step",)),
    RayMetricSpec("nlhf_clip_fraction", "gauge", "Fraction of samples whose importance ratio was clipped.", ("step",)),
    RayMetricSpec("nlhf_importance_ratio", "gauge", "Importance ratio pi_theta / pi_k over the batch.", ("step", "stat")),
    RayMetricSpec("nlhf_pg_weight_std", "gauge", "Standard deviation of the policy-gradient weight.", ("step",)),
    RayMetricSpec("nlhf_faults_total", "counter", "Faults survived (actor restarts, judge retries).", ("kind",)),
)

_SPECS = {s.name: s for s in RAY_METRICS}

# Driver key -> [(ray metric name, extra tags), ...]. Gauges are set, histograms observed,
# counters incremented; running totals (CUMULATIVE_KEYS) are first turned into per-iteration
# amounts by differencing.
_KEY_TO_METRIC: dict[str, list[tuple[str, dict[str, str]]]] = {
    "charts/win_prob": [("nlhf_win_prob", {})],
    "charts/kl_ref": [("nlhf_kl_ref", {})],
    "charts/kl_anchor": [("nlhf_kl_anchor", {})],
    "charts/response_len": [("nlhf_response_length", {})],
    "charts/queries": [("nlhf_preference_queries_total", {})],
    "losses/half_step": [("nlhf_loss", {"step": "half"})],
    "losses/full_step": [("nlhf_loss", {"step": "full"})],
    "perf/tokens_per_s_current": [("nlhf_tokens_per_second", {"pool": "current"})],
    "perf/tokens_per_s_extrapolated": [("nlhf_tokens_per_second", {"pool": "extrapolated"})],
    **{
        f"time/{phase}": [
            ("nlhf_phase_seconds", {"phase": phase}),
            ("nlhf_phase_last_seconds", {"phase": phase}),
        ]
        for phase in ("rollout", "judge", "learn", "sync")
    },
    "time/iteration": [("nlhf_iteration_seconds", {})],
    "judge/requests": [("nlhf_judge_requests_total", {})],
    "judge/latency_s": [("nlhf_judge_latency_seconds", {})],
    "sync/seconds": [("nlhf_weight_sync_seconds", {})],
    "sync/bytes": [("nlhf_weight_sync_bytes_total", {})],
    "charts/eval_queries": [("nlhf_eval_queries_total", {})],
    "charts/identical_fraction": [("nlhf_identical_pair_fraction", {})],
    "rollout/logprob_gap": [("nlhf_logprob_gap", {})],
    **{f"learner/{step}_grad_norm": [("nlhf_grad_norm", {"step": step})] for step in ("half", "full")},
    **{f"learner/{step}_clip_frac": [("nlhf_clip_fraction", {"step": step})] for step in ("half", "full")},
    **{f"learner/{step}_pg_weight_std": [("nlhf_pg_weight_std", {"step": step})] for step in ("half", "full")},
    **{f"learner/{step}_ratio_{stat}": [("nlhf_importance_ratio", {"step": step, "stat": stat})]
       for step in ("half", "full") for stat in ("min", "mean", "max")},
    **{f"faults/{kind}": [("nlhf_faults_total", {"kind": kind})]
       for kind in ("rollout_restarts", "judge_retries", "learner_restarts")},
}

#: Driver keys that RunLogger mirrors into Ray metrics (all keys go to jsonl/TensorBoard).
RAY_MIRRORED_KEYS: tuple[str, ...] = tuple(_KEY_TO_METRIC)

#: Keys the driver logs as running totals since it started. Ray sees the per-iteration
#: difference: counters advance by it and ``nlhf_weight_sync_seconds`` shows the sync time
#: of the last iteration. (jsonl and TensorBoard keep the logged totals.)
CUMULATIVE_KEYS = frozenset({"charts/queries", "charts/eval_queries", "judge/requests", "sync/bytes", "sync/seconds",
                             "faults/rollout_restarts", "faults/judge_retries", "faults/learner_restarts"})

# Ray metric objects, created lazily, once per process (names are global in Ray).
_ray_metrics: dict[str, Any] = {}
_ray_metrics_lock = threading.Lock()


def prometheus_names() -> dict[str, list[str]]:
    """Map each :data:`RAY_METRICS` name to the series names Prometheus sees for it.

    Example: ``nlhf_win_prob`` -> ``["ray_nlhf_win_prob"]``;
    ``nlhf_phase_seconds`` -> ``["ray_nlhf_phase_seconds_bucket", "..._sum", "..._count"]``.
    """
    out: dict[str, list[str]] = {}
    for spec in RAY_METRICS:
        base = f"{RAY_PROMETHEUS_NAMESPACE}_{spec.name}"
        if spec.kind == "counter":
            stem = base[: -len("_total")] if base.endswith("_total") else base
            out[spec.name] = [f"{stem}_total"]
        elif spec.kind == "histogram":
            out[spec.name] = [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
        else:
            out[spec.name] = [base]
    return out


def _ray_metric(name: str) -> Any:
    """The process-wide ``ray.util.metrics`` object for ``name``, created on first use."""
    with _ray_metrics_lock:
        metric = _ray_metrics.get(name)
        if metric is None:
            from ray.util import metrics as rm

            spec = _SPECS[name]
            if spec.kind == "gauge":
                metric = rm.Gauge(name, description=spec.description, tag_keys=spec.all_tag_keys)
            elif spec.kind == "counter":
                metric = rm.Counter(name, description=spec.description, tag_keys=spec.all_tag_keys)
            else:
                metric = rm.Histogram(
                    name,
                    description=spec.description,
                    boundaries=PHASE_SECONDS_BOUNDARIES,
                    tag_keys=spec.all_tag_keys,
                )
            _ray_metrics[name] = metric
        return metric


def _ray_is_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (strings, NaN, inf, None are not plotted)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    try:  # numpy / torch scalars
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _jsonable(value: Any) -> Any:
    """A strict-JSON value: NaN/inf become null (jq, pandas and JavaScript read the file)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    v = _as_float(value)
    if v is not None:
        return v
    try:
        float(value)
    except (TypeError, ValueError):
        return str(value)
    return None  # a non-finite number


class RunLogger:
    """Write one iteration's metrics to ``metrics.jsonl``, TensorBoard and Ray metrics.

    Args:
        output_dir: run folder; created if missing. ``metrics.jsonl`` is appended to, so a
            resumed run keeps its history.
        run_name: value of the ``run`` tag on every Ray metric (tells runs apart in Grafana).
        tensorboard: write scalars under ``output_dir/tensorboard`` (needs the
            ``tensorboard`` package; without it a warning is logged and TensorBoard is off).
        ray_metrics: mirror known keys into ``ray.util.metrics`` when ``ray.is_initialized()``
            (checked at every :meth:`log`, so a logger made before ``ray.init`` still exports).

    Usage::

        with RunLogger("runs/x", "x") as log:
            log.log(1, {"charts/win_prob": 0.53, "time/rollout": 4.2})
    """

    def __init__(
        self,
        output_dir: str,
        run_name: str,
        *,
        tensorboard: bool = True,
        ray_metrics: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name
        self.metrics_path = self.output_dir / METRICS_FILE
        _drop_torn_tail(self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        self._ray_enabled = ray_metrics
        self._last_cumulative: dict[str, float] = {}
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is in the cpu/gpu extras only
                logger.warning("TensorBoard disabled (%s); metrics.jsonl is still written", e)
            else:
                self._writer = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR))

    def rewind(self, iterations: int) -> None:
        """Forget every record after iteration ``iterations`` (a resumed or recovered run repeats
        them): ``metrics.jsonl`` keeps only lines of iterations <= ``iterations``, and TensorBoard
        events of later steps are purged when the next ones are written."""
        self._file.close()
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["iteration"]) <= iterations:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn line of a killed run
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        tmp.replace(self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        self._last_cumulative.clear()
        if self._writer is not None and iterations >= 0:
            from torch.utils.tensorboard import SummaryWriter

            self._writer.close()
            self._writer = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=iterations + 1)

    def log(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` for ``iteration``: one jsonl line, TensorBoard scalars, Ray metrics.

        Unknown keys go to jsonl and TensorBoard only. Non-numeric values go to jsonl only;
        NaN/inf are written as ``null`` and skipped by TensorBoard and Ray.
        """
        if self._file.closed:
            raise RuntimeError(f"RunLogger for {self.metrics_path} is closed")
        record = {"iteration": int(iteration), "time": time.time()}
        record.update({k: _jsonable(v) for k, v in metrics.items() if k not in record})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

        numeric = {k: v for k, v in ((k, _as_float(v)) for k, v in metrics.items()) if v is not None}
        if self._writer is not None:
            for key, value in numeric.items():
                self._writer.add_scalar(key, value, global_step=int(iteration))
            self._writer.flush()
        if self._ray_enabled and _ray_is_initialized():
            try:
                self._log_ray(int(iteration), numeric)
            except Exception:  # telemetry must never stop training
                logger.exception("could not update Ray metrics")

    def _log_ray(self, iteration: int, numeric: Mapping[str, float]) -> None:
        run = {"run": self.run_name}
        _ray_metric("nlhf_iteration").set(iteration, tags=run)
        for key, value in numeric.items():
            if key in CUMULATIVE_KEYS:
                # The first sighting counts everything so far (a new process starts its
                # counters at 0, which Prometheus' rate() treats as a reset). A total that
                # went down (a restarted driver reusing this logger) counts from zero.
                previous = self._last_cumulative.get(key, 0.0)
                self._last_cumulative[key] = value
                value = value - previous if value >= previous else value
            for name, extra in _KEY_TO_METRIC.get(key, ()):
                tags = {**run, **extra}
                kind = _SPECS[name].kind
                metric = _ray_metric(name)
                if kind == "gauge":
                    metric.set(value, tags=tags)
                elif kind == "histogram":
                    if value >= 0:
                        metric.observe(value, tags=tags)
                elif value > 0:  # Ray counters reject increments <= 0
                    metric.inc(value, tags=tags)

    def close(self) -> None:
        """Flush and close ``metrics.jsonl`` and the TensorBoard writer (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a final line without newline (a run killed mid-write) so appends stay valid."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: dropping incomplete last line from an interrupted run", path)
        f.truncate(keep)


def read_metrics(output_dir: str | os.PathLike[str]) -> list[dict]:
    """Read every record of ``output_dir/metrics.jsonl`` (or of that file, if given directly).

    Returns ``[]`` when the file does not exist. A torn final line (a run killed mid-write)
    is skipped; a malformed line elsewhere raises ``ValueError`` naming file and line.
    """
    path = Path(output_dir)
    if path.is_dir() or not path.suffix:
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                logger.warning("%s:%d: skipping incomplete last line", path, lineno)
                continue
            raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
    return records

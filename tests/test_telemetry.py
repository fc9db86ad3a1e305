"""Run telemetry: metrics.jsonl, TensorBoard, Ray metric objects, progress lines, plots."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest

from nlhf.telemetry.metrics import (
    METRICS_FILE,
    RAY_METRICS,
    RAY_MIRRORED_KEYS,
    RunLogger,
    prometheus_names,
    read_metrics,
)
from nlhf.telemetry.plots import plot_run
from nlhf.telemetry.progress import Progress, format_duration


def _iteration_metrics(k: int) -> dict[str, float]:
    """What the driver logs for iteration k (all keys of the driver contract)."""
    return {
        "charts/win_prob": 0.5 + 0.01 * k,
        "charts/kl_ref": 0.002 * k,
        "charts/kl_anchor": 0.001,
        "charts/response_len": 100.0 + k,
        "charts/queries": 64.0 * k,
        "losses/half_step": 0.7 - 0.01 * k,
        "losses/full_step": 0.69 - 0.01 * k,
        "perf/tokens_per_s_current": 480.0,
        "perf/tokens_per_s_extrapolated": 470.0,
        "time/rollout": 3.0,
        "time/judge": 1.0,
        "time/learn": 2.0,
        "time/sync": 0.2,
        "time/iteration": 6.3,
        "sync/bytes": 2.5e8 * k,  # running totals, like charts/queries
        "sync/seconds": 0.2 * k,
        "judge/requests": 2.0 * k,
        "judge/latency_s": 0.015,
        "charts/eval_queries": 10.0 * k,
        "charts/identical_fraction": 0.05,
        "rollout/logprob_gap": 0.002,
        **{f"learner/{step}_{key}": 0.1 for step in ("half", "full")
           for key in ("grad_norm", "clip_frac", "pg_weight_std", "ratio_min", "ratio_mean", "ratio_max")},
        "faults/rollout_restarts": float(k > 1),
        "faults/judge_retries": 0.0,
        "faults/learner_restarts": 0.0,
    }


# -- RunLogger: jsonl + TensorBoard ------------------------------------------------------------


def test_run_logger_writes_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with RunLogger(str(tmp_path), "t", ray_metrics=False) as log:
        for k in (1, 2, 3):
            log.log(k, {**_iteration_metrics(k), "custom/thing": 7.0, "note": "text ok", "charts/kl_anchor": float("nan")})
        # flushed per line: readable while the logger is still open
        assert len(read_metrics(tmp_path)) == 3

    records = read_metrics(str(tmp_path))
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert records[1]["charts/win_prob"] == pytest.approx(0.52)
    assert records[0]["custom/thing"] == 7.0 and records[0]["note"] == "text ok"
    assert records[0]["charts/kl_anchor"] is None  # NaN -> null: the file is strict JSON
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in records)
    # one JSON object per line, key order: iteration, time, then the metrics
    first = (tmp_path / METRICS_FILE).read_text().splitlines()[0]
    assert list(json.loads(first))[:3] == ["iteration", "time", "charts/win_prob"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir())
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"charts/win_prob", "time/rollout", "custom/thing"} <= set(tags)
    assert "note" not in tags and "charts/kl_anchor" not in tags  # jsonl-only
    steps = [(e.step, e.value) for e in acc.Scalars("charts/win_prob")]
    assert [s for s, _ in steps] == [1, 2, 3]
    assert steps[2][1] == pytest.approx(0.53)


def test_run_logger_appends_on_resume_and_drops_torn_line(tmp_path: Path) -> None:
    with RunLogger(str(tmp_path), "t", tensorboard=False, ray_metrics=False) as log:
        log.log(1, {"charts/win_prob": 0.5})
    with open(tmp_path / METRICS_FILE, "a") as f:  # killed mid-write
        f.write('{"iteration": 2, "charts/wi')
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1]
    with RunLogger(str(tmp_path), "t", tensorboard=False, ray_metrics=False) as log:
        log.log(2, {"charts/win_prob": 0.6})
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]


def test_read_metrics_missing_and_corrupt(tmp_path: Path) -> None:
    assert read_metrics(tmp_path / "nope") == []
    (tmp_path / METRICS_FILE).write_text('{"iteration": 1}\nnot json\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(tmp_path)


def test_log_after_close_is_an_error(tmp_path: Path) -> None:
    log = RunLogger(str(tmp_path), "t", tensorboard=False, ray_metrics=False)
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.log(1, {})


def test_metric_catalogue_is_consistent() -> None:
    names = [s.name for s in RAY_METRICS]
    assert len(names) == len(set(names))
    for spec in RAY_METRICS:
        assert re.fullmatch(r"nlhf_[a-z_]+", spec.name)
        assert (spec.kind == "counter") == spec.name.endswith("_total")
    prom = prometheus_names()
    assert prom["nlhf_win_prob"] == ["ray_nlhf_win_prob"]
    assert prom["nlhf_preference_queries_total"] == ["ray_nlhf_preference_queries_total"]
    assert "ray_nlhf_phase_seconds_bucket" in prom["nlhf_phase_seconds"]
    for key in ("charts/win_prob", "charts/queries", "time/judge", "sync/bytes", "judge/latency_s"):
        assert key in RAY_MIRRORED_KEYS


# -- RunLogger: Ray metrics ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """A one-CPU local Ray cluster for this module (reused if one is already up)."""
    assert os.environ.get("RAY_AUTH_MODE") == "disabled"  # set by conftest
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.ray
def test_run_logger_updates_ray_metrics_with_tags(tmp_path: Path, local_ray) -> None:
    from nlhf.telemetry import metrics as m

    with RunLogger(str(tmp_path / "a"), "run-a", tensorboard=False) as log:
        for k in (1, 2):
            log.log(k, _iteration_metrics(k))
        # A non-monotone running total and a zero per-iteration count must not raise
        # (Ray counters reject increments <= 0).
        log.log(3, {"charts/queries": 10.0, "judge/requests": 0.0, "time/judge": float("nan")})

    created = dict(m._ray_metrics)
    assert set(created) == {s.name for s in RAY_METRICS}
    assert created["nlhf_tokens_per_second"].info["tag_keys"] == ("run", "pool")
    assert created["nlhf_loss"].info["tag_keys"] == ("run", "step")
    assert created["nlhf_phase_seconds"].info["tag_keys"] == ("run", "phase")
    assert created["nlhf_win_prob"].info["tag_keys"] == ("run",)
    assert type(created["nlhf_preference_queries_total"]).__name__ == "Counter"
    assert type(created["nlhf_phase_seconds"]).__name__ == "Histogram"

    # A second logger (another run in the same process) reuses the same metric objects.
    with RunLogger(str(tmp_path / "b"), "run-b", tensorboard=False) as log:
        log.log(1, _iteration_metrics(1))
    assert all(m._ray_metrics[n] is created[n] for n in created)


class _FakeMetric:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict]] = []

    def set(self, value: float, tags: dict) -> None:
        self.calls.append(("set", value, tags))

    def inc(self, value: float, tags: dict) -> None:
        assert value > 0  # what Ray's Counter enforces
        self.calls.append(("inc", value, tags))

    def observe(self, value: float, tags: dict) -> None:
        self.calls.append(("observe", value, tags))


def test_ray_updates_from_driver_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running totals become per-iteration increments; tags tell pools/steps/phases apart."""
    from nlhf.telemetry import metrics as m

    fakes: dict[str, _FakeMetric] = {}
    monkeypatch.setattr(m, "_ray_is_initialized", lambda: True)
    monkeypatch.setattr(m, "_ray_metric", lambda name: fakes.setdefault(name, _FakeMetric()))
    with RunLogger(str(tmp_path), "r", tensorboard=False) as log:
        log.log(1, {"charts/queries": 64.0, "sync/bytes": 100.0, "sync/seconds": 0.5, "judge/requests": 2.0,
                    "time/rollout": 3.0, "perf/tokens_per_s_current": 480.0, "losses/half_step": 0.1,
                    "custom/unknown": 1.0})
        log.log(2, {"charts/queries": 128.0, "sync/bytes": 250.0, "sync/seconds": 0.75, "judge/requests": 2.0,
                    "charts/win_prob": float("nan")})
    run = {"run": "r"}
    assert fakes["nlhf_preference_queries_total"].calls == [("inc", 64.0, run), ("inc", 64.0, run)]
    assert fakes["nlhf_weight_sync_bytes_total"].calls == [("inc", 100.0, run), ("inc", 150.0, run)]
    assert fakes["nlhf_judge_requests_total"].calls == [("inc", 2.0, run)]  # no new requests: no inc
    assert fakes["nlhf_weight_sync_seconds"].calls == [("set", 0.5, run), ("set", 0.25, run)]
    assert fakes["nlhf_iteration"].calls == [("set", 1, run), ("set", 2, run)]
    assert fakes["nlhf_phase_seconds"].calls == [("observe", 3.0, {**run, "phase": "rollout"})]
    assert fakes["nlhf_phase_last_seconds"].calls == [("set", 3.0, {**run, "phase": "rollout"})]
    assert fakes["nlhf_tokens_per_second"].calls == [("set", 480.0, {**run, "pool": "current"})]
    assert fakes["nlhf_loss"].calls == [("set", 0.1, {**run, "step": "half"})]
    assert "nlhf_win_prob" not in fakes  # NaN is not exported
    # every tag set matches the metric's declared tag keys (Ray rejects missing ones)
    specs = {s.name: s for s in RAY_METRICS}
    for name, fake in fakes.items():
        assert all(set(tags) == set(specs[name].all_tag_keys) for _, _, tags in fake.calls), name


# -- Progress --------------------------------------------------------------------------------


def test_progress_plain_one_line_per_iteration() -> None:
    stream = io.StringIO()  # not a TTY, so "auto" means plain
    with Progress(10, stream=stream) as progress:
        assert progress.mode == "plain"
        for k in range(3):
            progress.phase("rollout")
            progress.phase("judge")
            progress.phase("sync")
            progress.update(k + 1, {"charts/win_prob": 0.53 + k / 100, "charts/kl_ref": 0.0123})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("iteration 1/10 | phase sync | win_prob 0.530 | kl_ref 0.0123")
    assert lines[2].startswith("iteration 3/10 | phase sync | win_prob 0.550")
    assert all(re.search(r"\| eta (\d+s|\d+m\d\ds|\d+h\d\dm)$", line) for line in lines)


def test_progress_without_win_prob_and_eta() -> None:
    stream = io.StringIO()
    progress = Progress(4, mode="plain", stream=stream)
    progress._t0 = 0.0  # pretend the run started long ago
    progress.phase("half_step")
    progress.update(1, {"time/iteration": 2.0})
    assert "win_prob" not in stream.getvalue()
    assert "phase half_step" in stream.getvalue() and "2.0s/it" in stream.getvalue()
    assert format_duration(83.2) == "1m23s" and format_duration(3725) == "1h02m"
    assert format_duration(None) == "?"


def test_progress_rich_mode_renders() -> None:
    stream = io.StringIO()
    with Progress(5, mode="rich", stream=stream) as progress:
        progress.phase("rollout")
        progress.update(1, {"charts/win_prob": 0.61})
    out = stream.getvalue()
    assert "iteration 1/5" in out and "0.610" in out


def test_progress_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        Progress(3, mode="fancy")  # type: ignore[arg-type]


# -- plot_run --------------------------------------------------------------------------------


def test_plot_run_writes_png(tmp_path: Path) -> None:
    with RunLogger(str(tmp_path), "p", tensorboard=False, ray_metrics=False) as log:
        for k in range(1, 9):
            metrics = _iteration_metrics(k)
            if k == 4:  # keys may be missing on some iterations
                del metrics["perf/tokens_per_s_extrapolated"], metrics["time/sync"]
            log.log(k, metrics)
    out = tmp_path / "plots" / "run.png"
    plot_run(str(tmp_path), str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_run_without_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / METRICS_FILE))):
        plot_run(str(tmp_path), str(tmp_path / "x.png"))
    (tmp_path / METRICS_FILE).write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(str(tmp_path), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_progress_eta_ignores_start_up_and_notes_print() -> None:
    stream = io.StringIO()
    progress = Progress(10, mode="plain", stream=stream)  # used without `with`, like the session
    progress.phase("start-up")
    progress._t0 -= 1000.0  # a slow start-up must not count towards the per-iteration pace
    progress.note("actors up")
    progress.update(1, {"time/iteration": 2.0})
    assert progress.eta_seconds() == pytest.approx(18.0, abs=0.5)  # 9 left x 2 s
    progress._t_first -= 30.0  # two more iterations took 30 s in all: 15 s each
    progress.update(3, {})
    assert progress.eta_seconds() == pytest.approx(7 * 15.0, abs=0.5)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "actors up"
    assert lines[1].endswith("eta 18s") and lines[2].endswith("eta 1m45s")

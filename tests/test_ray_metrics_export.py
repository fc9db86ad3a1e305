"""RunLogger's metrics reach the node's Prometheus export (what the dashboard and Grafana scrape).

Measured with Ray 2.60 here: with the default ``metrics_report_interval_ms`` (10 s) custom
metrics appeared on ``/metrics`` ~10 s after being recorded; this test sets 1 s to be quick.
Names: ``ray_`` + the metric name; counters keep their ``_total``; histograms get
``_bucket``/``_sum``/``_count`` (``_sum`` is rebuilt from bucket midpoints, so only
``_count`` is exact). Every series also carries Ray's labels (SessionName, NodeAddress,
WorkerId, Component, Version) besides ours.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from nlhf.telemetry.metrics import RunLogger, prometheus_names

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list]:
    """Samples on http://127.0.0.1:port/metrics, by sample name ({} if unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def _value(samples: dict[str, list], name: str, **labels: str) -> float | None:
    for s in samples.get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


@pytest.fixture(scope="module")
def ray_with_metrics_port():
    """A local cluster whose metrics agent listens on a known free loopback port."""
    assert os.environ.get("RAY_AUTH_MODE") == "disabled"  # set by conftest
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("needs its own Ray cluster (one is already initialised in this process)")
    port = _free_port()
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield ray, port
    ray.shutdown()


def test_nlhf_metrics_reach_prometheus_export(tmp_path: Path, ray_with_metrics_port) -> None:
    ray, port = ray_with_metrics_port

    # The driver process logs three iterations...
    with RunLogger(str(tmp_path / "drv"), "export-driver", tensorboard=False) as log:
        for k in (1, 2, 3):
            log.log(
                k,
                {
                    "charts/win_prob": 0.5 + 0.01 * k,
                    "charts/queries": 64.0 * k,  # running totals since the driver started
                    "judge/requests": 2.0 * k,
                    "sync/seconds": 0.5 * k,
                    "perf/tokens_per_s_current": 480.0,
                    "perf/tokens_per_s_extrapolated": 470.0,
                    "time/rollout": 3.0,
                    "losses/half_step": 0.25,
                },
            )

    # ...and so does an actor (metrics from worker processes are exported too).
    @ray.remote(num_cpus=0)
    class Logger:
        def run(self, out: str) -> None:
            with RunLogger(out, "export-actor", tensorboard=False) as log:
                log.log(7, {"charts/win_prob": 0.75})

    actor = Logger.remote()
    ray.get(actor.run.remote(str(tmp_path / "actor")))

    names = prometheus_names()
    wanted = [
        "ray_nlhf_win_prob",
        "ray_nlhf_iteration",
        names["nlhf_preference_queries_total"][0],
        names["nlhf_judge_requests_total"][0],
        "ray_nlhf_tokens_per_second",
        "ray_nlhf_loss",
        "ray_nlhf_phase_seconds_count",
    ]
    deadline = time.monotonic() + 45
    samples: dict[str, list] = {}
    while time.monotonic() < deadline:
        samples = _scrape(port)
        if all(n in samples for n in wanted) and _value(samples, "ray_nlhf_win_prob", run="export-actor"):
            break
        time.sleep(1)
    missing = [n for n in wanted if n not in samples]
    assert not missing, f"not exported within 45 s: {missing}"
    ray.kill(actor)

    drv = {"run": "export-driver"}
    assert _value(samples, "ray_nlhf_win_prob", **drv) == pytest.approx(0.53)
    assert _value(samples, "ray_nlhf_iteration", **drv) == 3
    assert _value(samples, "ray_nlhf_preference_queries_total", **drv) == pytest.approx(192)
    assert _value(samples, "ray_nlhf_judge_requests_total", **drv) == pytest.approx(6)
    assert _value(samples, "ray_nlhf_weight_sync_seconds", **drv) == pytest.approx(0.5)  # last iteration's
    assert _value(samples, "ray_nlhf_tokens_per_second", pool="current", **drv) == pytest.approx(480)
    assert _value(samples, "ray_nlhf_tokens_per_second", pool="extrapolated", **drv) == pytest.approx(470)
    assert _value(samples, "ray_nlhf_loss", step="half", **drv) == pytest.approx(0.25)
    assert _value(samples, "ray_nlhf_phase_seconds_count", phase="rollout", **drv) == 3
    assert _value(samples, "ray_nlhf_phase_last_seconds", phase="rollout", **drv) == pytest.approx(3.0)
    assert _value(samples, "ray_nlhf_win_prob", run="export-actor") == pytest.approx(0.75)
    # Ray's own labels ride along (useful to filter one cluster/session in Grafana).
    labels = samples["ray_nlhf_win_prob"][0].labels
    assert {"SessionName", "NodeAddress"} <= set(labels)

"""Ray Jobs: `nlhf train` submitted to a running cluster uses that cluster.

Starts a head on 127.0.0.1 with free ports (`ray start --head --block` in its own process
group, so that stopping it stops only this cluster, never other Ray processes on the machine),
submits configs/game-cpu.yaml through JobSubmissionClient with the repository as working_dir,
waits for SUCCEEDED, checks outputs and logs, and reads the node's Prometheus metrics export
for the nlhf metrics while the job runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    gcs, dash, client, metrics, agent_grpc, agent_http, min_w = _free_ports(7)
    tmp = tmp_path_factory.mktemp("rayhead")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
           "--num-cpus=2", f"--temp-dir={tmp}", "--include-dashboard=true",
           '--system-config={"metrics_report_interval_ms": 2000}']
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", timeout=120)
        yield {"dashboard": f"http://127.0.0.1:{dash}", "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        # Stop exactly this cluster: its process group (the Ray processes are children of `ray start --block`).
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_submit_game_job(ray_head: dict[str, str], tmp_path: Path, cache_dir: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "run"
    client = JobSubmissionClient(ray_head["dashboard"])
    entry = (f"nlhf train --config configs/game-cpu.yaml output_dir={out} cache_dir={cache_dir} "
             "iterations=8 win_rate_every=4")
    job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(REPO)})

    seen: dict[str, float] = {}
    deadline = time.time() + 600
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job)
        try:  # the node's Prometheus export, while the job's driver reports its metrics
            text = urllib.request.urlopen(ray_head["metrics"], timeout=5).read().decode()
            for m in re.finditer(r"^(ray_nlhf_[a-z_]+)(\{[^}]*\})?\s+([-0-9.eE+naif]+)$", text, re.M):
                seen[m.group(1)] = float(m.group(3))
        except Exception:  # noqa: BLE001 - export not ready yet
            pass
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert "connected to" in logs  # the driver joined the job's cluster instead of starting one
    assert "started a local cluster" not in logs

    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 8 and "game" in summary
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8

    # metrics in the Ray dashboard's Prometheus export, with sensible values
    assert seen, "no nlhf metrics found in the node's Prometheus export"
    assert seen.get("ray_nlhf_iteration", 0) >= 1
    assert seen.get("ray_nlhf_preference_queries_total", 0) > 0
    win = [v for k, v in seen.items() if k.startswith("ray_nlhf_win_prob")]
    assert win and all(0.0 <= v <= 1.0 for v in win)

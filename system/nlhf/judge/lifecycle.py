"""Whose judge app is whose on a shared cluster.

Serve applications outlive the driver that deployed them. Each run names its judge app
``<run_name>-<run_id>-judge`` (``run_id``: 12 hex digits, kept across resumes) and holds a
*lease*: a named zero-CPU actor ``nlhf-run-<run_id>`` in namespace ``nlhf-runs`` that is owned
by the driver, so Ray removes it when the driver exits or is killed. A run deletes only its own
app when it ends; at start-up it also deletes judge apps whose lease is gone (their driver was
killed), never an app whose run is alive, whatever its run_name.
"""

from __future__ import annotations

import re
from typing import Any

import ray

RUN_NAMESPACE = "nlhf-runs"
_APP = re.compile(r".+-(?P<run_id>[0-9a-f]{12})-judge")


def judge_app_name(run_name: str, run_id: str) -> str:
    """The Serve application name of a run's judge."""
    return f"{run_name}-{run_id}-judge"


@ray.remote(num_cpus=0)
class RunLease:
    """Exists exactly as long as the driver of run ``run_id`` (non-detached, owned by it)."""

    def alive(self) -> bool:
        return True


def take_lease(run_id: str) -> Any:
    """Create this driver's lease actor for ``run_id`` (keep the handle for the life of the run).

    Raises:
        RuntimeError: a live driver already holds the lease of ``run_id``.
    """
    name = f"nlhf-run-{run_id}"
    try:
        ray.get_actor(name, namespace=RUN_NAMESPACE)
    except ValueError:
        lease = RunLease.options(name=name, namespace=RUN_NAMESPACE).remote()
        ray.get(lease.alive.remote(), timeout=60)
        return lease
    raise RuntimeError(f"run {run_id} is already running on this cluster (lease {name} held)")


def reap_orphaned_judges(own_run_id: str) -> list[str]:
    """Delete judge apps of runs whose driver is gone (no lease); returns the names deleted.
    Apps of live runs, this run's own, and apps not named like nlhf judges are left alone."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # noqa: BLE001 - Serve not running on this cluster: nothing to reap
        return []
    deleted = []
    for name in list(apps):
        m = _APP.fullmatch(name)
        if m is None or m["run_id"] == own_run_id:
            continue
        try:
            ray.get_actor(f"nlhf-run-{m['run_id']}", namespace=RUN_NAMESPACE)
        except ValueError:
            serve.delete(name)
            deleted.append(name)
    return deleted

"""Ctrl-C / SIGTERM reach the driver while it waits on a long Ray call (a learner step can take a
minute on CPU): the wait raises nlhf's Interrupted within about a second, not after the call
returns, and not as a SystemError from inside Ray's wait."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from nlhf import interrupts

pytestmark = pytest.mark.ray


@pytest.fixture
def sigint_handler():
    interrupts.reset()
    previous = signal.signal(signal.SIGINT, interrupts.handler)
    yield
    signal.signal(signal.SIGINT, previous)
    interrupts.reset()


def _slow_ref(ray_cluster, seconds: float):
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    def slow() -> int:
        time.sleep(seconds)
        return 7

    return slow.remote()


def _sigint_in(seconds: float, times: int = 1) -> None:
    def send() -> None:
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    threading.Timer(seconds, send).start()


def test_learner_group_wait_is_interrupted_within_a_second(ray_cluster, sigint_handler):
    from nlhf.learner.group import LearnerGroup

    ref = _slow_ref(ray_cluster, 30)
    time.sleep(1.0)  # the task is running
    _sigint_in(0.5, times=2)  # a second Ctrl-C while stopping is ignored
    t0 = time.monotonic()
    with pytest.raises(interrupts.Interrupted, match="SIGINT"):
        LearnerGroup._wait([ref])
    assert time.monotonic() - t0 < 3.0
    time.sleep(0.5)  # the second SIGINT lands here while stopping: recorded once, nothing raised
    ray_cluster.cancel(ref, force=True)


def test_get_returns_results_and_times_out(ray_cluster, sigint_handler):
    import ray

    assert interrupts.get(_slow_ref(ray_cluster, 0.1)) == 7
    assert interrupts.get([_slow_ref(ray_cluster, 0.1), _slow_ref(ray_cluster, 0.2)], timeout=30) == [7, 7]
    slow = _slow_ref(ray_cluster, 30)
    with pytest.raises(ray.exceptions.GetTimeoutError):
        interrupts.get(slow, timeout=1.0)
    ray.cancel(slow, force=True)


def test_a_signal_outside_ray_raises_at_once(sigint_handler):
    _sigint_in(0.2)
    with pytest.raises(interrupts.Interrupted):
        time.sleep(5)


def test_a_shielded_block_finishes_before_the_stop(ray_cluster, sigint_handler):
    """A signal during a checkpoint write must not cut it short (CI: the write's temporary folder
    was removed while a learner still wrote into it, and the run died of FileNotFoundError):
    inside ``shielded()`` Ray waits and plain code run to the end; Interrupted comes on exit."""
    finished = []
    _sigint_in(0.2)
    t0 = time.monotonic()
    with pytest.raises(interrupts.Interrupted):
        with interrupts.shielded():
            assert interrupts.get(_slow_ref(ray_cluster, 1.5)) == 7  # not interrupted at ~0.2 s
            time.sleep(0.3)
            finished.append(time.monotonic() - t0)
    assert finished and finished[0] >= 1.5

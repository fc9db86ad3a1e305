"""Ctrl-C / SIGTERM for the driver, and Ray waits that let them through.

Measured with ray 2.60 on this machine: a Python signal handler does not run while the driver
blocks in ``ray.get`` / ``ray.wait`` without a timeout (a SIGINT during a 60 s learner step is
handled after the step), and an exception raised by the handler inside Ray's wait surfaces as
``SystemError: ... returned a result with an exception set`` instead of the exception. So:

- :func:`handler` records the signal; it raises :class:`Interrupted` itself only outside a Ray
  wait, and ignores a second signal while the run is stopping;
- :func:`wait` / :func:`get` wait in short slices (``SLICE_S``) and raise :class:`Interrupted`
  from Python between slices, so a run stops within about a second of the signal;
- :func:`shielded` defers the stop to the end of a block that must not be cut short (a
  checkpoint write: cutting it removed the temporary folder while a learner was still writing
  into it, and the run died with ``FileNotFoundError`` instead of stopping cleanly).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any, Sequence

SLICE_S = 0.5
"""Longest stretch the driver spends inside one Ray wait call, in seconds."""

_requested: str | None = None
_in_ray_wait = 0
_shield = 0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the driver; ``args[0]`` is the signal's name."""


def handler(signum: int, frame: object) -> None:
    """Signal handler for SIGINT/SIGTERM (install with ``signal.signal``): see module docstring."""
    global _requested
    if _requested is not None:
        return  # already stopping: a second Ctrl-C must not break the clean shutdown
    _requested = signal.Signals(signum).name
    if _in_ray_wait == 0 and _shield == 0:
        raise Interrupted(_requested)


def reset() -> None:
    """Forget a recorded signal (a new run in the same process)."""
    global _requested
    _requested = None


def check() -> None:
    """Raise :class:`Interrupted` if a signal was recorded (not inside :func:`shielded`)."""
    if _requested is not None and _shield == 0:
        raise Interrupted(_requested)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A block that a SIGINT/SIGTERM does not cut short: the signal is recorded, the block runs
    to its end, and :class:`Interrupted` is raised when the outermost shielded block exits.

    Raises:
        Interrupted: on exit, when a signal arrived before or during the block.
    """
    global _shield
    _shield += 1
    try:
        yield
    finally:
        _shield -= 1
    check()


def wait(refs: Sequence[Any], *, num_returns: int | None = None, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[Any], list[Any]]:
    """``ray.wait(refs, num_returns, timeout)`` in slices of at most ``SLICE_S`` seconds.

    Returns:
        (ready, not_ready) as ``ray.wait``: ``num_returns`` (default all) ready refs, or fewer when
        ``timeout`` (seconds; None = no limit) passed.

    Raises:
        Interrupted: a SIGINT/SIGTERM arrived while waiting.
    """
    import ray

    global _in_ray_wait
    pending = list(refs)
    need = len(pending) if num_returns is None else num_returns
    ready: list[Any] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(ready) < need and pending:
        check()
        left = SLICE_S if deadline is None else min(SLICE_S, deadline - time.monotonic())
        if left <= 0:
            break
        _in_ray_wait += 1
        try:
            done, pending = ray.wait(pending, num_returns=min(need - len(ready), len(pending)), timeout=left,
                                     fetch_local=fetch_local)
        finally:
            _in_ray_wait -= 1
        ready.extend(done)
    check()
    return ready, pending


def get(refs: Any, *, timeout: float | None = None) -> Any:
    """``ray.get(refs, timeout=timeout)`` (one ref or a list) that a signal interrupts within ~``SLICE_S``.

    Raises:
        Interrupted: a SIGINT/SIGTERM arrived while waiting.
        ray.exceptions.GetTimeoutError: not all ready within ``timeout`` seconds.
        whatever the task raised (as ``ray.get``).
    """
    import ray

    many = isinstance(refs, (list, tuple))
    ready, pending = wait(list(refs) if many else [refs], timeout=timeout)
    if pending:
        raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(ready) + len(pending)} results not ready "
                                             f"after {timeout} s")
    return ray.get(refs)

"""Training progress for people watching a terminal or reading Ray job logs.

``Progress`` shows iteration i/N, the current phase, the ETA and the latest win probability.
On a terminal it is a rich live bar; anywhere else (``ray job logs``, a file, CI) it prints
exactly one plain line per iteration::

    iteration 3/10 | phase sync | win_prob 0.530 | kl_ref 0.0123 | 4.1s/it | eta 28s
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Literal, Mapping

Mode = Literal["auto", "rich", "plain"]


def format_duration(seconds: float | None) -> str:
    """``83.2`` -> ``"1m23s"``, ``3725`` -> ``"1h02m"``, ``None`` -> ``"?"``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Iteration progress: a rich live bar on a TTY, one plain log line per iteration otherwise.

    Args:
        total_iterations: N in "iteration i/N".
        mode: ``"rich"``, ``"plain"``, or ``"auto"`` (rich when ``stream`` is a TTY).
        stream: where to write (default ``sys.stderr``, which Ray job logs capture).

    ``update(iteration, metrics)`` takes the number of the iteration just finished counting
    from 1 (pass ``k + 1`` from a 0-based loop). The ETA is the mean wall time between
    updates times the iterations left (start-up time is not counted, and a resumed run whose
    first update is 51/100 gets a sensible ETA too). ``note(text)`` prints any other log line.
    Usable with ``with`` or without (the first call starts it; call :meth:`close` at the end).

    Usage::

        with Progress(cfg.iterations) as progress:
            for k in range(cfg.iterations):
                progress.phase("rollout"); ...
                progress.phase("judge"); ...
                progress.update(k + 1, metrics)
    """

    def __init__(self, total_iterations: int, *, mode: Mode = "auto", stream: IO[str] | None = None) -> None:
        if mode not in ("auto", "rich", "plain"):
            raise ValueError(f"mode must be 'auto', 'rich' or 'plain', got {mode!r}")
        self.total = int(total_iterations)
        self.stream = stream if stream is not None else sys.stderr
        self.mode: Literal["rich", "plain"] = (
            ("rich" if _is_tty(self.stream) else "plain") if mode == "auto" else mode
        )
        self.current_phase = "starting"
        self.iteration = 0
        self.metrics: dict[str, Any] = {}
        self._t0: float | None = None
        self._first_iteration: int | None = None
        self._t_first: float | None = None
        self._rich: Any = None
        self._task: Any = None

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        self.start()
        return self

    def start(self) -> None:
        """Start the clock (and the live display in rich mode). Called by ``with`` and, if
        the object is used without ``with``, by the first :meth:`phase`/:meth:`update`/:meth:`note`."""
        if self._t0 is not None:
            return
        self._t0 = time.monotonic()
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream, force_terminal=True)
            self._rich = RichProgress(
                TextColumn("[bold]iteration {task.completed:.0f}/{task.total:.0f}"),
                BarColumn(),
                TextColumn("phase [cyan]{task.fields[phase]}"),
                TextColumn("win_prob [green]{task.fields[win_prob]}"),
                TextColumn("eta {task.fields[eta]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(
                "nlhf", total=self.total, phase=self.current_phase, win_prob="-", eta="?"
            )

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display (idempotent)."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # -- updates -------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Mark the start of phase ``name`` (``rollout``, ``judge``, ``half_step``, ``sync``, ...)."""
        self.start()
        self.current_phase = str(name)
        if self._rich is not None:
            self._rich.update(self._task, phase=self.current_phase)

    def note(self, text: str) -> None:
        """Print a free-form log line (above the live bar in rich mode, never through it)."""
        self.start()
        if self._rich is not None:
            self._rich.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def eta_seconds(self) -> float | None:
        """Seconds left at the pace measured so far (None before the first update).

        The pace is the wall time between updates (so start-up time does not count); at the
        first update it is ``time/iteration`` when logged, else the time since start.
        """
        if self._t0 is None or self._first_iteration is None or self._t_first is None:
            return None
        now = time.monotonic()
        done_since_first = self.iteration - self._first_iteration
        if done_since_first > 0:
            per_it = (now - self._t_first) / done_since_first
        else:
            logged = self.metrics.get("time/iteration")
            per_it = float(logged) if isinstance(logged, (int, float)) and logged >= 0 else now - self._t0
        return per_it * max(self.total - self.iteration, 0)

    def line(self) -> str:
        """The plain one-line summary of the latest update."""
        parts = [f"iteration {self.iteration}/{self.total}", f"phase {self.current_phase}"]
        for key, label, fmt in (
            ("charts/win_prob", "win_prob", "{:.3f}"),
            ("charts/kl_ref", "kl_ref", "{:.4g}"),
            ("time/iteration", None, "{:.1f}s/it"),
        ):
            value = self.metrics.get(key)
            if isinstance(value, (int, float)):
                text = fmt.format(value)
                parts.append(f"{label} {text}" if label else text)
        parts.append(f"eta {format_duration(self.eta_seconds())}")
        return " | ".join(parts)

    def update(self, iteration: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record that ``iteration`` (1-based) finished with ``metrics``; print/redraw."""
        self.start()
        self.iteration = int(iteration)
        if self._first_iteration is None:
            self._first_iteration = self.iteration
            self._t_first = time.monotonic()
        self.metrics = dict(metrics or {})
        line = self.line()
        if self._rich is not None:
            win = self.metrics.get("charts/win_prob")
            self._rich.update(
                self._task,
                completed=self.iteration,
                phase=self.current_phase,
                win_prob=f"{win:.3f}" if isinstance(win, (int, float)) else "-",
                eta=format_duration(self.eta_seconds()),
            )
            self._rich.console.print(line, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

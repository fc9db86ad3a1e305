"""Figure for ``nlhf game plot``: KL(pi* || pi_k) against preference queries."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nlhf.algorithms.exact import GameTrace

KL_FLOOR = 1e-30
"""KL values below this (floating-point noise) are drawn at the floor."""


def run_label(t: GameTrace) -> str:
    """Legend label ``algorithm, β=…, η=…`` (Nash-MD: ``lr`` schedule or constant)."""
    if t.algorithm == "nash-md":
        step = "lr=2/(β(t+2))" if t.eta is None else f"lr={t.eta:g}"
    elif t.algorithm == "egpo" and t.eta is not None and t.eta * t.beta < 1:
        # EGPO's own step; the same map as Nash-MP with eta_MP = eta beta / (1 - eta beta).
        step = f"η_EGPO={t.eta:.3g} (≡ Nash-MP η={t.eta * t.beta / (1 - t.eta * t.beta):.3g})"
    else:
        step = f"η={t.eta:.3g}"
    extra = " optimistic" if t.extra.get("optimistic") else ""
    return f"{t.algorithm}{extra}, β={t.beta:g}, {step}"


def nash_mp_bound(t: GameTrace) -> np.ndarray | None:
    """``KL_0 (1 + eta)^(-N/2)`` for a Nash-MP trace with ``eta <= 2 beta`` (equals the paper's
    ``KL_0 (1 + 2 beta)^(-N/2)`` at ``eta = 2 beta``); ``None`` otherwise (no guarantee)."""
    if t.algorithm != "nash-mp" or t.eta is None or t.eta > 2 * t.beta * (1 + 1e-12):
        return None
    N = np.asarray(t.queries, dtype=float)
    return t.kl_to_nash[0] * (1.0 + t.eta) ** (-N / 2.0)


def plot_convergence(traces: Sequence[GameTrace], out: Path, title: str | None = None) -> None:
    """Draw one line per trace (log y), dashed Nash-MP bounds, and save to ``out``.

    Args:
        traces: runs to draw (at least one).
        out: image path; its suffix picks the format.
        title: optional figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not traces:
        raise ValueError("nothing to plot: give at least one run file")
    fig, ax = plt.subplots(figsize=(10.5, 4.8), dpi=130)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lowest = 1.0
    for i, t in enumerate(traces):
        c = colors[i % len(colors)]
        kl = np.maximum(np.asarray(t.kl_to_nash, dtype=float), KL_FLOOR)
        lowest = min(lowest, float(kl.min()))
        ax.plot(t.queries, kl, color=c, lw=1.8, label=run_label(t))
        bound = nash_mp_bound(t)
        if bound is not None:
            ax.plot(
                t.queries, np.maximum(bound, KL_FLOOR), color=c, lw=1.2, ls="--",
                label=f"bound KL₀(1+η)^(-N/2), η={t.eta:.3g}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("preference queries N")
    ax.set_ylabel("KL(π* ‖ π_k)")
    ax.set_ylim(bottom=lowest / 10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)

"""One-figure summary of a run from its ``metrics.jsonl`` (``nlhf plot``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from nlhf.telemetry.metrics import METRICS_FILE, read_metrics

PHASES = ("rollout", "judge", "learn", "sync")
POOLS = ("current", "extrapolated")


def _series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) for the records that have a finite number under ``key``."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_run(run_dir: str, out: str) -> None:
    """Save a 2x2 figure of ``run_dir/metrics.jsonl`` against iteration to ``out`` (PNG, PDF, SVG...).

    Panels: win probability P(pi_{k+1} > pi_k) with the 0.5 tie line; KL to the reference
    (and to the anchor, dashed); seconds per phase (stacked: rollout, judge, learn, sync);
    rollout tokens/s per vLLM pool. Raises ``ValueError`` naming the file when there are no
    metrics to plot.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(run_dir) / METRICS_FILE
    records = [r for r in read_metrics(run_dir) if isinstance(r.get("iteration"), (int, float))]
    if not records:
        raise ValueError(f"no metrics to plot: {path} is missing or has no records")
    records.sort(key=lambda r: r["iteration"])

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, constrained_layout=True)
    ax_win, ax_kl, ax_time, ax_tok = axes.ravel()

    xs, ys = _series(records, "charts/win_prob")
    if xs:
        ax_win.plot(xs, ys, marker="o", ms=3, color="tab:green", label=r"$P(\pi_{k+1} \succ \pi_k)$")
        ax_win.axhline(0.5, color="grey", lw=0.8, ls=":", label="tie")
        ax_win.legend(loc="best", fontsize=8)
    else:
        _no_data(ax_win, "charts/win_prob")
    ax_win.set_title("Win probability vs previous iterate")
    ax_win.set_ylabel("probability")

    any_kl = False
    for key, label, style in (("charts/kl_ref", r"KL($\pi$ ‖ $\pi_{ref}$)", "-"), ("charts/kl_anchor", "KL to anchor", "--")):
        xs, ys = _series(records, key)
        if xs:
            ax_kl.plot(xs, ys, ls=style, marker="o", ms=3, label=label)
            any_kl = True
    if any_kl:
        ax_kl.legend(loc="best", fontsize=8)
    else:
        _no_data(ax_kl, "charts/kl_ref")
    ax_kl.set_title("KL divergence")
    ax_kl.set_ylabel("nats")

    # Stacked phase times: align on the iterations that logged any phase; missing = 0.
    phase_rows = [r for r in records if any(f"time/{p}" in r for p in PHASES)]
    if phase_rows:
        its = [float(r["iteration"]) for r in phase_rows]
        stacks = [[_finite_or_zero(r.get(f"time/{p}")) for r in phase_rows] for p in PHASES]
        ax_time.stackplot(its, stacks, labels=PHASES, alpha=0.85)
        xs, ys = _series(records, "time/iteration")
        if xs:
            ax_time.plot(xs, ys, color="black", lw=1, ls="--", label="iteration")
        top = max(sum(col) for col in zip(*stacks))
        top = max([top, *ys]) if xs else top
        ax_time.set_ylim(0, top * 1.3 if top > 0 else 1)  # headroom for the legend
        ax_time.legend(loc="upper left", fontsize=8, ncol=5)
    else:
        _no_data(ax_time, "time/*")
    ax_time.set_title("Seconds per phase")
    ax_time.set_ylabel("seconds")
    ax_time.set_xlabel("iteration")

    any_tok = False
    for pool in POOLS:
        xs, ys = _series(records, f"perf/tokens_per_s_{pool}")
        if xs:
            ax_tok.plot(xs, ys, marker="o", ms=3, label=f"{pool} pool")
            any_tok = True
    if any_tok:
        ax_tok.legend(loc="best", fontsize=8)
    else:
        _no_data(ax_tok, "perf/tokens_per_s_*")
    ax_tok.set_title("Rollout throughput")
    ax_tok.set_ylabel("tokens / s")
    ax_tok.set_xlabel("iteration")

    from matplotlib.ticker import MaxNLocator

    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"nlhf run: {Path(run_dir).resolve().name}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _finite_or_zero(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0

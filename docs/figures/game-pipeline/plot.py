"""Helpers of make.sh: extract a pipeline run's KL curve, write its initial policy as a reference
for the exact solver, and draw docs/figures/game-pipeline.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ALGORITHMS = ("nash-mp", "online-ipo", "egpo", "nash-md-pg")


def extract(run_dir: Path, out: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    game = summary["game"]
    data = {
        "algorithm": summary["algorithm"],
        "iteration": [0] + [m["iteration"] for m in rows],
        "queries": [0] + [m["charts/queries"] for m in rows],
        "kl_to_nash": [game["kl_to_nash_initial"]] + [m["game/kl_to_nash"] for m in rows],
        "initial_distribution": game["initial_distribution"],
        "final_kl_to_nash": game["kl_to_nash"],
        "hardware": summary.get("hardware"),
    }
    out.write_text(json.dumps(data, indent=1))


def ref(run_json: Path, out: Path) -> None:
    np.save(out, np.asarray(json.loads(run_json.read_text())["initial_distribution"], dtype=np.float64))


def plot(folder: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=130)
    for name in ALGORITHMS:
        d = json.loads((folder / f"{name}.json").read_text())
        left.plot(d["queries"], d["kl_to_nash"], marker="o", ms=3, label=name)
        right.plot(d["iteration"], d["kl_to_nash"], marker="o", ms=3, label=f"{name} (pipeline)")
    exact = json.loads((folder / "exact-nash-mp.json").read_text())
    right.plot(np.arange(len(exact["kl_to_nash"])), exact["kl_to_nash"], "k--", lw=1.5,
               label="exact tabular Nash-MP")
    left.set_xlabel("training preference queries (judged pairs)")
    right.set_xlabel("iteration")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_ylabel("KL(π* ‖ π)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("through the pipeline (configs/game-cpu.yaml)", fontsize=10)
    right.set_title("per iteration, beside exact Nash-MP (β=0.2, η=0.4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"extract": extract, "ref": ref, "plot": plot}[cmd](*map(Path, args))

"""``nlhf train | plot``: the main job and a look at a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from nlhf.cli.common import one_line_errors
from nlhf.config import load_train_config

DEFAULT_CONFIG = "configs/smollm2-cpu.yaml"


@one_line_errors
def train(
    config: Path = typer.Option(Path(DEFAULT_CONFIG), "--config", help="Training config (YAML)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. iterations=3"),
    check: bool = typer.Option(False, "--check", help="Validate the config (paths, resources) and exit."),
) -> None:
    """Run Nash Mirror Prox on a Ray cluster (joins RAY_ADDRESS / the job's cluster, else starts one on 127.0.0.1)."""
    cfg = load_train_config(config, overrides or [])
    if check:
        print(f"config ok: {config}")
        return
    from nlhf.driver import train as run_training

    summary = run_training(cfg)
    keep = {k: v for k, v in summary.items() if k not in ("final_metrics", "algorithm")}
    print(json.dumps(keep, indent=2))
    print(f"run written to {cfg.output_dir} (metrics.jsonl, summary.json, checkpoints/final)")


@one_line_errors
def plot(
    run_dir: Path = typer.Argument(..., help="A run's output_dir (holds metrics.jsonl)."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
) -> None:
    """Win probability, KL to reference, seconds per phase and tokens/s against iteration."""
    from nlhf.telemetry.plots import plot_run

    plot_run(str(run_dir), str(out))
    print(f"wrote {out}")


def register_run_commands(app: typer.Typer) -> None:
    """Attach the top-level run commands to ``app``."""
    app.command("train")(train)
    app.command("plot")(plot)

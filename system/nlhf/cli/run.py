"""``nlhf train | eval | plot | bench``: the main job, its evaluation, a look at a run, benchmarks."""

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
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its newest complete checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a previous run in output_dir and start afresh."),
) -> None:
    """Run Nash Mirror Prox on a Ray cluster (joins RAY_ADDRESS / the job's cluster, else starts one on 127.0.0.1)."""
    import shlex
    import sys

    overrides = list(overrides or [])
    if resume:
        overrides.append("resume=true")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: choose one")
    cfg = load_train_config(config, overrides)
    if check:
        print(f"config ok: {config}")
        return
    from nlhf.driver import Interrupted
    from nlhf.driver import train as run_training
    from nlhf.reporting import LearnerDied

    again = [a for a in overrides if a != "resume=true"]
    resume_command = shlex.join(["nlhf", "train", "--config", str(config), *again, "--resume"])
    try:
        summary = run_training(cfg, overwrite=overwrite, resume_command=resume_command)
    except Interrupted:
        raise typer.Exit(code=130) from None
    except LearnerDied as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(code=3) from None
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


@one_line_errors
def bench(
    what: str = typer.Argument(..., help="train | rollout | sync | judge"),
    config: Path = typer.Option(Path(DEFAULT_CONFIG), "--config", help="Training config (YAML)."),
    out: Path = typer.Option(..., "--out", help="JSON file to write the results to."),
    iterations: int = typer.Option(4, "--iterations", min=2, help="bench train: iterations to run (the first is warm-up)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Benchmark the training loop (`train`: a real run on Ray) or one part (one process, no Ray);
    write the numbers to --out."""
    from nlhf import bench as benches
    from nlhf.checks import check_bench_inputs

    runners = {"rollout": benches.bench_rollout, "sync": benches.bench_sync, "judge": benches.bench_judge}
    if what not in (*runners, "train"):
        raise ValueError(f"bench: unknown benchmark {what!r}; choose one of {sorted([*runners, 'train'])}")
    cfg = load_train_config(config, overrides or [], check=what == "train")
    check_bench_inputs(cfg, str(out))
    if what == "train":
        from nlhf.bench_train import bench_train

        result = bench_train(cfg, iterations=iterations)
    else:
        result = runners[what](cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


@one_line_errors
def evaluate(
    policy: Path = typer.Option(..., "--policy", help="HF folder of the policy to evaluate (e.g. a run's checkpoints/final)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="HF folder to compare against (default: the config's initial policy)."),
    config: Path = typer.Option(Path(DEFAULT_CONFIG), "--config", help="Config naming the judge and the held-out prompts."),
    num_prompts: int = typer.Option(80, "--num-prompts", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Win rate of a policy against a baseline on held-out prompts under the judge, with a 95% CI."""
    from nlhf.bench import evaluate_win_rate
    from nlhf.models import resolve_model

    from nlhf.checks import check_eval_inputs

    cfg = load_train_config(config, overrides or [], check=False)
    for name, p in (("--policy", policy), ("--baseline", baseline)):
        if p is not None and not (p / "config.json").is_file():
            raise FileNotFoundError(f"{name}: {p} is not an HF model folder (no config.json)")
    check_eval_inputs(cfg, None if out is None else str(out))
    base = str(baseline) if baseline is not None else resolve_model(cfg.policy, cfg.cache_dir)
    report = evaluate_win_rate(cfg, str(policy), base, num_prompts)
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)


def register_run_commands(app: typer.Typer) -> None:
    """Attach the top-level run commands to ``app``."""
    app.command("train")(train)
    app.command("eval")(evaluate)
    app.command("plot")(plot)
    app.command("bench")(bench)

"""``nlhf judge train | eval | serve``: thin wrappers over :mod:`nlhf.judge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from nlhf.cli.common import one_line_errors
from nlhf.config import JudgeConfig, load_model

judge_app = typer.Typer(no_args_is_help=True)


@judge_app.command("train")
@one_line_errors
def train(
    config: Path = typer.Option(..., "--config", help="YAML file holding a judge section (see configs/judge-minilm.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Train the pairwise preference model on human labels; writes the folder at judge.path."""
    from nlhf.checks import check_judge_training, check_output_dir
    from nlhf.judge.train import train_judge

    cfg: JudgeConfig = load_model(JudgeConfig, config, overrides)
    if cfg.path is None:
        raise ValueError("judge.path: required (the folder the trained judge is written to)")
    check_output_dir(cfg.path, "judge.path")
    check_judge_training(cfg)
    report = train_judge(cfg)
    print(json.dumps(report, indent=2))


@judge_app.command("eval")
@one_line_errors
def evaluate(
    judge: Path = typer.Option(..., "--judge", help="Folder written by `nlhf judge train`."),
    data: list[Path] = typer.Option(..., "--data", help="Labelled pairs (LLMBar format); repeat for several."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
    baselines: bool = typer.Option(True, help="Also report the 'longer wins' and random baselines."),
) -> None:
    """Agreement with human labels (accuracy on pairs, both orders, ties excluded) as JSON."""
    from nlhf.judge.evaluate import evaluate_judge

    report = evaluate_judge(judge, [str(d) for d in data], baselines=baselines)
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


@judge_app.command("serve")
@one_line_errors
def serve(
    config: Path = typer.Option(..., "--config", help="YAML file holding a judge section."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Start the judge as a Ray Serve deployment (and HTTP `POST /prefer` if enabled); blocks."""
    from nlhf.judge.serve import serve_judge

    cfg: JudgeConfig = load_model(JudgeConfig, config, overrides)
    serve_judge(cfg, block=True)

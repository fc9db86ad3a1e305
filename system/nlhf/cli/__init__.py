"""The ``nlhf`` command: ``train | game | judge | eval | plot | bench``.

Heavy libraries (transformers, vLLM, Ray, DeepSpeed) are imported inside the commands, so
``nlhf game`` and ``nlhf --help`` start fast.
"""

from __future__ import annotations

import typer

from nlhf.cli.game import game_app
from nlhf.cli.judge import judge_app
from nlhf.cli.run import register_run_commands

app = typer.Typer(
    name="nlhf",
    help="Nash learning from human feedback with Nash Mirror Prox, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(game_app, name="game", help="Exact matrix games: make, run, plot.")
app.add_typer(judge_app, name="judge", help="The preference model: train, eval, serve.")
register_run_commands(app)

__all__ = ["app"]

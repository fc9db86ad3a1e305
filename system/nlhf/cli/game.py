"""``nlhf game``: exact matrix games (filled in by the game issue)."""

import typer

game_app = typer.Typer(no_args_is_help=True)

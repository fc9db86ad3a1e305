"""``nlhf train | eval | plot | bench`` (filled in by the main-job issues)."""

import typer


def register_run_commands(app: typer.Typer) -> None:
    """Attach the top-level run commands to ``app``."""

"""``python -m nlhf.cli`` == ``nlhf``."""

from nlhf.cli import app

app()

"""nlhf.data: prompt sets and human preference pairs, read with HF ``datasets``."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_json_rows(path: str | Path) -> Any:
    """Load one JSON / JSON-lines file as a ``datasets.Dataset`` (split ``train``), quietly.

    ``datasets`` draws a progress bar the first time it builds a file's cache; that output
    would land on stderr in front of a one-line config error, so bars are off while loading.
    """
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    finally:
        if was_enabled:
            datasets.enable_progress_bars()

"""Shared CLI plumbing: bad input exits non-zero with one line naming the problem."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer

from nlhf.config import ConfigError


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ConfigError / ValueError / FileNotFoundError into ``error: ...`` on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            msg = " ".join(str(e).split())
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper

"""``nlhf game``: exact matrix games. ``make`` a preference matrix (and ``ref`` a reference
policy), ``run`` an exact algorithm to a JSON trace, ``plot`` traces (KL to pi* vs queries).

Bad input exits with status 2 and one line ``error: ...`` (``one_line_errors``).
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path

import numpy as np
import typer

from nlhf.cli.common import one_line_errors

game_app = typer.Typer(no_args_is_help=True)


class GameKind(str, Enum):
    random = "random"
    cyclic = "cyclic"
    bradley_terry = "bradley-terry"


class RefKind(str, Enum):
    uniform = "uniform"
    softmax = "softmax"


class Algorithm(str, Enum):
    nash_mp = "nash-mp"
    nash_md = "nash-md"
    omd = "omd"
    egpo = "egpo"


def _load_array(path: Path, what: str) -> np.ndarray:
    """Load a ``.npy`` array; missing or unreadable files raise one-line errors."""
    from nlhf.algorithms.games import GameError

    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # np.load raises several types on garbage
        raise GameError(f"cannot read {what} file {path} as .npy: {type(e).__name__}") from None


def _save_npy(arr: np.ndarray, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # exact path (np.save would append .npy to other suffixes)
        np.save(f, arr)


def _finite_positive(value: float, name: str) -> float:
    from nlhf.algorithms.games import GameError

    if not math.isfinite(value) or value <= 0:
        raise GameError(f"{name} must be a finite number > 0, got {value}")
    return value


@game_app.command("make")
@one_line_errors
def make(
    kind: GameKind = typer.Option(GameKind.random, "--kind", help="random | cyclic | bradley-terry"),
    n: int = typer.Option(..., "--n", help="Number of actions (odd, >= 3, for cyclic)."),
    seed: int = typer.Option(0, "--seed", help="Seed (random and bradley-terry)."),
    strength: float = typer.Option(1.0, "--strength", help="Cyclic game: win margin in [0, 1]."),
    scale: float = typer.Option(1.0, "--scale", help="Bradley-Terry: std of the scores."),
    out: Path = typer.Option(..., "--out", help="Output .npy, shape (n, n)."),
) -> None:
    """Write a preference matrix P (P_ij = P(y_i > y_j), P + P^T = 1) to a .npy file."""
    from nlhf.algorithms import games

    P = games.make_game(kind.value, n, seed, strength=strength, scale=scale)
    games.validate_preference_matrix(P)
    _save_npy(P, out)
    typer.echo(f"wrote {kind.value} game, n={P.shape[0]}, to {out}")


@game_app.command("ref")
@one_line_errors
def ref(
    kind: RefKind = typer.Option(RefKind.softmax, "--kind", help="uniform | softmax (of N(0,1) logits)"),
    n: int = typer.Option(..., "--n", help="Number of actions."),
    seed: int = typer.Option(0, "--seed", help="Seed (softmax)."),
    out: Path = typer.Option(..., "--out", help="Output .npy, shape (n,)."),
) -> None:
    """Write a reference policy pi_ref (strictly positive, sums to 1) to a .npy file."""
    from nlhf.algorithms import games

    pi_ref = games.uniform_reference(n) if kind is RefKind.uniform else games.softmax_reference(n, seed)
    _save_npy(pi_ref, out)
    typer.echo(f"wrote {kind.value} reference policy, n={n}, to {out}")


@game_app.command("run")
@one_line_errors
def run(
    matrix: Path = typer.Option(..., "--matrix", help="Preference matrix .npy, shape (n, n)."),
    ref_path: Path | None = typer.Option(None, "--ref", help="Reference policy .npy (default uniform)."),
    beta: float = typer.Option(..., "--beta", help="KL-to-reference strength, > 0."),
    algorithm: Algorithm = typer.Option(Algorithm.nash_mp, "--algorithm", help="nash-mp | nash-md | omd | egpo"),
    eta: float | None = typer.Option(
        None,
        "--eta",
        help="Step: nash-mp/omd default 2*beta; egpo (EGPO's own convention) default 1/(1+beta); "
        "nash-md: constant lr (default schedule 2/(beta (t+2))).",
    ),
    queries: int = typer.Option(..., "--queries", help="Preference-query budget (Nash-MP: 2 per iteration)."),
    out: Path = typer.Option(..., "--out", help="Output run .json."),
) -> None:
    """Run an exact algorithm against the game's regularised Nash equilibrium; write the trace."""
    from nlhf.algorithms.exact import run_algorithm
    from nlhf.algorithms.games import GameError, uniform_reference, validate_preference_matrix

    _finite_positive(beta, "beta")
    if eta is not None:
        _finite_positive(eta, "eta")
    if queries < 1:
        raise GameError(f"queries must be >= 1, got {queries}")
    P = validate_preference_matrix(_load_array(matrix, "matrix"))
    pi_ref = uniform_reference(P.shape[0]) if ref_path is None else _load_array(ref_path, "reference")
    trace = run_algorithm(algorithm.value, P, pi_ref, beta, queries, eta=eta)
    record = trace.to_json_dict()
    for key in ("kl_to_nash", "exploitability", "span"):  # 9 significant digits keep files small
        record[key] = [float(f"{x:.9g}") for x in record[key]]
    record["matrix"] = str(matrix)
    record["ref"] = None if ref_path is None else str(ref_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record) + "\n")
    typer.echo(
        f"{algorithm.value} beta={beta:g} eta={trace.eta if trace.eta is None else f'{trace.eta:g}'}: "
        f"{trace.queries[-1]} queries, KL(pi*||pi) {trace.kl_to_nash[0]:.3g} -> {trace.kl_to_nash[-1]:.3g}, "
        f"exploitability {trace.exploitability[-1]:.3g}; wrote {out}"
    )


@game_app.command("plot")
@one_line_errors
def plot(
    runs: list[Path] = typer.Argument(..., help="Run .json files from `nlhf game run`."),
    out: Path = typer.Option(..., "--out", help="Output image (.png/.pdf/.svg)."),
    title: str | None = typer.Option(None, "--title", help="Figure title."),
) -> None:
    """Plot KL(pi* || pi_k) against preference queries (log y), with Nash-MP's bound dashed."""
    from nlhf.algorithms.exact import GameTrace
    from nlhf.algorithms.games import GameError
    from nlhf.cli.game_plot import plot_convergence

    traces = []
    for path in runs:
        if not path.is_file():
            raise FileNotFoundError(f"run file not found: {path}")
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GameError(f"run file {path} is not JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(record, dict):
            raise GameError(f"run file {path} does not hold a JSON object")
        traces.append(GameTrace.from_json_dict(record))
    plot_convergence(traces, out, title=title)
    typer.echo(f"wrote {out}")

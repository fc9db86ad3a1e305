"""``nlhf game make | ref | run | plot``: outputs, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nlhf.algorithms.equilibrium import solve_nash
from nlhf.algorithms.games import random_game, uniform_reference, validate_preference_matrix
from nlhf.cli.game import game_app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(game_app, [str(a) for a in args])


def assert_one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture()
def game(tmp_path: Path) -> Path:
    out = tmp_path / "P.npy"
    assert invoke("make", "--kind", "random", "--n", 8, "--seed", 3, "--out", out).exit_code == 0
    return out


# --------------------------------------------------------------------------- make / ref
@pytest.mark.parametrize("kind, n", [("random", 6), ("cyclic", 5), ("bradley-terry", 4)])
def test_make_writes_valid_matrix(tmp_path, kind, n):
    out = tmp_path / f"{kind}.npy"
    res = invoke("make", "--kind", kind, "--n", n, "--seed", 1, "--out", out)
    assert res.exit_code == 0, res.output
    P = np.load(out)
    assert P.shape == (n, n)
    validate_preference_matrix(P)
    if kind == "random":
        np.testing.assert_array_equal(P, random_game(n, 1))


def test_make_rejects_even_cyclic(tmp_path):
    assert_one_line_error(invoke("make", "--kind", "cyclic", "--n", 4, "--out", tmp_path / "c.npy"), "odd")


def test_ref_writes_distribution(tmp_path):
    out = tmp_path / "r.npy"
    assert invoke("ref", "--kind", "softmax", "--n", 5, "--seed", 2, "--out", out).exit_code == 0
    r = np.load(out)
    assert r.shape == (5,) and r.sum() == pytest.approx(1.0) and np.all(r > 0)


# --------------------------------------------------------------------------- run
def test_run_writes_trace(tmp_path, game):
    out = tmp_path / "run.json"
    res = invoke("run", "--matrix", game, "--beta", 0.2, "--algorithm", "nash-mp", "--queries", 40, "--out", out)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert rec["algorithm"] == "nash-mp" and rec["beta"] == 0.2
    assert rec["eta"] == pytest.approx(0.4)  # default 2 beta
    assert rec["queries"] == list(range(0, 41, 2))
    m = len(rec["queries"])
    assert len(rec["kl_to_nash"]) == len(rec["exploitability"]) == len(rec["span"]) == m
    assert rec["kl_to_nash"][-1] < 1e-4 * rec["kl_to_nash"][0]
    P = np.load(game)
    np.testing.assert_allclose(rec["nash"], solve_nash(P, uniform_reference(8), 0.2), rtol=1e-10)
    assert sum(rec["policy"]) == pytest.approx(1.0)


def test_run_with_reference_and_nash_md(tmp_path, game):
    ref = tmp_path / "r.npy"
    invoke("ref", "--kind", "softmax", "--n", 8, "--seed", 0, "--out", ref)
    out = tmp_path / "md.json"
    res = invoke("run", "--matrix", game, "--ref", ref, "--beta", 0.1, "--algorithm", "nash-md", "--queries", 30, "--out", out)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert rec["eta"] is None and rec["queries"][-1] == 30 and rec["ref"] == str(ref)


def _save(tmp_path: Path, name: str, arr) -> Path:
    p = tmp_path / name
    np.save(p, np.asarray(arr, dtype=float))
    return p


def test_run_bad_inputs_exit_with_one_line(tmp_path, game):
    out = tmp_path / "x.json"

    def run(matrix, *extra, beta="0.1"):
        return invoke("run", "--matrix", matrix, "--beta", beta, "--queries", 10, "--out", out, *extra)

    P = random_game(4, 0)
    bad = P.copy()
    bad[0, 3], bad[3, 0] = 0.9, 0.3
    assert_one_line_error(run(_save(tmp_path, "nc.npy", bad)), "P[0,3] + P[3,0] = 1.2")
    assert_one_line_error(run(_save(tmp_path, "rect.npy", np.full((3, 4), 0.5))), "square")
    nan = P.copy()
    nan[1, 2] = np.nan
    assert_one_line_error(run(_save(tmp_path, "nan.npy", nan)), "non-finite")
    assert_one_line_error(run(tmp_path / "missing.npy"), "not found")
    (tmp_path / "junk.npy").write_text("not an array")
    assert_one_line_error(run(tmp_path / "junk.npy"), "cannot read")
    ok = _save(tmp_path, "ok.npy", P)
    assert_one_line_error(run(ok, "--ref", _save(tmp_path, "r1.npy", [0.5, 0.3, 0.1, 0.05])), "sum to 1")
    assert_one_line_error(run(ok, "--ref", _save(tmp_path, "r2.npy", [0.5, 0.5])), "shape")
    assert_one_line_error(run(ok, beta="0"), "beta")
    assert_one_line_error(run(ok, beta="-1"), "beta")
    assert_one_line_error(run(ok, "--eta", "0"), "eta")
    assert_one_line_error(run(ok, "--algorithm", "egpo", "--eta", "20"), "eta * beta < 1")
    assert not out.exists()


def test_installed_command_prints_one_line_no_traceback(tmp_path):
    bad = _save(tmp_path, "bad.npy", np.full((3, 3), 0.7))
    exe = Path(sys.executable).with_name("nlhf")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from nlhf.cli import app; app()"]
    proc = subprocess.run(
        cmd + ["game", "run", "--matrix", str(bad), "--beta", "0.1", "--queries", "4", "--out", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not complementary" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- plot
def test_plot_writes_png(tmp_path, game):
    runs = []
    for algo in ("nash-mp", "nash-md", "egpo"):
        out = tmp_path / f"{algo}.json"
        assert invoke("run", "--matrix", game, "--beta", 0.1, "--algorithm", algo, "--queries", 20, "--out", out).exit_code == 0
        runs.append(out)
    fig = tmp_path / "fig.png"
    res = invoke("plot", *runs, "--out", fig)
    assert res.exit_code == 0, res.output
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10_000


def test_plot_bad_inputs(tmp_path):
    assert_one_line_error(invoke("plot", tmp_path / "none.json", "--out", tmp_path / "f.png"), "not found")
    junk = tmp_path / "junk.json"
    junk.write_text("{ nope")
    assert_one_line_error(invoke("plot", junk, "--out", tmp_path / "f.png"), "not JSON")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"algorithm": "nash-mp", "beta": 0.1}))
    assert_one_line_error(invoke("plot", partial, "--out", tmp_path / "f.png"), "lacks field")

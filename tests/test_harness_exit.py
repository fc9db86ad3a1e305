"""The test process leaves with pytest's own exit status, even where a native finaliser would
crash the interpreter at exit (CI saw SIGSEGV, exit 139, after "411 passed")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# atexit runs during interpreter finalisation, where the crash was: this one kills the process
# with SIGSEGV, as a crashing native finaliser would.
CRASH_AT_EXIT = """
import atexit, os, signal
atexit.register(lambda: os.kill(os.getpid(), signal.SIGSEGV))

def test_passes():
    assert True
"""


def _run(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(body)
    import os

    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS), **env},
        capture_output=True, text=True, timeout=120,
    )


def test_crash_in_finalisation_does_not_turn_a_green_run_red(tmp_path):
    r = _run(tmp_path, CRASH_AT_EXIT)
    assert "1 passed" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def test_the_crash_is_real_without_the_guard(tmp_path):
    r = _run(tmp_path, CRASH_AT_EXIT, NLHF_TEST_NATIVE_EXIT="1")
    assert "1 passed" in r.stdout, r.stdout + r.stderr
    assert r.returncode == -11, r.returncode  # what CI saw (139 = 128 + SIGSEGV through bash)


@pytest.mark.parametrize("body, status", [("def test_f():\n    assert False\n", 1),
                                          ("def test_p():\n    pass\n", 0)])
def test_exit_status_is_pytests(tmp_path, body, status):
    assert _run(tmp_path, body).returncode == status

"""Shared cache builds (nlhf.cachebuild): one builder across processes, atomic replacement,
no temporary folders left by failed or killed builds."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nlhf import cachebuild
from nlhf.cachebuild import build_lock, build_once, lock_path


def _siblings(out: Path) -> list[str]:
    """Names next to ``out`` other than ``out`` and its lock file."""
    return sorted(p.name for p in out.parent.iterdir() if p.name not in (out.name, lock_path(out).name))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- two processes
def _build_tiny_counting(out: str, tokenizer_dir: str, counter: str, barrier, result: str) -> None:
    """Child process: make_tiny_llama (its returned path written to ``result``), with each run of
    its build function counted in ``counter``."""
    from nlhf.config import TinyModelConfig
    from nlhf.models import tiny

    real = tiny.build_once

    def counting(out, is_complete, build, **kw):
        def counted(tmp):
            with open(counter, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(0.5)  # keep the build running while the other process arrives
            build(tmp)
        return real(out, is_complete, counted, **kw)

    tiny.build_once = counting
    barrier.wait(timeout=120)
    Path(result).write_text(str(tiny.make_tiny_llama(out, tokenizer_dir, TinyModelConfig(seed=7))))


def test_concurrent_tiny_builds_run_once(tmp_path, tokenizer_dir):
    out, counter = tmp_path / "models" / "tiny", tmp_path / "count.txt"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_tiny_counting,
                         args=(str(out), str(tokenizer_dir), str(counter), barrier, str(tmp_path / f"result{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [(tmp_path / f"result{i}").read_text() for i in range(2)] == [str(out), str(out)]
    assert len(counter.read_text().split()) == 1  # the second process waited and reused the build
    assert (out / "model.safetensors").is_file() and (out / "nlhf_tiny.json").is_file()
    assert _siblings(out) == []  # no temporary folder left


def test_threads_of_one_process_also_build_once(tmp_path):
    out, runs = tmp_path / "thing", []

    def slow_build(tmp: Path) -> None:
        runs.append(threading.get_ident())
        time.sleep(0.3)
        _marker_build(tmp)

    threads = [threading.Thread(target=build_once, args=(out, _has_marker(), slow_build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1 and _has_marker()(out) and _siblings(out) == []
    (tmp_path / "plain").mkdir()  # the folder keeps the umask's mode (not mkdtemp's 0700)
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


# ----------------------------------------------------------------------------- failures
def _marker_build(tmp: Path, text: str = "ok") -> None:
    (tmp / "data.bin").write_bytes(b"x" * 1000)
    (tmp / "marker").write_text(text)


def _has_marker(text: str = "ok"):
    return lambda p: (p / "marker").is_file() and (p / "marker").read_text() == text


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_failed_build_leaves_no_temp_and_no_out(tmp_path, exc):
    out = tmp_path / "thing"

    def failing(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        raise exc("build failed")

    with pytest.raises(exc):
        build_once(out, _has_marker(), failing)
    assert not out.exists() and _siblings(out) == []
    t = time.time()
    assert build_once(out, _has_marker(), _marker_build) == out  # the lock was released
    assert time.time() - t < 5 and _has_marker()(out) and _siblings(out) == []


def test_incomplete_build_is_refused(tmp_path):
    out = tmp_path / "thing"
    with pytest.raises(RuntimeError, match="incomplete"):
        build_once(out, _has_marker(), lambda tmp: (tmp / "data.bin").write_bytes(b"x"))
    assert not out.exists() and _siblings(out) == []


def test_nested_build_of_same_folder_raises_instead_of_deadlocking(tmp_path):
    out = tmp_path / "thing"
    with build_lock(out), pytest.raises(RuntimeError, match="nested build"):
        build_once(out, _has_marker(), _marker_build)
    assert build_once(out, _has_marker(), _marker_build) == out


def test_stale_temp_folders_of_dead_pids_are_removed(tmp_path):
    out = tmp_path / "thing"
    dead, alive = _dead_pid(), os.getpid()
    stale = [f"thing.tmp{dead}-abc", f"thing.tmp{dead}", f"thing.old{dead}-xyz"]  # new and old naming
    kept = [f"thing.tmp{alive}-live", f"thingy.tmp{dead}-other"]  # a live builder; another folder's temp
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("half")
    build_once(out, _has_marker(), _marker_build)
    assert _siblings(out) == sorted(kept)


# ----------------------------------------------------------------------------- replacement
def _rebuild_while_reading(out: Path, rounds: int) -> list[str]:
    """Rebuild ``out`` ``rounds`` times while a thread polls it; returns what the reader saw missing."""
    missing: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if not (out / "marker").is_file():
                missing.append("marker")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, rounds + 1):
            build_once(out, _has_marker(f"v{i}"), lambda tmp, i=i: _marker_build(tmp, f"v{i}"))
    finally:
        stop.set()
        t.join()
    return missing


def test_rebuild_replaces_stale_folder_without_a_gap(tmp_path):
    out = tmp_path / "thing"
    out.mkdir()
    _marker_build(out, "v0")  # stale: complete for no wanted version
    assert _rebuild_while_reading(out, 30) == []
    assert (out / "marker").read_text() == "v30" and _siblings(out) == []


def test_rebuild_without_rename_exchange_still_replaces(tmp_path, monkeypatch):
    out = tmp_path / "thing"
    out.mkdir()
    _marker_build(out, "v0")
    monkeypatch.setattr(cachebuild, "_exchange", lambda a, b: False)  # a file system without renameat2
    _rebuild_while_reading(out, 3)  # (a gap of microseconds is possible here; not asserted)
    assert (out / "marker").read_text() == "v3" and _siblings(out) == []

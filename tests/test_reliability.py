"""What a run survives, tested as a user runs it (`nlhf train` subprocesses on the game config):

- SIGKILL of the whole driver process group after the iteration-4 checkpoint, then `--resume`:
  iterations 1..6 appear once each in metrics.jsonl and 5-6 equal an uninterrupted run's;
- SIGKILL of a rollout worker and of one of two judge replicas mid-run (weights sent as files,
  ``sync.backend: file``): the run completes, the restarted engine holds the learner's weights
  (log-prob gap as before the kill), the training query counts are exactly those of the
  uninterrupted run (object store), and the weight files are gone at the end;
- SIGKILL of a learner: the run stops with one message naming the learner and the resume
  command (exit 3); the resume completes the run;
- a second run into a locked folder is refused; the judge token never reaches the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

SECRET = "s3cret-judge-token-do-not-leak"
# Small and quick, deterministic: fp32 engines, 6 iterations, a checkpoint every 2.
OVERRIDES = ["iterations=6", "save_every=2", "keep_last=3", "policy.dtype=float32", "win_rate_every=0",
             "prompts_per_iteration=64", "progress=plain", "cluster.dashboard=false",
             f"judge.serve.http.token={SECRET}"]


def _env(tmp: Path) -> dict[str, str]:
    # Ray's socket paths live under RAY_TMPDIR and must stay under 107 bytes (AF_UNIX): pytest's
    # tmp_path is too deep, so each run gets a short folder of its own under /tmp.
    ray_tmp = tempfile.mkdtemp(prefix="nlhf-ray-", dir="/tmp")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    return env


def start(out: Path, cache_dir: Path, extra: list[str] = (), *, resume: bool = False) -> subprocess.Popen:
    """`nlhf train` on the game config in its own session (process group = its pid)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "nlhf.cli", "train", "--config", "configs/game-cpu.yaml", f"output_dir={out}",
            f"cache_dir={cache_dir}", *OVERRIDES, *extra] + (["--resume"] if resume else [])
    log = open(out.parent / f"{out.name}{'-resume' if resume else ''}.log", "w")
    return subprocess.Popen(args, cwd=REPO, env=_env(out.parent), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the driver's session (driver, its local Ray cluster and workers)."""
    sid = proc.pid
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, s = (int(x) for x in line.split())
        if s == sid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: int = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_session(proc)
        else:
            kill_session(proc)  # leftovers of the session (a crashed driver's cluster), if any


def log_of(out: Path, resume: bool = False) -> str:
    return (out.parent / f"{out.name}{'-resume' if resume else ''}.log").read_text()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def session_pids(proc: subprocess.Popen, title: str) -> list[int]:
    """Pids in the driver's session whose command line starts with ``title`` (Ray sets ``ray::Class``)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        pid, sid, args = line.split(None, 2)
        if int(sid) == proc.pid and args.startswith(title):
            found.append(int(pid))
    return found


COMPARED = ("losses/half_step", "losses/full_step", "charts/kl_ref", "charts/kl_anchor", "game/kl_to_nash",
            "charts/queries", "rollout/logprob_gap")


def assert_same_iterations(a: list[dict], b: list[dict], iterations: list[int], tol: float = 1e-6) -> None:
    by_a = {m["iteration"]: m for m in a}
    by_b = {m["iteration"]: m for m in b}
    for it in iterations:
        for key in COMPARED:
            x, y = by_a[it].get(key), by_b[it].get(key)
            assert (x is None) == (y is None), (it, key, x, y)
            if x is not None:
                assert abs(x - y) <= tol * max(1.0, abs(x)), (it, key, x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted run every fault scenario is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = start(out, cache_dir)
    assert finish(proc) == 0, log_of(out)[-5000:]
    return out


def test_reference_run_is_complete_and_keeps_no_secret(reference):
    ms = metrics(reference)
    assert [m["iteration"] for m in ms] == [1, 2, 3, 4, 5, 6]
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["final", "iter_00002", "iter_00004"]  # keep_last=3; iteration 6 is `final`
    for name in ckpts:
        folder = reference / "checkpoints" / name
        assert (folder / "manifest.json").is_file() and (folder / "run_state.json").is_file()
        assert (folder / "trainer").is_dir() and (folder / "model.safetensors").is_file()
    summary = json.loads((reference / "summary.json").read_text())
    seeds = summary["sampling_seeds"]
    assert seeds["total"] == seeds["distinct"] > 6 * 64 * 4  # every seed of the run is distinct
    for path in reference.rglob("*"):  # the judge token appears nowhere in the run folder
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert "***" in (reference / "config.yaml").read_text()


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(reference, tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = start(out, cache_dir)
    try:
        wait_for(lambda: (out / "checkpoints" / "iter_00004" / "manifest.json").is_file(), proc, 600,
                 "the iteration-4 checkpoint")
    finally:
        kill_session(proc)
    assert proc.returncode == -signal.SIGKILL
    resumed = start(out, cache_dir, resume=True)
    assert finish(resumed) == 0, log_of(out, resume=True)[-5000:]
    assert "resuming from" in log_of(out, resume=True)
    ms = metrics(out)
    assert [m["iteration"] for m in ms] == [1, 2, 3, 4, 5, 6]  # each iteration exactly once
    assert_same_iterations(ms, metrics(reference), [1, 2, 3, 4, 5, 6])
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((reference / "summary.json").read_text())
    assert abs(a["game"]["kl_to_nash"] - b["game"]["kl_to_nash"]) < 1e-6
    assert a["preference_queries"] == b["preference_queries"]
    # resuming a finished run: nothing left to train, same result, still once per iteration
    again = start(out, cache_dir, resume=True)
    assert finish(again) == 0
    assert [m["iteration"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_rollout_worker_and_judge_replica_deaths_are_survived(reference, tmp_path, cache_dir):
    # with sync.backend: file (the reference run uses object_store): the restarted engine is
    # re-pushed from the pool's newest weight file, and the learning is the same bit for bit
    out = tmp_path / "run"
    proc = start(out, cache_dir, ["judge.serve.replicas=2", "judge.serve.num_cpus=0.1", "sync.backend=file"])
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 1, proc, 600, "iteration 1")
        engines = session_pids(proc, "ray::RolloutWorker")
        assert len(engines) == 2, engines
        os.kill(engines[0], signal.SIGKILL)
        wait_for(lambda: len(metrics(out)) >= 3, proc, 600, "iteration 3")
        replicas = session_pids(proc, "ray::ServeReplica")
        assert len(replicas) == 2, replicas
        os.kill(replicas[0], signal.SIGKILL)
        code = finish(proc)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    assert code == 0, log_of(out)[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["faults"]["rollout_restarts"] >= 1, summary["faults"]
    ms, ref = metrics(out), metrics(reference)
    assert [m["iteration"] for m in ms] == [1, 2, 3, 4, 5, 6]
    # exact training query counts, and the same learning as without faults (the restarted engine
    # was given the pool's weights: otherwise its samples, log-prob gap and KL would differ)
    assert [m["charts/queries"] for m in ms] == [m["charts/queries"] for m in ref]
    assert_same_iterations(ms, ref, [1, 2, 3, 4, 5, 6], tol=1e-5)
    assert not (out / "sync").exists()  # the weight files are removed with the run's actors


def test_learner_death_stops_with_resume_command_and_resume_finishes(reference, tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = start(out, cache_dir)
    try:
        wait_for(lambda: (out / "checkpoints" / "iter_00002" / "manifest.json").is_file(), proc, 600,
                 "the iteration-2 checkpoint")
        learners = session_pids(proc, "ray::LearnerWorker")
        assert learners
        os.kill(learners[0], signal.SIGKILL)
        code = finish(proc)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    text = log_of(out)
    assert code == 3, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "learner rank 0 died" in errors[0] and "--resume" in errors[0], errors
    assert "Traceback" not in text.split(errors[0])[-1]
    resumed = start(out, cache_dir, resume=True)
    assert finish(resumed) == 0, log_of(out, resume=True)[-5000:]
    ms = metrics(out)
    assert [m["iteration"] for m in ms] == [1, 2, 3, 4, 5, 6]
    assert_same_iterations(ms, metrics(reference), [1, 2, 3, 4, 5, 6])


def test_interrupt_stops_quickly_with_resume_hint(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = start(out, cache_dir, ["iterations=40"])
    try:
        wait_for(lambda: (out / "checkpoints" / "iter_00002" / "manifest.json").is_file(), proc, 600,
                 "the iteration-2 checkpoint")
        # a second run into the same folder is refused while this one holds it
        second = subprocess.run([sys.executable, "-m", "nlhf.cli", "train", "--config", "configs/game-cpu.yaml",
                                 f"output_dir={out}", f"cache_dir={cache_dir}", "--resume"], cwd=REPO,
                                env=_env(tmp_path / "second"), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by another nlhf run" in second.stderr, second.stderr[-2000:]
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
        stopped_in = time.monotonic() - t0
    finally:
        kill_session(proc)
    text = log_of(out)
    assert code == 130, text[-3000:]
    assert stopped_in < 30, stopped_in
    assert "interrupted (SIGTERM)" in text and "last complete checkpoint" in text and "--resume" in text, text[-3000:]


def test_shared_engine_death_is_survived(reference, tmp_path, cache_dir):
    # rollout.share_engines: the one engine serves both pools in turn; killed, it comes back with
    # the initial weights and whichever pool samples next re-pushes its own: same learning as the
    # two-engine reference, bit for bit
    out = tmp_path / "run"
    proc = start(out, cache_dir, ["rollout.share_engines=true", "sync.backend=file"])
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 1, proc, 600, "iteration 1")
        engines = session_pids(proc, "ray::RolloutWorker")
        assert len(engines) == 1, engines
        os.kill(engines[0], signal.SIGKILL)
        code = finish(proc)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    assert code == 0, log_of(out)[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["faults"]["rollout_restarts"] >= 1, summary["faults"]
    ms = metrics(out)
    assert [m["iteration"] for m in ms] == [1, 2, 3, 4, 5, 6]
    assert_same_iterations(ms, metrics(reference), [1, 2, 3, 4, 5, 6], tol=1e-5)

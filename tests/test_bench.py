"""`nlhf bench train|rollout|sync|judge` run as a user runs them and write their numbers to a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_writes_results(tmp_path: Path, shared_data: Path, cache_dir: Path) -> None:
    from nlhf.judge.pairwise import make_tiny_pairwise

    judge = make_tiny_pairwise(tmp_path / "judge")
    common = ["policy.source=tiny-random", "policy.dtype=float32", f"cache_dir={cache_dir}",
              f"judge.path={judge}", "judge.train=null", "rollout.max_new_tokens=4"]
    expect = {"rollout": "tokens_per_s", "sync": "total_s_median", "judge": "pairs_per_s"}
    for what, key in expect.items():
        out = tmp_path / f"{what}.json"
        proc = subprocess.run([sys.executable, "-m", "nlhf.cli", "bench", what, "--config", "configs/smollm2-cpu.yaml",
                               "--out", str(out), *common], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["benchmark"] == what and result[key] > 0
    assert json.loads((tmp_path / "sync.json").read_text())["bytes"] > 1_000_000


def test_bench_unknown_is_one_line_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "nlhf.cli", "bench", "nope", "--out", "/tmp/x.json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: bench: unknown benchmark 'nope'; choose one of ['judge', 'rollout', 'sync', 'train']"


@pytest.mark.slow
@pytest.mark.ray
def test_bench_train_reports_steady_state_figures(tmp_path: Path, cache_dir: Path) -> None:
    """A real (short) training run on Ray: per-phase seconds, actor busy time vs overhead, per-actor peak RSS."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "nlhf.cli", "bench", "train", "--config", "configs/game-cpu.yaml",
                           "--iterations", "3", "--out", str(out), f"cache_dir={cache_dir}", "prompts_per_iteration=32",
                           "cluster.dashboard=false"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["tool"] == "nlhf" and r["warmup_steps"] == 1 and r["steps_measured"] == 2
    assert r["training_comparisons_per_step"] > 0 and r["seconds_per_training_comparison"] > 0
    step = r["seconds_per_step"]["median"]
    assert abs(sum(r["phases"].values()) - step) < 0.05 * step  # the phases make up the iteration
    assert all(0 <= r["busy_seconds"][p] <= r["phases"][p] + 1e-6 for p in r["phases"]), r
    assert 0 <= r["ray_overhead_fraction"] < 1
    assert r["sync_bytes_per_step"] > 0
    rss = r["peak_rss_gb"]
    assert {"driver", "learner_rank0", "rollout_current_0", "rollout_extrapolated_0"} <= set(rss), rss
    assert all(v > 0.05 for v in rss.values()) and r["cpu_capability"]
    private, shared = r["peak_private_gb"], r["peak_shared_gb"]
    assert set(private) == set(shared) == {"learner_rank0", "rollout_current_0", "rollout_extrapolated_0"}, r
    for k in private:  # parts of the process's RSS (sampled, so at most its exact peak)
        assert 0.05 < private[k] <= rss[k] + 1e-3 and 0 <= shared[k] <= rss[k] + 1e-3, (k, r)


@pytest.mark.parametrize(("algorithm", "phases"), [("nash-mp", ["TRAIN", "OPPONENT"]), ("egpo", ["TRAIN", "OPPONENT"]),
                                                   ("online-ipo", ["TRAIN"])])
def test_replay_requests_follow_each_algorithms_rollout_calls(algorithm, phases, shared_data: Path, cache_dir: Path) -> None:
    """The replay makes each rollout call the driver makes per iteration: pi_k's responses, then
    (but for online IPO) the opponents' from the other pool (EGPO's pi_{k+1/2} included)."""
    from transformers import AutoTokenizer

    from nlhf.bench import replay_requests
    from nlhf.config import load_train_config
    from nlhf.models import resolve_model

    cfg = load_train_config(REPO / "configs" / "smollm2-cpu.yaml", ["policy.source=tiny-random", f"algorithm.name={algorithm}",
                                                                   "algorithm.opponents_per_response=2", f"cache_dir={cache_dir}"],
                            check=False)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.policy, cfg.cache_dir))
    _, calls = replay_requests(cfg, tok, range(1, 3))
    assert [(k, phase.name) for k, phase, _, _ in calls] == [(k, p) for k in (1, 2) for p in phases]

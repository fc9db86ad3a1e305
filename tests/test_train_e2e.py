"""End to end on CPU: the whole Nash-MP pipeline (local Ray cluster, two vLLM rollout pools,
judge service, DeepSpeed learner, weight sync) with tiny models.

- language mode: the smollm2-cpu config with a tiny random policy and a tiny pairwise judge,
  real prompts, 2 iterations; checks every output a user relies on.
- game mode (configs/game-cpu.yaml): the system-level correctness test — the pipeline must
  converge to the exact regularised Nash equilibrium, KL(pi* || pi) <= 2e-3 at n = 10.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def run_train(config: str, overrides: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
    """`nlhf train` as a user runs it, in a subprocess (its own local Ray cluster)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "nlhf.cli", "train", "--config", config, *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"nlhf train failed:\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-6000:]}"
    return proc


def test_language_pipeline_two_iterations(tmp_path: Path, shared_data: Path, cache_dir: Path) -> None:
    from transformers import AutoTokenizer

    from nlhf.judge.pairwise import make_tiny_pairwise

    # The judge folder is missing: the driver trains it first from the config's real training
    # files (as README's first command does on a fresh machine), here from a tiny encoder.
    encoder = make_tiny_pairwise(tmp_path / "tiny-encoder", head="pairwise", seed=0)
    judge_dir = tmp_path / "judge"
    out = tmp_path / "run"
    proc = run_train("configs/smollm2-cpu.yaml", [
        "policy.source=tiny-random", "policy.dtype=float32", f"output_dir={out}", f"cache_dir={cache_dir}",
        f"judge.path={judge_dir}", f"judge.train.encoder={encoder}", "judge.train.max_train_pairs=16",
        "judge.train.max_val_pairs=8", "judge.train.max_length=64", "judge.train.freeze_layers=1", "judge.max_length=64",
        "iterations=2", "save_every=1", "win_rate_every=1", "data.eval_num_prompts=4",
        "rollout.max_new_tokens=8", "cluster.dashboard=false", "learner.optimizer.lr=1e-3", "progress=plain",
    ], timeout=900)
    assert "training it first" in proc.stdout + proc.stderr
    assert (judge_dir / "model.safetensors").is_file()

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("charts/win_prob", "charts/kl_ref", "charts/kl_anchor", "losses/half_step", "losses/full_step",
                    "charts/response_len", "perf/tokens_per_s_current", "perf/tokens_per_s_extrapolated",
                    "time/rollout", "time/judge", "time/learn", "time/sync", "charts/queries"):
            assert key in m, key
        assert 0.0 <= m["charts/win_prob"] <= 1.0
        assert m["perf/tokens_per_s_current"] > 0 and m["perf/tokens_per_s_extrapolated"] > 0
    # Training queries, per iteration (the config's 4 prompts x 4 responses, opponents "all"; a
    # tiny random policy never repeats an 8-token response, so no pair is identical): the
    # half-step's self-play pairs are the 6 unordered sibling pairs per prompt (24), the full step
    # judges each of the 16 responses against all 4 of the other pool's (64). The win-probability
    # calls (one per prompt) are evaluation queries and are counted apart.
    assert [m["charts/identical_fraction"] for m in lines] == [0.0, 0.0]
    assert [m["charts/queries"] for m in lines] == [88, 176]
    assert [m["charts/eval_queries"] for m in lines] == [4, 8]
    assert lines[1]["charts/kl_ref"] != 0.0  # the policy moved away from the reference

    summary = json.loads((out / "summary.json").read_text())
    wr = summary["win_rate_vs_initial"]
    assert wr["num_prompts"] == 4 and wr["ci95_low"] <= wr["win_rate"] <= wr["ci95_high"]
    # KL(pi_final || pi_ref) on the first final response of each prompt (data.eval_kl_samples_per_prompt
    # = 1 by default), not on all 4 x 4 of them: two learner forwards per response
    assert wr["kl_samples"] == 4 and wr["kl_final_to_reference"] > 0.0 and wr["kl_final_to_reference_se"] >= 0.0
    # `nlhf bench train` replays the loop's rollout requests in a standalone engine: the replay
    # draws the run's prompts (its sampler ends where the run's did) with the run's seeds
    from nlhf.bench import replay_requests
    from nlhf.config import load_train_config
    from nlhf.models import resolve_model

    cfg = load_train_config("configs/smollm2-cpu.yaml", ["policy.source=tiny-random", f"cache_dir={cache_dir}"])
    state = json.loads((out / "checkpoints" / "final" / "run_state.json").read_text())
    sampler, calls = replay_requests(cfg, AutoTokenizer.from_pretrained(resolve_model(cfg.policy, cache_dir)), range(2))
    assert [(k, phase.name) for k, phase, _, _ in calls] == [(0, "TRAIN"), (0, "OPPONENT"), (1, "TRAIN"), (1, "OPPONENT")]
    for phase in ("TRAIN", "OPPONENT"):
        assert [x for _, p, _, seeds in calls if p.name == phase for row in seeds for x in row] == state["seeds"][phase]
    assert sampler.state_dict() == state["sampler"]

    # save_every=1: iteration 1 is a checkpoint of its own, the last iteration is `final`
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["final", "iter_00001"]
    for ckpt in ("iter_00001", "final"):
        assert (out / "checkpoints" / ckpt / "config.json").is_file()

    # the final checkpoint loads with transformers and generates
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(out / "checkpoints" / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "final")
    ids = tok("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert (out / "tensorboard").is_dir()


def test_game_pipeline_converges_to_nash(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "game"
    run_train("configs/game-cpu.yaml", [f"output_dir={out}", f"cache_dir={cache_dir}", "progress=plain"], timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    game = summary["game"]
    assert summary["hardware"]["cpu_capability"]  # figures are read next to the CPU they ran on
    assert len(game["initial_distribution"]) == len(game["final_distribution"]) == len(game["nash"]) == 10
    assert abs(sum(game["final_distribution"]) - 1) < 1e-6
    assert game["kl_to_nash_initial"] > 0.1  # the run had somewhere to go...
    assert game["kl_to_nash"] <= 2e-3, game  # ...and got to the exact equilibrium (issue 8's bar)


@pytest.mark.parametrize("algorithm", ["online-ipo", "egpo", "nash-md-pg"])
def test_baselines_run_through_the_pipeline_towards_nash(algorithm: str, tmp_path: Path, cache_dir: Path) -> None:
    """The baselines in the same engine (vLLM pools, judge service, DeepSpeed learner, weight
    sync) on the game config: each finishes and moves the policy towards pi*."""
    out = tmp_path / algorithm
    # EGPO judges each response against opponents other than its pair partner: at most 2 of 3 siblings
    extra = ["algorithm.opponents_per_response=2"] if algorithm == "egpo" else []
    run_train("configs/game-cpu.yaml", [f"output_dir={out}", f"cache_dir={cache_dir}", "progress=plain",
                                        f"algorithm.name={algorithm}", "iterations=6", "win_rate_every=0", *extra],
              timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"]["name"] == algorithm
    ms = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in ms] == [1, 2, 3, 4, 5, 6]
    assert all(m["charts/queries"] > 0 for m in ms)
    game = summary["game"]
    print(f"{algorithm}: KL(pi*||pi) {game['kl_to_nash_initial']:.4f} -> {game['kl_to_nash']:.4f}")
    # measured at 6 iterations (AVX512): online-ipo 0.104 -> 0.029 (it oscillates: 0.017-0.059 later)
    assert game["kl_to_nash"] < game["kl_to_nash_initial"] / 2, game


def test_game_pipeline_with_lora_converges_to_nash(tmp_path: Path, cache_dir: Path) -> None:
    """The game config with a LoRA adapter (``learner.lora``) in place of full fine-tuning, through
    the whole pipeline: the engines get the merged weights at every sync, and the run gets close to
    the exact equilibrium (within 3e-3; full fine-tuning's bar is 2e-3, see below)."""
    out = tmp_path / "game-lora"
    run_train("configs/game-cpu.yaml", [f"output_dir={out}", f"cache_dir={cache_dir}", "progress=plain",
                                        "learner.lora.rank=8", "learner.lora.alpha=16",
                                        "learner.optimizer.lr=2e-2"], timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    game = summary["game"]
    print(f"LoRA: KL(pi*||pi) {game['kl_to_nash_initial']:.4f} -> {game['kl_to_nash']:.4f}")
    assert game["kl_to_nash_initial"] > 0.1
    # Measured (AVX512): 0.104 -> 0.0022 (lr 2e-2; 0.0025 at lr 1e-2, 0.0022 with an fp32 base),
    # against 0.0013 for full fine-tuning: LoRA misses full fine-tuning's 2e-3 bar by ~10%, so this
    # checks convergence at 3e-3 and README says so.
    assert game["kl_to_nash"] <= 3e-3, game
    # the final checkpoint is a plain (merged) HF model
    from safetensors.torch import load_file

    names = load_file(str(out / "checkpoints" / "final" / "model.safetensors")).keys()
    assert names and not any("lora" in n for n in names)


def test_shared_engines_train_exactly_as_two_pools(tmp_path: Path, cache_dir: Path) -> None:
    """``rollout.share_engines``: one engine takes turns holding pi_k and pi_{k+1/2}. The weights
    each pool samples from are the same as with two engines, so with the same seeds the run is
    the same, iteration by iteration; one engine fewer runs, and no weight push is added."""
    runs = {}
    for mode in ("two-pools", "shared"):
        out = tmp_path / mode
        extra = ["rollout.share_engines=true"] if mode == "shared" else []
        proc = run_train("configs/game-cpu.yaml", [f"output_dir={out}", f"cache_dir={cache_dir}", "progress=plain",
                                                   "iterations=3", "win_rate_every=0", *extra], timeout=900)
        ms = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = (ms, json.loads((out / "summary.json").read_text()), proc.stdout + proc.stderr)
    (two, two_summary, _), (shared, summary, log) = runs["two-pools"], runs["shared"]
    keys = ("charts/kl_ref", "charts/kl_anchor", "losses/half_step", "losses/full_step", "charts/queries",
            "rollout/tokens", "charts/response_len")
    assert [[m[k] for k in keys] for m in shared] == [[m[k] for k in keys] for m in two]
    assert summary["game"]["final_distribution"] == two_summary["game"]["final_distribution"]
    assert all(m["perf/tokens_per_s_current"] > 0 and m["perf/tokens_per_s_extrapolated"] > 0 for m in shared)
    assert [m["sync/bytes"] for m in shared] == [m["sync/bytes"] for m in two]  # two pushes per iteration, as before
    assert "re-pushing" not in log  # the pools' turns follow the pushes: no weights loaded twice
    assert "rollout_extrapolated_0" in two_summary["peak_rss_gb"]
    assert "rollout_extrapolated_0" not in summary["peak_rss_gb"] and "rollout_current_0" in summary["peak_rss_gb"]

"""``configs/cluster-gpu.yaml`` starts: its hub ids resolve at check and at start-up alike.

The hub models are tiny local stand-ins saved in an HF cache under the config's names
(Qwen/Qwen2.5-1.5B-Instruct: a tiny Llama with SmolLM2's tokenizer; Skywork/Skywork-Reward-V2-
Qwen3-0.6B: a tiny sequence-classification reward model), read with HF_HUB_OFFLINE=1. Only the
local-machine paths and the cluster size are overridden (8 GPUs declared to Ray; there is none),
so start-up goes through config check, reference resolution, prompt loading and the judge
service (whose replicas load the reward model), and must stop at the first actor that needs
CUDA, the learners, with one clear line (nlhf.preflight) instead of a FileNotFoundError.
"""

from __future__ import annotations

import os
import subprocess
import sys
import re
import time
from pathlib import Path

import pytest
from hub_cache import add_to_hf_cache, make_tiny_reward_model

REPO = Path(__file__).resolve().parents[1]
POLICY_ID = "Qwen/Qwen2.5-1.5B-Instruct"
JUDGE_ID = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tokenizer_dir: Path) -> Path:
    """An HF hub cache holding the two stand-ins under cluster-gpu.yaml's hub ids."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    add_to_hf_cache(cache, POLICY_ID, tiny_model_dir)
    add_to_hf_cache(cache, JUDGE_ID, make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", tokenizer_dir))
    return cache


def _run(args: list[str], hub: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=str(hub),
               RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(REPO / "system"))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "nlhf.cli", "train", "--config", "configs/cluster-gpu.yaml", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _local(tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]


def test_check_needs_the_hub_models(stand_ins: Path, tmp_path: Path, shared_data: Path) -> None:
    ok = _run(["--check", *_local(tmp_path)], stand_ins, 120)
    assert ok.returncode == 0 and "config ok" in ok.stdout, ok.stderr
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    bad = _run(["--check", *_local(tmp_path)], empty, 120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith(f"error: policy.source: hub id '{POLICY_ID}' is not in the local HF cache "
                                         "(HF_HUB_OFFLINE=1"), bad.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_cluster_config_starts_up_to_the_first_gpu_actor(stand_ins: Path, tmp_path: Path, shared_data: Path) -> None:
    t0 = time.time()
    res = _run([*_local(tmp_path), "cluster.num_cpus=64", "cluster.num_gpus=8", "cluster.dashboard=false",
                "progress=plain"], stand_ins, 540)
    out = res.stdout + res.stderr
    wall = time.time() - t0
    print(f"cluster-gpu start-up to the first GPU actor: {wall:.1f}s")
    assert "FileNotFoundError" not in out and "Traceback" not in out, out[-4000:]
    assert "started a local cluster on 127.0.0.1 (64 CPUs, 8 GPUs)" in out  # config and resource check passed
    assert "1279 training prompts, 80 held-out prompts" in out  # prompts tokenised with the policy's tokenizer
    assert re.search(r"judge service qwen2\.5-1\.5b-nash-mp-[0-9a-f]{12}-judge up \(bradley-terry, 2 replica\(s\)\)", out)
    assert res.returncode == 2, out[-4000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: learner.num_gpus: 1 GPU(s) per actor, but on node 127.0.0.1"), out[-4000:]
    assert "stopping before the first GPU actor" in last
    assert "LearnerWorker" not in out  # stopped before any learner actor was created
    # start-up used the snapshots from the cache (written to the run's config.yaml unchanged: hub ids)
    assert (tmp_path / "run" / "config.yaml").is_file()

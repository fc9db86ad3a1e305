"""A real two-node run: a Ray head and a Ray worker node on two hosts (network namespaces with
their own addresses, tests/multihost.py), the game config with 2 DeepSpeed learners (ZeRO-2 over
gloo) on different nodes and both rollout pools on the node without the driver.

Placement uses custom Ray resources the nodes declare (head: ``nlhf_rank0``; worker:
``nlhf_rank1``, ``nlhf_rollout``) and the config's ``learner.resources`` (one dict per rank) and
``rollout.resources``. The learners rendezvous at rank 0's node (the head, not the driver's
loopback), and the weights go from learner rank 0 (head) to the engines (worker) through the
object store. Checks: KL(pi* || pi) <= 0.01 in summary.json, and Ray's state API shows the
ranks' bundles and actors on distinct nodes and every rollout actor on the worker node.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from multihost import netns_unavailable, ray_cluster, two_hosts

REPO = Path(__file__).resolve().parents[1]

RUN = "game-2node"
STATE = r"""
import json, sys
from ray.util.state import list_actors, list_nodes, list_placement_groups
addr = sys.argv[1]
nodes = {n.node_id: n.node_ip for n in list_nodes(address=addr)}
actors = [{"class": a.class_name, "name": a.name, "node": nodes.get(a.node_id), "state": a.state}
          for a in list_actors(address=addr, limit=1000)]
pgs = [{"name": p.name, "bundles": [nodes.get(b.get("node_id")) for b in p.bundles]}
       for p in list_placement_groups(address=addr, detail=True)]
print(json.dumps({"actors": actors, "pgs": pgs}))
"""


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = netns_unavailable()
    if reason is not None:
        print(f"SKIP test_multinode: {reason}")
        pytest.skip(reason)
    with two_hosts() as hosts:
        root = Path(f"/tmp/nlhfmn{os.getpid()}")  # short: Ray's socket paths must stay < 108 characters
        try:
            with ray_cluster(hosts, root, cpus=(2, 2),
                             resources=({"nlhf_rank0": 1}, {"nlhf_rank1": 1, "nlhf_rollout": 2})) as cluster:
                yield cluster
        finally:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_game_on_two_nodes(two_node_cluster, tmp_path: Path, cache_dir: Path) -> None:
    cluster = two_node_cluster
    head, worker = cluster.hosts.ips
    out = tmp_path / "run"
    t0 = time.time()
    res = cluster.run(0, [sys.executable, "-m", "nlhf.cli", "train", "--config", "configs/game-cpu.yaml",
                          f"run_name={RUN}", f"output_dir={out}", f"cache_dir={cache_dir}", "progress=plain",
                          # KL(pi*||pi) was 0.0057-0.0062 from iteration 4 to 7 (0.0046 at 12)
                          "iterations=6", "win_rate_every=3",
                          "learner.num_learners=2", "learner.zero_stage=2",
                          "learner.resources=[{nlhf_rank0: 1}, {nlhf_rank1: 1}]", "rollout.resources={nlhf_rollout: 1}"],
                      cwd=REPO, timeout=900, env={"PYTHONPATH": str(REPO / "system"), "HF_HUB_OFFLINE": "1",
                                                  "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    wall = time.time() - t0
    print(f"two-node game run: {wall:.1f}s")
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert f"connected to {cluster.address}" in log  # the driver joined the two-node cluster

    summary = json.loads((out / "summary.json").read_text())
    kl = summary["game"]["kl_to_nash"]
    print(f"KL(pi*||pi) = {kl:.4f} (initial {summary['game']['kl_to_nash_initial']:.4f})")
    assert kl <= 0.01, summary["game"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["sync/bytes"] > 0  # weights moved learner rank 0 (head) -> engines (worker)

    state = cluster.run(0, [sys.executable, "-c", STATE, cluster.dashboard], timeout=120)
    assert state.returncode == 0, state.stderr[-3000:]
    info = json.loads(state.stdout.strip().splitlines()[-1])
    # the placement group is named <run_name>-<run id>-pg (a unique run id per run)
    pg = next(p for p in info["pgs"] if p["name"].startswith(f"{RUN}-") and p["name"].endswith("-pg"))
    assert pg["bundles"][:2] == [head, worker]  # rank 0 on the head, rank 1 on the worker
    assert pg["bundles"][2:] == [worker] * 2  # the engine of each pool
    learners = [a for a in info["actors"] if a["class"] == "LearnerWorker"]
    assert len(learners) == 2 and {a["node"] for a in learners} == {head, worker}
    rollouts = [a for a in info["actors"] if a["class"] == "RolloutWorker"]
    names = sorted(a["name"] for a in rollouts)
    assert len(names) == 2 and all(n.startswith(f"{RUN}") for n in names), names
    assert names[0].endswith("rollout-current-0") and names[1].endswith("rollout-extrapolated-0"), names
    assert {a["node"] for a in rollouts} == {worker}


def test_placement_fields_name_the_field() -> None:
    from nlhf.config import ConfigError, load_train_config
    from nlhf.pipeline import _check_custom_resources

    game = REPO / "configs" / "game-cpu.yaml"
    with pytest.raises(ConfigError, match=r"learner: resources: a list needs one dict per rank \(num_learners=2\)"):
        load_train_config(game, ["learner.num_learners=2", "learner.resources=[{a: 1}]"], check=False)
    with pytest.raises(ConfigError, match=r"rollout.resources.r: Input should be greater than 0"):
        load_train_config(game, ["rollout.resources={r: 0}"], check=False)
    cfg = load_train_config(game, ["learner.num_learners=2", "learner.resources=[{nlhf_rank0: 1}, {nlhf_rank1: 1}]",
                                   "rollout.resources={nlhf_rollout: 1}"], check=False)
    assert cfg.learner.rank_resources(0) == {"nlhf_rank0": 1.0} and cfg.learner.rank_resources(1) == {"nlhf_rank1": 1.0}
    have = {"CPU": 4.0, "nlhf_rank0": 1.0, "nlhf_rank1": 1.0, "nlhf_rollout": 2.0}
    _check_custom_resources(cfg, have)  # fits
    with pytest.raises(ConfigError, match=r"^rollout.resources: the bundles ask for 2 of custom resource "
                                          r"'nlhf_rollout' but the cluster has 1"):
        _check_custom_resources(cfg, {**have, "nlhf_rollout": 1.0})
    with pytest.raises(ConfigError, match=r"^learner.resources: .* 'nlhf_rank1' but the cluster has 0"):
        _check_custom_resources(cfg, {k: v for k, v in have.items() if k != "nlhf_rank1"})

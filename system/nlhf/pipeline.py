"""Driver-side handles of the roles: rollout pools, the judge client and weight sync.

The driver (``driver.py``) holds the Nash-MP iteration; this module holds the plumbing it
needs to talk to the actors: which actor gets which prompts, how weights travel, how judge
calls are counted and timed. Only the driver imports it.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nlhf.batch import Rollout
from nlhf.config import TrainConfig
from nlhf.data.prompts import Prompt
from nlhf.learner.group import rendezvous_address


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    """Split ``items`` into ``parts`` contiguous chunks of near-equal size (some may be empty)."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class RolloutPool:
    """``num_workers`` vLLM :class:`~nlhf.rollout.worker.RolloutWorker` actors holding one policy
    (``current`` = pi_k or ``extrapolated`` = pi_{k+1/2}); prompts are split across workers."""

    def __init__(self, name: str, cfg: TrainConfig, model_path: str, *, placement_group: PlacementGroup | None,
                 first_bundle: int, action_token_ids: list[int] | None, env: dict[str, str]) -> None:
        from nlhf.rollout.worker import RolloutWorker

        r = cfg.rollout
        self.name = name
        self.workers = []
        for i in range(r.num_workers):
            options: dict[str, Any] = {
                "num_cpus": r.num_cpus,
                "num_gpus": r.num_gpus * r.tensor_parallel_size,
                "runtime_env": {"env_vars": env},
                "name": f"{cfg.run_name}-rollout-{name}-{i}",
            }
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=first_bundle + i
                )
            actor_cls = ray.remote(RolloutWorker).options(**options)
            self.workers.append(
                actor_cls.remote(model_path, r, pool=name, seed=cfg.seed + 1000 * i + (0 if name == "current" else 500),
                                 dtype=cfg.policy.dtype, action_token_ids=action_token_ids, cache_dir=str(Path(cfg.cache_dir).resolve()))
            )

    def generate(self, prompts: list[Prompt], n: int, *, greedy: bool = False,
                 max_new_tokens: int | None = None, seed: int | None = None) -> list[list[Rollout]]:
        """``n`` responses per prompt, ``[prompt][sample]``, from all workers in parallel."""
        chunks = _split(prompts, len(self.workers))
        refs = [
            w.generate.remote([p.text for p in chunk], [p.token_ids for p in chunk], n, greedy=greedy,
                              max_new_tokens=max_new_tokens, seed=None if seed is None else seed + i)
            for i, (w, chunk) in enumerate(zip(self.workers, chunks)) if chunk
        ]
        return [group for part in ray.get(refs) for group in part]

    def stats(self) -> dict[str, float]:
        """Generated tokens and tokens/s since the last call, summed over the pool's workers."""
        parts = ray.get([w.stats.remote() for w in self.workers])
        tokens = sum(p.get("tokens", 0) for p in parts)
        seconds = max((p.get("seconds", 0.0) for p in parts), default=0.0)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}

    def shutdown(self) -> None:
        """Shut each engine down (frees /dev/shm), then kill the actors."""
        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
            pass
        for w in self.workers:
            ray.kill(w)


@dataclass
class JudgeClient:
    """Calls the judge service through its Serve handle, counting preference queries and time."""

    handle: Any
    queries: int = 0
    requests: int = 0
    seconds: float = 0.0
    _window: list[float] = field(default_factory=list)

    def prefer(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> np.ndarray:
        """P(a > b | prompt) for each pair, shape (B,); one query per pair."""
        t0 = time.perf_counter()
        probs = np.asarray(self.handle.prefer.remote(prompts, responses_a, responses_b).result(), dtype=np.float64)
        dt = time.perf_counter() - t0
        self.queries += len(prompts)
        self.requests += 1
        self.seconds += dt
        self._window.append(dt)
        return probs

    def take_latency(self) -> float:
        """Mean latency (s) of the requests since the last call."""
        window, self._window = self._window, []
        return float(np.mean(window)) if window else 0.0


class WeightSync:
    """Learner -> rollout pool weight transport, chosen by ``cfg.sync.backend``.

    ``object_store``: learner rank 0 packs the gathered (ZeRO-3 aware) state dict into
    safetensors bytes once; the ObjectRef goes to every worker of the pool, which reloads
    its engine in place. ``nccl``: learner rank 0 broadcasts bucketed flat tensors to the
    pool's workers over a NCCL group set up once per pool.
    """

    def __init__(self, cfg: TrainConfig, learners: Any, pools: dict[str, RolloutPool]) -> None:
        self.backend = cfg.sync.backend
        self.bucket_mb = cfg.sync.bucket_mb
        self.learners = learners
        self.pools = pools
        self.bytes = 0
        self.seconds = 0.0
        if self.backend == "nccl":
            for name, pool in pools.items():
                # the sender is learner rank 0: its TCP store lives on rank 0's node
                addr, port = rendezvous_address(getattr(learners, "placement_group", None))
                world = 1 + len(pool.workers) * cfg.rollout.tensor_parallel_size
                refs = [w.init_weight_group.remote(addr, port, 1 + i * cfg.rollout.tensor_parallel_size, world)
                        for i, w in enumerate(pool.workers)]
                learners.init_weight_sender(name, addr, port, world)
                ray.get(refs)

    def push(self, pool_name: str) -> dict[str, float]:
        """Send the learner's current weights to one pool; returns seconds and bytes."""
        pool = self.pools[pool_name]
        t0 = time.perf_counter()
        if self.backend == "object_store":
            ref = self.learners.state_dict_ref()
            results = ray.get([w.update_weights.remote(ref) for w in pool.workers])
        else:
            meta_ref, send_ref = self.learners.send_weights_nccl(pool_name, self.bucket_mb)
            results = ray.get([w.receive_weights.remote(meta_ref) for w in pool.workers])
            ray.get(send_ref)
        dt = time.perf_counter() - t0
        nbytes = float(max((r.get("bytes", 0) for r in results), default=0))
        self.bytes += nbytes
        self.seconds += dt
        return {"seconds": dt, "bytes": nbytes}


def make_placement_group(cfg: TrainConfig) -> PlacementGroup:
    """One placement group for learners then both rollout pools (bundle order: learners,
    current workers, extrapolated workers), resources from config. PACK: colocate when possible;
    ``learner.resources`` / ``rollout.resources`` (custom Ray resources the nodes declare) steer
    bundles to nodes.

    Raises:
        ConfigError: a custom resource that no node of the cluster declares (field named).
    """
    from ray.util.placement_group import placement_group

    r, lrn = cfg.rollout, cfg.learner
    bundles = [{"CPU": lrn.num_cpus, **({"GPU": lrn.num_gpus} if lrn.num_gpus else {}), **lrn.rank_resources(i)}
               for i in range(lrn.num_learners)]
    gpu = r.num_gpus * r.tensor_parallel_size
    bundles += [{"CPU": r.num_cpus, **({"GPU": gpu} if gpu else {}), **r.resources} for _ in range(2 * r.num_workers)]
    _check_custom_resources(cfg, ray.cluster_resources())
    pg = placement_group(bundles, strategy="PACK", name=f"{cfg.run_name}-pg")
    ray.get(pg.ready(), timeout=600)
    return pg


def _check_custom_resources(cfg: TrainConfig, have: dict[str, float]) -> None:
    """Each custom resource of ``learner.resources`` / ``rollout.resources`` exists on the cluster in
    the total amount the bundles ask for (else the placement group would wait forever)."""
    from nlhf.config import ConfigError

    r, lrn = cfg.rollout, cfg.learner
    asks: dict[str, tuple[str, float]] = {}
    for where, demand in [("learner.resources", lrn.rank_resources(i)) for i in range(lrn.num_learners)] + \
            [("rollout.resources", r.resources)] * (2 * r.num_workers):
        for name, amount in demand.items():
            prev = asks.get(name, (where, 0.0))[1]
            asks[name] = (where, prev + amount)
    for name, (where, amount) in asks.items():
        if have.get(name, 0.0) + 1e-9 < amount:
            raise ConfigError(f"{where}: the bundles ask for {amount:g} of custom resource {name!r} but the cluster "
                              f"has {have.get(name, 0.0):g} (declare it with ray start --resources)")

"""Driver-side handles of the roles: rollout pools, the judge client and weight sync.

The driver (``driver.py``) holds the algorithm; this module holds the plumbing it needs to
talk to the actors: which actor gets which prompts, how weights travel and are versioned, how
judge calls are deduplicated, counted, timed and retried, and how a restarted rollout worker
is brought back to the pool's weights. Only the driver side imports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nlhf import interrupts
from nlhf.algorithms.pairing import plan_queries
from nlhf.batch import Rollout
from nlhf.config import TrainConfig
from nlhf.data.prompts import Prompt
from nlhf.run_state import Counters

Note = Callable[[str], None]


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    """Split ``items`` into ``parts`` contiguous chunks of near-equal size (some may be empty)."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _actor_died(e: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(e, (RayActorError, ActorDiedError, ActorUnavailableError))


class RolloutPool:
    """``num_workers`` rollout actors holding one policy: ``current`` (pi_k) or ``extrapolated``
    (pi_{k+1/2}; for Nash-MD-PG the geometric-mixture sampler). Prompts are split across workers.

    Each worker is restarted by Ray when it dies (``fault_tolerance.rollout_restarts``). The pool
    remembers the weight version it must hold and the ObjectRef of those weights: before a
    worker's rollouts are used its version is checked, and a restarted worker (which comes back
    with the initial weights, version 0) is re-pushed the pool's weights and its interrupted
    generate retried. Sampling is seeded per response, so a retry draws the same responses.

    With ``shares=`` (``rollout.share_engines``) this pool takes turns on another pool's engines:
    each pool tags its weights with an engine version of its own (:meth:`engine_version`), so a
    pool whose engines hold the other pool's weights re-pushes its own before it generates (the
    same check that restores a restarted worker), and tokens are counted per pool.
    """

    def __init__(self, name: str, cfg: TrainConfig, model_path: str, *, placement_group: PlacementGroup | None,
                 first_bundle: int, action_token_ids: list[int] | None, env: dict[str, str], counters: Counters,
                 note: Note = print, reference_path: str | None = None, actor_prefix: str | None = None,
                 wait: bool = True, shares: "RolloutPool | None" = None) -> None:
        """``actor_prefix``: workers are named ``<actor_prefix>-rollout-<name>-<i>`` (as the Ray
        dashboard and state API show them); None leaves them unnamed. ``wait=False`` returns once
        the actors are created, so other actors can start meanwhile; call :meth:`wait_ready`
        before using the pool. ``shares``: use that pool's engines instead of starting any."""
        r = cfg.rollout
        self.name = name
        self.counters = counters
        self.note = note
        self.max_restarts = cfg.fault_tolerance.rollout_restarts
        self.timeout = cfg.fault_tolerance.actor_timeout_s
        self.expected_version = 0
        self._payload: Any = None  # ObjectRef or file path of the weights of expected_version (None: initial weights)
        # shared engines: 0 for the pool that owns them, 1 for the one that shares them; None: own engines
        self.slot: int | None = None
        self._tokens, self._seconds = 0, 0.0  # per-pool counts on shared engines (stats())
        if shares is not None:
            shares.slot, self.slot = 0, 1
            self.workers, self.weight_transfer, self.dtype = shares.workers, shares.weight_transfer, shares.dtype
            return
        mixture = name == "extrapolated" and cfg.algorithm.name == "nash-md-pg"
        # vLLM engines take sync.backend nccl; the mixture sampler (transformers) takes bytes
        self.weight_transfer = "nccl" if cfg.sync.backend == "nccl" and not mixture else None
        self.workers = []
        for i in range(r.num_workers):
            options: dict[str, Any] = {
                "num_cpus": r.num_cpus,
                "num_gpus": r.num_gpus * r.tensor_parallel_size,
                "runtime_env": {"env_vars": env},
                "max_restarts": self.max_restarts,
                "max_task_retries": 0,  # the pool re-syncs weights before retrying
            }
            if actor_prefix is not None:
                options["name"] = f"{actor_prefix}-rollout-{name}-{i}"
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=first_bundle + i
                )
            kwargs = dict(pool=name, seed=cfg.seed + 1000 * i, dtype=cfg.policy.dtype, action_token_ids=action_token_ids,
                          cache_dir=str(Path(cfg.cache_dir).resolve()))
            if mixture:
                from nlhf.rollout.mixture import MixtureWorker

                actor_cls = ray.remote(MixtureWorker).options(**options)
                self.workers.append(actor_cls.remote(model_path, r, reference_path=reference_path,
                                                     mixture=cfg.algorithm.mixture, **kwargs))
            else:
                from nlhf.rollout.worker import RolloutWorker

                actor_cls = ray.remote(RolloutWorker).options(**options)
                self.workers.append(actor_cls.remote(model_path, r, weight_transfer=self.weight_transfer, **kwargs))
        self.dtype: str | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every worker's engine is up (``fault_tolerance.actor_timeout_s``); sets
        :attr:`dtype` (the engines' resolved dtype)."""
        infos = interrupts.get([w.info.remote() for w in self.workers], timeout=self.timeout)
        self.dtype = infos[0]["dtype"]

    @property
    def shared(self) -> bool:
        """True when this pool takes turns with the other pool on the same engines."""
        return self.slot is not None

    def engine_version(self, version: int) -> int:
        """The version an engine records for this pool's weight ``version``: ``version`` itself on
        the pool's own engines; on shared engines ``2 * version + slot`` (0 for both pools'
        initial weights, which are the same theta_0), so the two pools' weights never share a tag."""
        return version if self.slot is None or version == 0 else 2 * version + self.slot

    # ------------------------------------------------------------------ sampling
    def generate(self, prompts: list[Prompt], seeds: list[list[int]], *, greedy: bool = False,
                 max_new_tokens: int | None = None) -> list[list[Rollout]]:
        """``len(seeds[p])`` responses per prompt, ``[prompt][sample]``, from all workers in parallel.

        Raises:
            ValueError: ``len(seeds) != len(prompts)``.
            RuntimeError: a worker stayed dead after ``rollout_restarts`` restarts.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seed lists for {len(prompts)} prompts")
        chunks = [c for c in zip(_split(prompts, len(self.workers)), _split(seeds, len(self.workers)))]

        def call(i: int) -> Any:
            ps, ss = chunks[i]
            return self.workers[i].generate.remote([p.text for p in ps], [p.token_ids for p in ps], ss,
                                                   greedy=greedy, max_new_tokens=max_new_tokens)

        busy = [i for i, (ps, _) in enumerate(chunks) if ps]
        for i in busy:
            self._ensure_version(i)
        refs = {i: call(i) for i in busy}
        out: list[list[Rollout]] = []
        for i in busy:
            out.extend(self._get_with_recovery(i, refs[i], call))
        if self.shared:  # the engines' counters hold this call alone: book it to this pool
            part = self._engine_stats()
            self._tokens, self._seconds = self._tokens + part["tokens"], self._seconds + part["seconds"]
        return out

    def _get_with_recovery(self, i: int, ref: Any, call: Callable[[int], Any]) -> Any:
        """``ray.get(ref)``; if worker i died, wait for its restart, restore its weights, call again."""
        for attempt in range(self.max_restarts + 1):
            try:
                return interrupts.get(ref, timeout=self.timeout)
            except Exception as e:  # noqa: BLE001 - only actor deaths are recovered
                if not _actor_died(e) or attempt == self.max_restarts:
                    raise
                self.counters.rollout_restarts += 1
                self.note(f"rollout worker {self.name}-{i} died ({type(e).__name__}); "
                          f"restart {attempt + 1}/{self.max_restarts}: re-syncing weights v{self.expected_version} and retrying")
                self._ensure_version(i, wait_for_restart=True)
                ref = call(i)
        raise AssertionError("unreachable")

    def _ensure_version(self, i: int, wait_for_restart: bool = False) -> None:
        """Make worker i hold ``expected_version`` (re-pushing the pool's weights if it does not)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                version = interrupts.get(self.workers[i].weight_version.remote(), timeout=self.timeout)
                break
            except Exception as e:  # noqa: BLE001
                if not (_actor_died(e) and wait_for_restart) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)  # the actor is restarting
        expected = self.engine_version(self.expected_version)
        if version == expected:
            return
        # on shared engines an odd/even tag of the other slot is the other pool's turn, not a fault
        turn = self.shared and version != 0 and version % 2 != self.slot
        if self._payload is None:
            why = (" (they came over NCCL, sync.backend: nccl, which keeps no copy; resume from the last checkpoint)"
                   if self.weight_transfer else "")
            raise RuntimeError(f"rollout worker {self.name}-{i} holds weight version {version}, the pool expects "
                               f"{expected}, and no weights are kept to restore it{why}")
        if not turn:
            self.note(f"rollout worker {self.name}-{i} holds weight version {version}, expected {expected}: re-pushing")
        interrupts.get(self.workers[i].update_weights.remote(self._payload, expected), timeout=self.timeout)

    # ------------------------------------------------------------------ weights
    @property
    def payload(self) -> Any:
        """The payload of the weights the pool holds (ObjectRef or weight file path; None: the
        initial weights, or weights that came over NCCL)."""
        return self._payload

    def load_weights(self, payload_ref: Any, version: int) -> list[dict]:
        """Push one weight payload (an ObjectRef of safetensors bytes, or a weight file path with
        ``sync.backend: file``) to every worker as ``version``; a worker that dies on the way is
        restarted and pushed again (and so is one found holding another version later)."""
        self._payload, self.expected_version = payload_ref, version
        tag = self.engine_version(version)

        def call(i: int) -> Any:
            return self.workers[i].update_weights.remote(payload_ref, tag)

        refs = {i: call(i) for i in range(len(self.workers))}
        return [self._get_with_recovery(i, refs[i], call) for i in refs]

    def mark_pushed(self, version: int) -> None:
        """Record a push that did not go through :meth:`load_weights` (vLLM's weight transfer): the
        pool now expects ``version`` and keeps no payload to re-push."""
        self._payload, self.expected_version = None, version

    def infos(self) -> list[dict]:
        """Every worker's ``info()`` (dtype, weight version, pid, peak RSS)."""
        return interrupts.get([w.info.remote() for w in self.workers], timeout=self.timeout)

    def versions(self) -> list[int]:
        """The weight version each worker holds now."""
        return interrupts.get([w.weight_version.remote() for w in self.workers], timeout=self.timeout)

    def stats(self) -> dict[str, float]:
        """Generated tokens and tokens/s since the last call, summed over the pool's workers (on
        shared engines: this pool's own calls)."""
        if self.shared:
            self._engine_stats()  # anything the engines did outside this pool's calls is nobody's
            tokens, seconds, self._tokens, self._seconds = self._tokens, self._seconds, 0, 0.0
            return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
        return self._engine_stats()

    def _engine_stats(self) -> dict[str, float]:
        parts = interrupts.get([w.stats.remote() for w in self.workers], timeout=self.timeout)
        tokens = sum(p.get("tokens", 0) for p in parts)
        seconds = max((p.get("seconds", 0.0) for p in parts), default=0.0)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}

    def shutdown(self, graceful: bool = True) -> None:
        """Shut each engine down (frees /dev/shm), then kill the actors (no restart); a pool that
        shares another pool's engines leaves them to their owner."""
        if self.slot == 1:
            return
        if graceful:
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
            except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
                pass
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


@dataclass
class JudgeClient:
    """Calls the judge service through its Serve handle: deduplicates comparisons into queries,
    counts them (training vs evaluation, in the run's :class:`Counters`), times and retries them.

    A request that times out (``fault_tolerance.judge_timeout_s``) or fails because a replica
    died is sent again (up to ``judge_retries`` times); Serve restarts replicas. The judge is
    deterministic, and counts are taken once, from the answer that arrived, so nothing is lost
    or double-counted.
    """

    handle: Any
    counters: Counters
    timeout_s: float = 600.0
    retries: int = 3
    note: Note = print
    seconds: float = 0.0
    _window: list[float] = field(default_factory=list)

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str], *,
                training: bool) -> tuple[list[float], int]:
        """P(a_t > b_t | prompt_t) for every comparison t; returns (probabilities, identical pairs).

        A comparison and its reverse are judged once; identical responses get 1/2 without a
        query. ``training`` decides which counter the distinct queries go to.
        """
        plan = plan_queries(prompts, responses_a, responses_b)
        idx = plan.queries
        answers = self._prefer([prompts[t] for t in idx], [responses_a[t] for t in idx], [responses_b[t] for t in idx])
        if training:
            self.counters.queries += len(idx)
            self.counters.comparisons += len(prompts)
            self.counters.identical += plan.num_identical
        else:
            self.counters.eval_queries += len(idx)
        return plan.assemble(answers), plan.num_identical

    def _prefer(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        if not prompts:
            return []
        from ray.serve.exceptions import RayServeException

        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            try:
                probs = self.handle.prefer.remote(prompts, a, b).result(timeout_s=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - judge faults (bad input) are not retried
                from nlhf.judge.base import JudgeError

                retryable = (_actor_died(e) or isinstance(e, (TimeoutError, RayServeException))
                             or type(e).__name__ in ("GetTimeoutError", "RequestCancelledError", "BackPressureError"))
                if isinstance(e, JudgeError) or not retryable or attempt == self.retries:
                    raise
                self.counters.judge_retries += 1
                self.note(f"judge request failed ({type(e).__name__}: {str(e)[:120]}); retry {attempt + 1}/{self.retries}")
                continue
            dt = time.perf_counter() - t0
            self.counters.judge_requests += 1
            self.seconds += dt
            self._window.append(dt)
            return [float(p) for p in probs]
        raise AssertionError("unreachable")

    def service_stats(self) -> dict[str, float]:
        """The service's own counters (:meth:`nlhf.judge.serve.JudgeService.stats`; ``busy_s``:
        seconds spent judging inside the replicas); {} if the service does not answer."""
        try:
            return dict(self.handle.stats.remote().result(timeout_s=30))
        except Exception:  # noqa: BLE001 - telemetry only
            return {}

    def take_latency(self) -> float:
        """Mean latency (s) of the requests since the last call."""
        window, self._window = self._window, []
        return float(np.mean(window)) if window else 0.0


class WeightSync:
    """Learner -> rollout pool weight transport, chosen by ``cfg.sync.backend``, with versions.

    ``object_store``: learner rank 0 packs the gathered (ZeRO-3 aware) state dict into
    safetensors bytes in the pool's engine dtype once; the ObjectRef goes to every worker of the
    pool, which reloads its engine in place. ``file``: the same payload written by learner rank 0
    as ``sync.dir/{pool}-v{version}.safetensors`` (:mod:`nlhf.sync.files`); the path goes to the
    workers, and the pool's previous file is deleted once all have loaded. ``nccl``: vLLM's
    weight-transfer API, one packed NCCL group per pool of vLLM engines (:mod:`nlhf.sync.weight_transfer`), opened here with the
    rendezvous on learner rank 0's node and reopened when :attr:`learners` is replaced (a new
    learner group after a restart); a mixture-sampler pool (``nash-md-pg``) keeps the object store.
    Every push carries the next weight version of that pool (``RunState.weight_versions``); the
    pool checks it before its rollouts are used.

    Raises:
        NcclUnavailableError (``nccl``): NCCL cannot run on learner rank 0 or an engine.
    """

    def __init__(self, cfg: TrainConfig, learners: Any, pools: dict[str, RolloutPool], counters: Counters,
                 versions: dict[str, int]) -> None:
        if cfg.sync.backend not in ("object_store", "file", "nccl"):
            raise ValueError(f"sync.backend must be 'object_store', 'file' or 'nccl', got {cfg.sync.backend!r}")
        self.cfg = cfg
        self.folder = Path(cfg.sync.dir) if cfg.sync.dir else Path(cfg.output_dir) / "sync"
        self.pools = pools
        self.counters = counters
        self.versions = versions
        self._groups: set[str] = set()  # pools with an open vLLM transfer group
        self._learners: Any = None
        self.learners = learners

    @property
    def learners(self) -> Any:
        """The learner group the weights come from; assigning one (re)opens the transfer groups."""
        return self._learners

    @learners.setter
    def learners(self, group: Any) -> None:
        from nlhf.learner.group import rendezvous_address
        from nlhf.sync.weight_transfer import PoolClient, rank_offsets

        for name in sorted(self._groups):  # the old trainer end is gone: the engines leave its group
            workers = self.pools[name].workers
            try:
                PoolClient(workers, [0] * len(workers), timeout_s=60).shutdown_weight_transfer_engine()
            except Exception:  # noqa: BLE001 - best effort: the group is rebuilt below either way
                pass
        self._groups.clear()
        self._learners = group
        for name, pool in self.pools.items():
            if pool.weight_transfer is None:
                continue
            addr, port = rendezvous_address(getattr(group, "placement_group", None), 0)  # learner rank 0's node
            offsets, world = rank_offsets([self.cfg.rollout.tensor_parallel_size] * len(pool.workers))
            group.init_weight_transfer(name, addr, port, world, pool.workers, offsets, pool.dtype)
            self._groups.add(name)

    def push(self, pool_name: str) -> dict[str, float]:
        """Send the learner's current weights to one pool as its next version; returns seconds and bytes."""
        pool = self.pools[pool_name]
        t0 = time.perf_counter()
        version = self.versions[pool_name] + 1
        if pool_name in self._groups:
            results = [self.learners.push_weights(pool_name, version)]
            pool.mark_pushed(version)
        else:
            results = pool.load_weights(self.payload(pool_name, version), version)
            if self.cfg.sync.backend == "file":
                from nlhf.sync.files import retire_weight_files

                retire_weight_files(self.folder, pool_name, keep=Path(pool.payload))
        self.versions[pool_name] = version
        dt = time.perf_counter() - t0
        nbytes = float(max((r.get("bytes", 0) for r in results), default=0))
        self.counters.sync_bytes += nbytes
        self.counters.sync_seconds += dt
        self.counters.sync_reload_seconds += float(max((r.get("seconds", 0.0) for r in results), default=0.0))
        return {"seconds": dt, "bytes": nbytes}

    def payload(self, pool_name: str, version: int) -> Any:
        """The learner's current weights for ``pool_name`` as the CPU transports carry them: the
        ObjectRef of safetensors bytes (``object_store``), or the path of the weight file written
        for ``version`` (``file``). Not for pools with a vLLM transfer group."""
        pool = self.pools[pool_name]
        if self.cfg.sync.backend == "file":
            from nlhf.sync.files import spare_weight_file_path, weight_file_path

            path = weight_file_path(self.folder, pool_name, version)
            spare = spare_weight_file_path(self.folder, pool_name)
            return self.learners.state_dict_file(pool.dtype, str(path), reuse=str(spare))["path"]
        return self.learners.state_dict_ref(pool.dtype)

    def remove_files(self) -> None:
        """Delete the weight files (``file`` backend) and their folder when it is left empty."""
        if self.cfg.sync.backend != "file" or not self.folder.is_dir():
            return
        from nlhf.sync.files import remove_stale_weight_files

        for name in self.pools:
            remove_stale_weight_files(self.folder, name)
        try:
            self.folder.rmdir()
        except OSError:  # someone else's files are there
            pass


def make_placement_group(cfg: TrainConfig, name: str) -> PlacementGroup:
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
    bundles += [{"CPU": r.num_cpus, **({"GPU": gpu} if gpu else {}), **r.resources} for _ in range(r.num_engines)]
    _check_custom_resources(cfg, ray.cluster_resources())
    pg = placement_group(bundles, strategy="PACK", name=name)
    ray.get(pg.ready(), timeout=600)
    return pg


def _check_custom_resources(cfg: TrainConfig, have: dict[str, float]) -> None:
    """Each custom resource of ``learner.resources`` / ``rollout.resources`` exists on the cluster in
    the total amount the bundles ask for (else the placement group would wait forever)."""
    from nlhf.config import ConfigError

    r, lrn = cfg.rollout, cfg.learner
    asks: dict[str, tuple[str, float]] = {}
    for where, demand in [("learner.resources", lrn.rank_resources(i)) for i in range(lrn.num_learners)] + \
            [("rollout.resources", r.resources)] * r.num_engines:
        for name, amount in demand.items():
            prev = asks.get(name, (where, 0.0))[1]
            asks[name] = (where, prev + amount)
    for name, (where, amount) in asks.items():
        if have.get(name, 0.0) + 1e-9 < amount:
            raise ConfigError(f"{where}: the bundles ask for {amount:g} of custom resource {name!r} but the cluster "
                              f"has {have.get(name, 0.0):g} (declare it with ray start --resources)")

"""The learner group: ``cfg.learner.num_learners`` Ray actors of :class:`LearnerWorker` forming one
torch.distributed / DeepSpeed data-parallel group.

Every call goes to all ranks with the **same** StepBatch (put in the object store once); each
rank scores and back-propagates its own shard (rollouts r, r+W, ...; see
:mod:`nlhf.learner.worker`), and the group returns rank 0's result. The rendezvous is on
rank 0's node (:func:`rendezvous_address`), so the ranks may live on different nodes (the
placement group's bundles 0..num_learners-1; ``learner.resources`` steers them).
"""

from __future__ import annotations

import socket
from typing import Any, Literal

from nlhf.batch import Rollout, StepBatch
from nlhf.config import TrainConfig
from nlhf.learner.worker import LearnerWorker


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _node_address() -> tuple[str, int]:
    """Runs on a node of the cluster: its Ray node IP and a TCP port free there on every interface."""
    import ray

    return ray.util.get_node_ip_address(), free_port("0.0.0.0")


def rendezvous_address(placement_group: Any = None, bundle_index: int = 0) -> tuple[str, int]:
    """(address, port) for a process group whose rank 0 runs in bundle ``bundle_index`` of
    ``placement_group``: a zero-CPU task in that bundle reports its node's IP and a port free on
    that node, so ranks on other nodes can reach rank 0's TCP store.

    Without a placement group: ``127.0.0.1`` and a port free here (all ranks on this node).
    """
    if placement_group is None:
        return "127.0.0.1", free_port()
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(placement_group=placement_group,
                                                placement_group_bundle_index=bundle_index)
    addr, port = ray.get(ray.remote(num_cpus=0)(_node_address).options(scheduling_strategy=strategy).remote())
    return str(addr), int(port)


class LearnerGroup:
    """Start ``cfg.learner.num_learners`` learner actors and drive them in lock-step.

    Args:
        cfg: the run's config; ``cfg.learner.num_cpus``/``num_gpus`` are each actor's resources.
        policy_path, reference_path: HF folders of theta_0 and pi_ref (readable by every actor).
        action_token_ids: game mode action tokens (see :class:`LearnerWorker`).
        placement_group: when given, rank r is placed in bundle r of it.
        env: extra environment variables for the actors (``DS_ACCELERATOR=cpu`` is added on CPU).

    The constructor returns once every rank has joined the process group and built its engine.
    Raises whatever an actor raised during construction (``ray.exceptions.RayActorError``).
    """

    def __init__(self, cfg: TrainConfig, policy_path: str, reference_path: str,
                 action_token_ids: list[int] | None = None, placement_group: Any = None,
                 env: dict[str, str] | None = None, wait: bool = True) -> None:
        """``wait=False`` returns once the actors are created (other actors can start
        meanwhile); call :meth:`wait_ready` before using the group."""
        import ray

        lc = cfg.learner
        self.cfg = cfg
        self.world_size = lc.num_learners
        self.placement_group = placement_group
        self.master_addr, self.master_port = rendezvous_address(placement_group)  # on rank 0's node
        env_vars = dict(env or {})
        if lc.num_gpus == 0:
            env_vars["DS_ACCELERATOR"] = "cpu"
        remote_cls = ray.remote(LearnerWorker)
        self.workers = []
        for rank in range(self.world_size):
            options: dict[str, Any] = {"num_cpus": lc.num_cpus, "num_gpus": lc.num_gpus,
                                       "runtime_env": {"env_vars": env_vars}}
            if placement_group is not None:
                from ray.util.scheduling_strategies import (
                    PlacementGroupSchedulingStrategy,
                )

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=rank)
            self.workers.append(remote_cls.options(**options).remote(
                cfg, policy_path, reference_path, rank=rank, world_size=self.world_size,
                master_addr=self.master_addr, master_port=self.master_port, action_token_ids=action_token_ids))
        self._closed = False
        self.precision: str | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every rank is built (model, reference, DeepSpeed engine); sets
        :attr:`precision` (``learner.precision`` with ``auto`` resolved). On failure the group is
        shut down and the error re-raised."""
        try:
            self._wait([w.__ray_ready__.remote() for w in self.workers])
            self.precision = self._all("precision")[0]
        except BaseException:
            self.shutdown(graceful=False)
            raise

    @staticmethod
    def _wait(refs: list[Any]) -> list[Any]:
        """Results of ``refs`` in order; raises as soon as any rank fails (its peers may be stuck
        in a collective waiting for it, so waiting for all first could hang)."""
        import ray

        from nlhf import interrupts

        pending = list(refs)
        while pending:
            done, pending = interrupts.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs)

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every rank concurrently and wait for all; returns the per-rank results."""
        return self._wait([getattr(w, method).remote(*args) for w in self.workers])

    def _batch_call(self, method: str, batch: StepBatch) -> dict[str, float]:
        import ray

        ref = ray.put(batch)  # one copy in the object store, shared by all ranks
        return self._all(method, ref)[0]

    def half_step(self, batch: StepBatch) -> dict[str, float]:
        """:meth:`LearnerWorker.half_step` on all ranks (same batch); rank 0's metrics (nash-mp, egpo)."""
        return self._batch_call("half_step", batch)

    def full_step(self, batch: StepBatch) -> dict[str, float]:
        """:meth:`LearnerWorker.full_step` on all ranks (same batch); rank 0's metrics (nash-mp, egpo)."""
        return self._batch_call("full_step", batch)

    def step(self, batch: StepBatch) -> dict[str, float]:
        """:meth:`LearnerWorker.step` on all ranks (same batch); rank 0's metrics (online-ipo, nash-md-pg)."""
        return self._batch_call("step", batch)

    def state_dict_bytes(self, dtype: str) -> bytes:
        """Rank 0's gathered policy weights as safetensors bytes cast to the engines' ``dtype``
        (``"float32"``/``"bfloat16"``), fetched to the caller."""
        return self._all("state_dict_bytes", dtype)[0]

    def state_dict_ref(self, dtype: str) -> Any:
        """Like :meth:`state_dict_bytes` but returns the ObjectRef of rank 0's bytes (not fetched),
        once every rank has finished the gather; hand it to rollout workers directly."""
        import ray

        from nlhf import interrupts

        refs = [w.state_dict_bytes.remote(dtype) for w in self.workers]
        pending = list(refs)
        while pending:  # wait for all without fetching rank 0's bytes; raise on the first failure
            done, pending = interrupts.wait(pending, num_returns=1, fetch_local=False)
            if done[0] is not refs[0]:
                ray.get(done)
        return refs[0]

    def state_dict_file(self, dtype: str, path: str, reuse: str | None = None) -> dict:
        """Rank 0 writes the gathered policy weights, cast to the engines' ``dtype``, as the
        safetensors file ``path`` on its node (``sync.backend: file``), overwriting the spare
        file ``reuse`` in place where it exists; returns ``{"path", "bytes"}``. Collective."""
        return self._all("state_dict_file", dtype, str(path), reuse)[0]

    def save_checkpoint(self, path: str) -> None:
        """HF checkpoint of the policy at ``path`` (written by rank 0; see :meth:`LearnerWorker.save_checkpoint`)."""
        self._all("save_checkpoint", path)

    def save_trainer_state(self, path: str) -> None:
        """Every rank writes its trainer state under ``path/rank{r}/`` (:meth:`LearnerWorker.save_trainer_state`)."""
        self._all("save_trainer_state", path)

    def load_trainer_state(self, path: str) -> None:
        """Every rank loads its trainer state from ``path/rank{r}/`` (:meth:`LearnerWorker.load_trainer_state`)."""
        self._all("load_trainer_state", path)

    def sequence_logprobs(self, rollouts: list[Rollout],
                          which: Literal["policy", "reference", "anchor"] = "policy") -> list[float]:
        """Rank 0's :meth:`LearnerWorker.sequence_logprobs` (all ranks run it: ZeRO-3 is collective)."""
        import ray

        return self._all("sequence_logprobs", ray.put(rollouts), which)[0]

    def token_logprobs(self, rollouts: list[Rollout],
                       which: Literal["policy", "reference", "anchor"] = "policy") -> list[list[float]]:
        """Rank 0's :meth:`LearnerWorker.token_logprobs` (all ranks run it: ZeRO-3 is collective)."""
        import ray

        return self._all("token_logprobs", ray.put(rollouts), which)[0]

    def init_weight_transfer(self, name: str, master_address: str, master_port: int, world_size: int,
                             workers: list[Any], rank_offsets: list[int], dtype: str) -> None:
        """:meth:`LearnerWorker.init_weight_transfer` on all ranks: open vLLM's ``nccl`` transfer group
        ``name`` to a rollout pool's ``workers`` (rank 0 drives them; returns once they joined)."""
        self._all("init_weight_transfer", name, master_address, master_port, world_size, workers, rank_offsets, dtype)

    def push_weights(self, name: str, version: int) -> dict:
        """:meth:`LearnerWorker.push_weights` on all ranks; rank 0's ``{"seconds", "bytes", "tensors", "version"}``."""
        return self._all("push_weights", name, version)[0]

    def close_weight_transfer(self, name: str) -> None:
        """:meth:`LearnerWorker.close_weight_transfer` on all ranks."""
        self._all("close_weight_transfer", name)

    def kl_to_reference(self, rollouts: list[Rollout]) -> list[float]:
        """Rank 0's :meth:`LearnerWorker.kl_to_reference` (exact per-sequence KL to pi_ref, nats)."""
        import ray

        return self._all("kl_to_reference", ray.put(rollouts))[0]

    def stats(self) -> list[dict[str, float]]:
        """Every rank's :meth:`LearnerWorker.stats` (peak RSS, weight-export seconds)."""
        return self._all("stats")

    def dead_rank(self, error: BaseException) -> int | None:
        """The rank of the learner actor whose death ``error`` reports, or None when ``error`` is
        not a learner actor's death (so other failures are not mistaken for one)."""
        from ray.exceptions import RayActorError

        if not isinstance(error, RayActorError):
            return None
        dead = getattr(error, "actor_id", None)
        for rank, w in enumerate(self.workers):
            if dead is not None and w._actor_id.hex() == dead:
                return rank
        import ray

        for rank, w in enumerate(self.workers):  # the error did not say which: ask each rank
            try:
                ray.get(w.__ray_ready__.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                return rank
        return None

    def shutdown(self, graceful: bool = True) -> None:
        """Destroy the process groups (when ``graceful``; best effort, 60 s) and kill the actors (idempotent)."""
        if self._closed:
            return
        self._closed = True
        import ray

        try:
            if graceful:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001 - best effort: a dead or stuck rank must not block teardown
            pass
        finally:
            for w in self.workers:
                ray.kill(w)

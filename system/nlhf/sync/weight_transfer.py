"""GPU weight transport through vLLM's weight-transfer API (``vllm/distributed/weight_transfer/``).

Learner rank 0 and the engine ranks of one rollout pool form an NCCL group owned by vLLM's
``nccl`` backend (packed: tensors are concatenated into uint8 buffers of ``sync.bucket_mb``
MiB, double-buffered). The pieces nlhf adds around vLLM's engines:

- :class:`LearnerWeightSource`: a vLLM ``WeightSource`` over the DeepSpeed policy module. It
  yields HF-named tensors on the learner's device, floating-point ones cast to the engines'
  dtype, and under ZeRO-3 gathers the shards one bucket of parameters at a time
  (``deepspeed.zero.GatheredParameters``; collective, so every learner rank iterates it).
- :class:`PoolClient`: the trainer-side control plane (vLLM's ``VLLMWeightSyncClient``
  protocol) over a pool's rollout workers. vLLM's own Ray client sends one init info to every
  actor (``rank_offset`` 1); this one gives engine ``i`` its own offset
  (:func:`rank_offsets`), so a pool of several engines (each with TP ranks) shares one group.
  It also carries the weight version that ``finish_weight_update`` sets on every engine.
- :class:`WeightTransferSender`: ``WeightTransferTrainerFactory.trainer_init`` with
  ``NCCLTrainerInitInfo(packed=True)`` on every learner rank (rank 0 sends) and one
  ``send_weights`` per push.
- :func:`require_nccl` / :func:`check_communicator`: vLLM's ``PyNcclCommunicator`` disables
  itself without a word when the NCCL library cannot be loaded (its ``broadcast`` then returns
  without sending); both ends check before the rendezvous and after it, and raise
  :class:`NcclUnavailableError`.

vLLM is imported lazily: this module imports wherever vLLM is installed (also its CPU build, where
the tests drive everything but the NCCL data plane).
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch

MiB = 1024 * 1024


class NcclUnavailableError(RuntimeError):
    """``sync.backend: nccl`` was asked for where NCCL cannot run (no CUDA, no NCCL library,
    ``VLLM_DISABLE_PYNCCL``), or a communicator came back disabled."""


def require_nccl(where: str) -> str:
    """Check, before any rendezvous, that this process can open a vLLM NCCL communicator.

    Args:
        where: who asks (e.g. ``"learner rank 0"``), for the message.

    Returns:
        The NCCL version string.

    Raises:
        NcclUnavailableError: no CUDA device, ``VLLM_DISABLE_PYNCCL`` set, or vLLM's
            ``NCCLLibrary`` cannot load the library (the case PyNcclCommunicator hides).
    """
    head = f"sync.backend 'nccl': {where}"
    if not torch.cuda.is_available():
        raise NcclUnavailableError(f"{head} has no CUDA device (torch {torch.__version__}, "
                                   f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); "
                                   "use sync.backend: object_store on CPU")
    if os.environ.get("VLLM_DISABLE_PYNCCL", "0").lower() in ("1", "true"):
        raise NcclUnavailableError(f"{head}: VLLM_DISABLE_PYNCCL is set, so vLLM's NCCL communicator would "
                                   "silently send nothing")
    from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

    try:
        lib = NCCLLibrary(None)
    except Exception as e:  # noqa: BLE001 - any load failure is the same missing library
        raise NcclUnavailableError(f"{head}: the NCCL library cannot be loaded ({type(e).__name__}: {e}); "
                                   "install nvidia-nccl or set VLLM_NCCL_SO_PATH") from e
    return str(lib.ncclGetVersion())


def check_communicator(comm: Any, where: str) -> None:
    """Raise unless ``comm`` (a vLLM ``PyNcclCommunicator``) is live.

    PyNcclCommunicator sets ``disabled`` (and ``available = False``) instead of raising when the
    group has one rank or NCCL is missing; every later ``broadcast`` is then a silent no-op.

    Raises:
        NcclUnavailableError: ``comm`` is None or disabled.
    """
    if comm is None:
        raise NcclUnavailableError(f"sync.backend 'nccl': {where} has no weight-transfer communicator "
                                   "(init_weight_transfer_engine did not run)")
    if getattr(comm, "disabled", True) or not getattr(comm, "available", False):
        raise NcclUnavailableError(
            f"sync.backend 'nccl': {where}: vLLM's PyNcclCommunicator disabled itself (world size "
            f"{getattr(comm, 'world_size', '?')}, NCCL library missing or VLLM_DISABLE_PYNCCL); "
            "its broadcasts would send nothing")


def rank_offsets(ranks_per_engine: Sequence[int]) -> tuple[list[int], int]:
    """Place a pool's engines in one transfer group behind the trainer's rank 0.

    Args:
        ranks_per_engine: for each engine of the pool, its number of worker ranks
            (tensor parallel x pipeline parallel size).

    Returns:
        ``(offsets, world_size)``: engine ``i``'s worker rank ``r`` joins as ``offsets[i] + r``;
        ``world_size`` = 1 + all worker ranks.

    Raises:
        ValueError: no engines, or an engine with fewer than 1 rank.
    """
    if not ranks_per_engine:
        raise ValueError("a weight-transfer group needs at least one engine")
    offsets, nxt = [], 1
    for i, n in enumerate(ranks_per_engine):
        if int(n) < 1:
            raise ValueError(f"engine {i} has {n} ranks; each engine needs >= 1 (rollout.tensor_parallel_size)")
        offsets.append(nxt)
        nxt += int(n)
    return offsets, nxt


def plan_gather_buckets(sizes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive index groups of tensors whose sizes (bytes) add up to at most ``bucket_bytes``;
    a tensor larger than that is a group of its own. Order is kept.

    Raises:
        ValueError: ``bucket_bytes <= 0``.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes} (sync.bucket_mb)")
    groups: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if cur and used + n > bucket_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def _gathered_parameters(params: list[torch.nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class LearnerWeightSource:
    """The policy's weights as a vLLM ``WeightSource`` (``metadata()`` + re-iterable pairs).

    Entries are the module's parameters (tied ones once, as ``named_parameters`` gives them:
    the engine ties ``lm_head`` itself) and its persistent buffers, with HF names, ordered by
    descending wire element size (stable: parameters keep their order), see ``__init__``.

    Args:
        module: the policy (``deepspeed_engine.module``); under ZeRO-3 its parameters are shards
            with a ``ds_shape``.
        dtype: the engines' dtype; floating-point tensors are sent in it, others as they are.
        device: where yielded tensors live (the learner's CUDA device, the communicator's).
        zero3: gather ZeRO-3 shards (collective over the learner ranks).
        bucket_bytes: the most bytes (in the wire dtype) gathered at once; one larger tensor is
            gathered alone.
        sender: False on learner ranks > 0: they only take part in the gathers and yield the
            gathered tensors uncopied (vLLM iterates and discards them there).
        gather: context factory ``gather(params)`` (default ``deepspeed.zero.GatheredParameters``
            with ``modifier_rank=None``; tests inject their own).

    Each yielded tensor is a copy made while its bucket is gathered, so it stays valid after
    the shards are released. Extra memory: one gathered bucket plus vLLM's packed buffers.
    """

    def __init__(self, module: torch.nn.Module, *, dtype: torch.dtype, device: torch.device | str,
                 zero3: bool = False, bucket_bytes: int = 256 * MiB, sender: bool = True,
                 gather: Callable[[list[torch.nn.Parameter]], Any] | None = None) -> None:
        self.module, self.dtype, self.device = module, dtype, torch.device(device)
        self.zero3, self.sender = zero3, sender
        self.gather = gather or _gathered_parameters
        keys = set(module.state_dict().keys())
        entries: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
        entries += [(n, b) for n, b in module.named_buffers() if n in keys]
        # Widest wire element first (stable): vLLM's unpack_tensor views each byte range of a packed
        # chunk as its dtype, which fails unless the range starts at a multiple of the element
        # size (e.g. an int64 buffer after an odd number of bf16 values). In descending element
        # size every offset inside a chunk is aligned; the parameters keep their order.
        self._entries = sorted(entries, key=lambda e: -self._itemsize(e[1]))
        self._meta = None
        self.buckets = plan_gather_buckets([self._nbytes(i) for i in range(len(self._entries))], bucket_bytes)

    def _shape(self, t: torch.Tensor) -> tuple[int, ...]:
        shape = getattr(t, "ds_shape", None) if self.zero3 else None
        return tuple(shape) if shape is not None else tuple(t.shape)

    def _wire_dtype(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() else t.dtype

    def _itemsize(self, t: torch.Tensor) -> int:
        return torch.empty((), dtype=self._wire_dtype(t)).element_size()

    def _nbytes(self, i: int) -> int:
        t = self._entries[i][1]
        n = 1
        for s in self._shape(t):
            n *= s
        return n * torch.empty((), dtype=self._wire_dtype(t)).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes one push sends (all entries in their wire dtype)."""
        return sum(self._nbytes(i) for i in range(len(self._entries)))

    def metadata(self) -> list:
        """``vllm ParamMeta(name, wire dtype, full shape)`` of every entry, in iteration order
        (read from ``ds_shape`` under ZeRO-3: nothing is gathered)."""
        if self._meta is None:
            from vllm.distributed.weight_transfer.base import ParamMeta

            self._meta = [ParamMeta(n, self._wire_dtype(t), self._shape(t)) for n, t in self._entries]
        return self._meta

    def held_names(self) -> None:
        """Every rank holds (a shard of) every entry: None, vLLM's 'all of them'."""
        return None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """One pass: ``(name, tensor)`` of full shape, wire dtype, on ``device``, bucket by bucket."""
        for bucket in self.buckets:
            entries = [self._entries[i] for i in bucket]
            shapes = [self._shape(t) for _, t in entries]  # before the gather: ds_shape of the shards
            shards = [t for _, t in entries if self.zero3 and hasattr(t, "ds_id")]
            ctx = self.gather(shards) if shards else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                for (name, t), shape in zip(entries, shapes):
                    t = t.detach()
                    if not self.sender:
                        yield name, t
                        continue
                    if tuple(t.shape) != shape:
                        raise RuntimeError(f"{name}: shape {tuple(t.shape)} inside the gather, declared {shape} "
                                           "(a ZeRO-3 shard that was not gathered?)")
                    yield name, t.to(device=self.device, dtype=self._wire_dtype(t), copy=True).contiguous()


def _is_ray_actor(worker: Any, method: str) -> bool:
    return hasattr(getattr(worker, method, None), "remote")


class PoolClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over the rollout workers of one pool.

    Args:
        workers: Ray actor handles of :class:`nlhf.rollout.worker.RolloutWorker` (or plain
            objects with the same methods: called in threads, for tests and in-process use).
        offsets: engine ``i``'s ``rank_offset`` in the transfer group (:func:`rank_offsets`).
        timeout_s: how long to wait for the workers on each call (None: forever).

    Set :attr:`version` before each ``send_weights``: vLLM's trainer engine calls
    ``finish_weight_update()`` without a version, and every push must set one.

    Raises:
        ValueError: a different number of workers and offsets.
    """

    def __init__(self, workers: Sequence[Any], offsets: Sequence[int], timeout_s: float | None = None) -> None:
        if len(workers) != len(offsets) or not workers:
            raise ValueError(f"{len(workers)} rollout workers for {len(offsets)} rank offsets")
        self.workers, self.offsets, self.timeout_s = list(workers), [int(o) for o in offsets], timeout_s
        self.version: int | None = None

    def _call(self, method: str, args_per_worker: list[tuple]) -> list[Any]:
        """Call ``method`` on every worker concurrently; results in worker order; the first error raises."""
        if all(_is_ray_actor(w, method) for w in self.workers):
            import ray

            refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, args_per_worker)]
            return ray.get(refs, timeout=self.timeout_s)
        with ThreadPoolExecutor(max_workers=len(self.workers)) as ex:
            futures = [ex.submit(getattr(w, method), *a) for w, a in zip(self.workers, args_per_worker)]
            return [f.result(timeout=self.timeout_s) for f in futures]

    def preflight(self) -> list[dict]:
        """Every worker checks its engine can join (CUDA, NCCL library, weight_transfer_config)."""
        return self._call("check_weight_transfer", [()] * len(self.workers))

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Join the group: worker ``i`` gets ``init_info`` with ``rank_offset = offsets[i]``
        (blocks until the trainer endpoint opens: vLLM runs this on a side thread)."""
        self._call("init_weight_transfer_engine", [({**init_info, "rank_offset": o},) for o in self.offsets])

    def start_weight_update(self) -> None:
        self._call("start_weight_update", [()] * len(self.workers))

    def update_weights(self, update_info: dict | list[dict]) -> None:
        """Receive one packed broadcast (concurrently with the trainer's send)."""
        self._call("update_weights", [(update_info,)] * len(self.workers))

    def finish_weight_update(self, weight_version: str | int | None = None) -> None:
        """Finish the update on every engine and set its weight version (``weight_version`` or
        :attr:`version`).

        Raises:
            RuntimeError: no version given and :attr:`version` unset.
        """
        v = weight_version if weight_version is not None else self.version
        if v is None:
            raise RuntimeError("PoolClient.finish_weight_update: no weight version (set client.version before a push)")
        self._call("finish_weight_update", [(int(v),)] * len(self.workers))

    def shutdown_weight_transfer_engine(self) -> None:
        self._call("shutdown_weight_transfer_engine", [()] * len(self.workers))


class _NoClient:
    """The client of learner ranks > 0: vLLM never calls it there; any call is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"learner rank > 0 must not drive the rollout engines ({name})")


class WeightTransferSender:
    """One learner rank's end of a pool's vLLM ``nccl`` weight-transfer group (packed).

    Construct on every learner rank concurrently (ZeRO-3 gathers are collective); rank 0 opens the
    group at ``master_address:master_port`` (a port free on rank 0's node) and, through
    ``client``, makes the pool's engines join it.

    Args:
        module: the policy module (see :class:`LearnerWeightSource`).
        rank: this learner's rank (0 sends).
        master_address, master_port: rendezvous hosted by rank 0.
        world_size: 1 + the pool's engine ranks (:func:`rank_offsets`).
        client: a :class:`PoolClient` (rank 0; ignored on other ranks).
        dtype, device, zero3, bucket_bytes: see :class:`LearnerWeightSource`; ``bucket_bytes``
            is also vLLM's ``packed_buffer_size_bytes``.
        num_buffers: vLLM's ``packed_num_buffers``.

    Raises:
        NcclUnavailableError: rank 0 or an engine cannot run NCCL (checked before the rendezvous),
            or a communicator came back disabled.
    """

    def __init__(self, module: torch.nn.Module, *, rank: int, master_address: str, master_port: int,
                 world_size: int, client: PoolClient | None, dtype: torch.dtype, device: torch.device | str,
                 zero3: bool = False, bucket_bytes: int = 256 * MiB, num_buffers: int = 2) -> None:
        self.rank, self.client = rank, client
        if rank == 0:
            if client is None:
                raise ValueError("learner rank 0 needs a PoolClient to drive the rollout engines")
            require_nccl("learner rank 0")
            client.preflight()
        self.source = LearnerWeightSource(module, dtype=dtype, device=device, zero3=zero3,
                                          bucket_bytes=bucket_bytes, sender=rank == 0)
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = NCCLTrainerInitInfo(master_address=master_address, master_port=int(master_port),
                                   world_size=int(world_size), packed=True, packed_buffer_size_bytes=int(bucket_bytes),
                                   packed_num_buffers=int(num_buffers), rank=rank)
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=client if rank == 0 else _NoClient(), source=self.source)
        if rank == 0:
            check_communicator(self.engine.model_update_group, "learner rank 0")

    def push(self, version: int) -> dict:
        """Send the current weights as ``version`` (collective over the learner ranks).

        Returns:
            rank 0: ``{"seconds", "bytes", "tensors", "version"}``; other ranks ``{}``.
        """
        t0 = time.perf_counter()
        if self.rank == 0:
            self.client.version = int(version)
        self.engine.send_weights()
        if self.rank != 0:
            return {}
        return {"seconds": time.perf_counter() - t0, "bytes": self.source.nbytes,
                "tensors": len(self.source.metadata()), "version": int(version)}

    def close(self) -> None:
        """Destroy the communicator; rank 0 also releases the engines' ends (best effort)."""
        self.engine.shutdown()
        if self.rank == 0 and self.client is not None:
            with contextlib.suppress(Exception):
                self.client.shutdown_weight_transfer_engine()

"""GPU weight transport: the learner's rank 0 broadcasts its state dict to every rollout
engine rank, one flat bucket per collective (never one call per tensor).

Group layout (one group per rollout pool): rank 0 is the sender (learner rank 0), ranks
``rank_offset + tp_rank`` are the tensor-parallel ranks of the rollout engines, ``world_size``
is 1 + the number of engine ranks. The group is built without touching torch.distributed's
global state (vLLM's ``StatelessProcessGroup``), so it lives beside the learner's DeepSpeed
group and the engine's own tensor-parallel group.

Protocol of one sync (:func:`send_state_dict` / :func:`receive_state_dict`):
    1. rank 0 broadcasts the bucket plan (a list of :class:`~nlhf.sync.buckets.BucketMeta`);
    2. for each bucket, rank 0 fills a flat tensor and broadcasts it; receivers split it into
       named views and hand them to the engine's weight loader.

Transports (``backend``): ``"nccl"`` (PyNccl on CUDA, the real path), ``"gloo"`` (a private
torch gloo group on CPU; used by the tests to prove the protocol without a GPU). CUDA-only
pieces are imported lazily, so this module imports on CPU.

Group creation blocks until every rank has joined: the driver must start the sender's
constructor and the workers' ``init_weight_group`` concurrently (e.g. all as Ray calls, then
``ray.get`` them together), and likewise ``send`` with ``receive_weights``.
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Iterator, Mapping, Protocol

import torch

from nlhf.sync.buckets import BucketMeta, dtype_from_name, fill_bucket, plan_buckets, split_bucket

BACKENDS = ("nccl", "gloo")


class Channel(Protocol):
    """What the protocol needs from a transport: an in-place tensor broadcast and an object broadcast."""

    rank: int
    world_size: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite ``tensor`` on every rank with ``src``'s ``tensor`` (same shape/dtype everywhere)."""

    def broadcast_obj(self, obj: Any, src: int) -> Any:
        """Return ``src``'s ``obj`` on every rank (small picklable control data)."""

    def close(self) -> None:
        """Release the communicator."""


class NcclChannel:
    """PyNccl communicator over a vLLM ``StatelessProcessGroup`` (CUDA device ``device``)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device | int | str):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        self.group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.comm = PyNcclCommunicator(self.group, device=self.device)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream(self.device))

    def broadcast_obj(self, obj: Any, src: int) -> Any:
        return self.group.broadcast_obj(obj, src=src)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self.comm = None
        self.group = None


class GlooChannel:
    """A private torch gloo process group over its own TCP store (CPU tensors, no global state).

    Rank 0 hosts the store at ``host:port``.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: Any = None,
                 timeout_s: float = 300.0):
        from datetime import timedelta

        from torch.distributed import PrefixStore, TCPStore
        from torch.distributed.distributed_c10d import ProcessGroupGloo

        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        timeout = timedelta(seconds=timeout_s)
        self.store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        self.pg = ProcessGroupGloo(PrefixStore("nlhf-weight-sync", self.store), rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.pg.broadcast(tensor, src).wait()

    def broadcast_obj(self, obj: Any, src: int) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        data = pickle.dumps(obj) if self.rank == src else b""
        size[0] = len(data)
        self.broadcast(size, src)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src else torch.empty(int(size[0]), dtype=torch.uint8)
        self.broadcast(buf, src)
        return obj if self.rank == src else pickle.loads(buf.numpy().tobytes())

    def close(self) -> None:
        self.pg = None
        self.store = None


def open_channel(backend: str, host: str, port: int, rank: int, world_size: int,
                 device: torch.device | int | str | None = None) -> Channel:
    """Join the weight-sync group as ``rank`` of ``world_size`` (blocks until all ranks joined).

    Raises:
        ValueError: unknown backend, or rank outside ``[0, world_size)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"weight sync backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if backend == "nccl":
        return NcclChannel(host, port, rank, world_size, device if device is not None else torch.cuda.current_device())
    return GlooChannel(host, port, rank, world_size)


def send_state_dict(channel: Channel, state_dict: Mapping[str, torch.Tensor], bucket_mb: float) -> dict:
    """Rank 0 side of one sync: broadcast the plan, then each bucket (one collective per bucket).

    Buckets are filled on ``channel.device`` one at a time, so the extra memory is one bucket.

    Returns:
        ``{"seconds", "bytes", "buckets"}`` for this sync.
    """
    t0 = time.perf_counter()
    metas = plan_buckets(state_dict, bucket_mb)
    channel.broadcast_obj(metas, src=0)
    nbytes = 0
    for meta in metas:
        flat = fill_bucket(meta, state_dict, device=channel.device)
        channel.broadcast(flat, src=0)
        nbytes += meta.nbytes
        del flat
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes, "buckets": len(metas)}


def receive_state_dict(channel: Channel) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side of one sync: yield ``(name, tensor)`` on ``channel.device`` as buckets arrive.

    The generator must be consumed to the end (every rank takes part in every broadcast);
    the tensors are views of the received bucket and stay valid after the next bucket.
    """
    metas: list[BucketMeta] = channel.broadcast_obj(None, src=0)
    for meta in metas:
        flat = torch.empty(meta.numel, dtype=dtype_from_name(meta.dtype), device=channel.device)
        channel.broadcast(flat, src=0)
        yield from split_bucket(meta, flat)


class NcclWeightSender:
    """The learner rank-0 end of a weight-sync group.

    Args:
        master_addr, master_port: where rank 0 hosts the group's rendezvous store (must be
            reachable from the rollout workers; one free port per pool).
        world_size: 1 + number of rollout engine ranks in the pool.
        backend: ``"nccl"`` (GPU) or ``"gloo"`` (CPU, for tests).
        device: the CUDA device holding the weights (default: the current one).

    Raises:
        ValueError: unknown backend or ``world_size < 2``.
    """

    def __init__(self, master_addr: str, master_port: int, world_size: int, *, backend: str = "nccl",
                 device: torch.device | int | str | None = None):
        if world_size < 2:
            raise ValueError(f"a weight-sync group needs the sender and >= 1 receiver, got world_size {world_size}")
        self.channel = open_channel(backend, master_addr, master_port, 0, world_size, device)

    def send(self, state_dict: Mapping[str, torch.Tensor], bucket_mb: float = 256.0) -> dict:
        """Broadcast ``state_dict`` (HF names) to every receiver; see :func:`send_state_dict`."""
        return send_state_dict(self.channel, state_dict, bucket_mb)

    def close(self) -> None:
        """Drop the communicator."""
        self.channel.close()


class NcclWeightReceiver:
    """The rollout-engine end of a weight-sync group (used by the vLLM worker extension).

    Args:
        master_addr, master_port, world_size: as for :class:`NcclWeightSender`.
        rank: this engine rank's place in the group (>= 1).
        backend: ``"nccl"`` or ``"gloo"``.
        device: the engine rank's device.
    """

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, *,
                 backend: str = "nccl", device: torch.device | int | str | None = None):
        if rank < 1:
            raise ValueError(f"receiver ranks start at 1 (0 is the sender), got {rank}")
        self.channel = open_channel(backend, master_addr, master_port, rank, world_size, device)

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the next sync's tensors; see :func:`receive_state_dict`."""
        return receive_state_dict(self.channel)

    def close(self) -> None:
        """Drop the communicator."""
        self.channel.close()

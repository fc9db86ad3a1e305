"""Pack a state dict into a few flat buckets and back (pure tensor logic, any device).

The NCCL weight sync broadcasts one bucket per collective call instead of one call per
tensor. A bucket is a flat 1-D tensor of a single dtype; its :class:`BucketMeta` lists the
tensors inside as ``(name, dtype, shape, offset)`` with ``offset`` counted in elements.

Tensors are grouped by dtype, in the state dict's order, and a bucket is closed when the next
tensor would push it past ``bucket_mb`` mebibytes. A tensor larger than ``bucket_mb`` gets a
bucket of its own (the limit is then exceeded by exactly that one tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

MiB = 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (picklable, readable metadata)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`. Raises ValueError for a name torch does not know."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown torch dtype name {name!r}")
    return dt


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a bucket: elements ``[offset, offset + numel)`` viewed as ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class BucketMeta:
    """One flat bucket: ``numel`` elements of ``dtype`` holding ``slots`` back to back."""

    dtype: str
    numel: int = 0
    slots: list[TensorSlot] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Size of the flat bucket in bytes."""
        return self.numel * torch.empty((), dtype=dtype_from_name(self.dtype)).element_size()


def plan_buckets(state_dict: Mapping[str, torch.Tensor], bucket_mb: float) -> list[BucketMeta]:
    """The bucket layout of ``state_dict`` (no data is copied).

    Args:
        state_dict: name -> tensor (any device, any shape; order is kept within a dtype).
        bucket_mb: the most MiB per bucket (> 0); one larger tensor gets its own bucket.

    Returns:
        Bucket metadata, grouped by dtype in order of first appearance.

    Raises:
        ValueError: ``bucket_mb <= 0`` or an empty state dict.
    """
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    if not state_dict:
        raise ValueError("cannot plan buckets for an empty state dict")
    limit = int(bucket_mb * MiB)
    open_buckets: dict[torch.dtype, BucketMeta] = {}
    done: list[BucketMeta] = []
    order: list[torch.dtype] = []
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        b = open_buckets.get(t.dtype)
        if b is not None and b.numel and (b.numel + t.numel()) * t.element_size() > limit:
            done.append(b)
            b = None
        if b is None:
            b = open_buckets[t.dtype] = BucketMeta(dtype=dtype_name(t.dtype))
            if t.dtype not in order:
                order.append(t.dtype)
        b.slots.append(TensorSlot(name, b.dtype, tuple(t.shape), b.numel))
        b.numel += t.numel()
        if nbytes >= limit:  # an oversized (or exactly full) tensor closes its own bucket
            done.append(open_buckets.pop(t.dtype))
    done.extend(open_buckets[dt] for dt in order if dt in open_buckets)
    # stable by dtype of first appearance, then creation order
    rank = {dtype_name(dt): i for i, dt in enumerate(order)}
    return sorted(done, key=lambda m: rank[m.dtype])


def fill_bucket(meta: BucketMeta, state_dict: Mapping[str, torch.Tensor],
                device: torch.device | str | None = None) -> torch.Tensor:
    """Copy the tensors of ``meta`` from ``state_dict`` into a new flat tensor.

    Returns:
        1-D tensor of ``meta.numel`` elements of ``meta.dtype`` on ``device`` (default: the
        first tensor's device).

    Raises:
        KeyError: a name of ``meta`` missing from ``state_dict``.
        ValueError: a tensor whose dtype or shape differs from the plan.
    """
    first = state_dict[meta.slots[0].name]
    flat = torch.empty(meta.numel, dtype=dtype_from_name(meta.dtype), device=device or first.device)
    for s in meta.slots:
        t = state_dict[s.name]
        if dtype_name(t.dtype) != s.dtype or tuple(t.shape) != s.shape:
            raise ValueError(f"{s.name}: planned {s.dtype}{list(s.shape)}, got {dtype_name(t.dtype)}{list(t.shape)}")
        flat[s.offset:s.offset + s.numel].copy_(t.reshape(-1))
    return flat


def split_bucket(meta: BucketMeta, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """An iterator of ``(name, tensor)`` views of ``flat`` as laid out by ``meta`` (no copy).

    ``flat`` is checked before anything is yielded.

    Raises:
        ValueError: ``flat`` is not 1-D of ``meta.numel`` elements of ``meta.dtype``.
    """
    if flat.dim() != 1 or flat.numel() != meta.numel or dtype_name(flat.dtype) != meta.dtype:
        raise ValueError(f"bucket tensor {dtype_name(flat.dtype)}{list(flat.shape)} does not match "
                         f"planned {meta.dtype}[{meta.numel}]")
    return ((s.name, flat[s.offset:s.offset + s.numel].view(s.shape)) for s in meta.slots)


def pack_buckets(state_dict: Mapping[str, torch.Tensor], bucket_mb: float) -> tuple[list[BucketMeta], list[torch.Tensor]]:
    """Plan and fill every bucket at once: ``(metas, flat tensors)`` (CPU tests, small models)."""
    metas = plan_buckets(state_dict, bucket_mb)
    return metas, [fill_bucket(m, state_dict) for m in metas]


def unpack_buckets(metas: list[BucketMeta], flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_buckets`: name -> tensor (views of the flat buckets).

    Raises:
        ValueError: different numbers of metas and flats, or a flat that does not match its meta.
    """
    if len(metas) != len(flats):
        raise ValueError(f"{len(metas)} bucket metas for {len(flats)} bucket tensors")
    out: dict[str, torch.Tensor] = {}
    for m, f in zip(metas, flats):
        out.update(split_bucket(m, f))
    return out

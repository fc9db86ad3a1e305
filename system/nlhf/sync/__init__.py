"""Learner -> rollout weight transport.

- :mod:`nlhf.sync.object_store`: CPU path; the state dict as one safetensors blob through
  Ray's object store (``pack_state_dict`` / ``unpack``).
- :mod:`nlhf.sync.buckets`: pure tensor logic packing a state dict into flat per-dtype buckets.
- :mod:`nlhf.sync.nccl`: GPU path; rank 0 of the learners broadcasts the buckets to the
  rollout engines (``NcclWeightSender`` / ``NcclWeightReceiver``), CUDA imports kept lazy.
"""

from nlhf.sync.buckets import BucketMeta, TensorSlot, pack_buckets, plan_buckets, unpack_buckets
from nlhf.sync.object_store import pack_state_dict, unpack

__all__ = ["BucketMeta", "TensorSlot", "pack_buckets", "pack_state_dict", "plan_buckets", "unpack", "unpack_buckets"]

"""Learner -> rollout weight transport.

- :mod:`nlhf.sync.object_store`: CPU path (``sync.backend: object_store``); the state dict as
  one safetensors blob through Ray's object store (``pack_state_dict`` / ``unpack``).
- :mod:`nlhf.sync.writer`: the streaming safetensors writers both CPU paths use.
- :mod:`nlhf.sync.files`: single-node path (``sync.backend: file``); the same safetensors
  payload as a file in ``sync.dir`` that each engine reads from the node's disk.
- :mod:`nlhf.sync.weight_transfer`: GPU path (``sync.backend: nccl``); vLLM's own
  weight-transfer API (``nccl`` backend, packed), with a ZeRO-3 weight source, per-engine
  rank offsets and a hard error where NCCL is missing. Imports vLLM lazily.
"""

from nlhf.sync.object_store import pack_state_dict, unpack

__all__ = ["pack_state_dict", "unpack"]
